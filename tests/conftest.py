"""One loopback-only Ray cluster per test session, and a small published index built through it."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from engine import raycluster

os.environ.update(raycluster.loopback_env())

SAMPLE_PRODUCTS = 240
BROKEN = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_temp_dir(prefix: str):
    """A short temp dir for a Ray cluster, removed at the end. Ray puts AF_UNIX sockets under it
    (session_<date>_<pid>/sockets/dash_MetricsHead) and those paths are capped at 107 bytes: a
    pytest basetemp such as /tmp/pytest-of-<user>/pytest-105/serve-head0 leaves too little room."""
    temp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's Ray cluster; subprocesses join it through RAY_ADDRESS."""
    import ray

    with ray_temp_dir("lk-ray") as temp:
        ray.init(num_cpus=2, _temp_dir=str(temp), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address
        yield address
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


# Rows a real catalog export contains sooner or later; each must become a reject row.
MALFORMED = [
    {"product_id": None, "image_url": "file:///nowhere.png", "category": "tops", "label": "x"},
    {"product_id": "no-url", "image_url": "", "category": "tops", "label": "x"},
    {"product_id": "ftp-url", "image_url": "ftp://example.invalid/a.png", "category": "tops", "label": "x"},
    {"product_id": "bad-category", "image_url": "file:///nowhere.png", "category": "../etc", "label": "x"},
]


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory) -> str:
    """240 real products, a truncated image, a missing file and the MALFORMED rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine import sample

    path = sample.make_catalog(tmp_path_factory.mktemp("catalog"), SAMPLE_PRODUCTS, broken=BROKEN)
    table = pq.read_table(path)
    extra = pa.Table.from_pylist([{**row, "updated_at": "2026-11-01T00:00:00Z"} for row in MALFORMED],
                                 schema=table.schema)
    pq.write_table(pa.concat_tables([table, extra]), path)
    return path


def make_config(catalog: str, root, *more: str):
    from engine import config
    from engine.demo import DEMO_FILTERS

    return config.load(None, [f"source.path={catalog}", f"storage.root={root}",
                              f"serve.cache_dir={root}/cache", "index.validate.sample=200", DEMO_FILTERS, *more])


@pytest.fixture(scope="session")
def published(ray_cluster, sample_catalog, tmp_path_factory):
    """One pipeline run over the sample catalog: (config, report)."""
    from engine import pipeline

    root = tmp_path_factory.mktemp("store")
    cfg = make_config(sample_catalog, root)
    return cfg, pipeline.run(cfg)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server on a free 127.0.0.1 port for the whole session (tests/emulators.py)."""
    from emulators import FakeGcs

    server = FakeGcs(tmp_path_factory.mktemp("gcs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory):
    """bqemulator (REST + Storage Read gRPC) on free 127.0.0.1 ports for the whole session."""
    from emulators import BqEmulator

    server = BqEmulator(tmp_path_factory.mktemp("bq")).start()
    yield server
    server.stop()
