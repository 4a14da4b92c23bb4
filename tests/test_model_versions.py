"""A v2 model builds beside v1 while v1 serves; the service switches by config with no failed request."""
import threading
import time

import pytest

from conftest import free_port, make_config
from engine import demo, pipeline, publish
from engine.storage import Storage

V2 = "effnet-lite0-1280-v2"


@pytest.fixture(scope="module")
def both_versions(published, sample_catalog):
    cfg1, rep1 = published
    cfg2 = make_config(sample_catalog, cfg1.storage.root, f"embed.model_version={V2}", "embed.dim=1280")
    rep2 = pipeline.run(cfg2)
    return cfg1, rep1, cfg2, rep2


def test_v2_builds_in_its_own_namespace(both_versions):
    cfg1, rep1, cfg2, rep2 = both_versions
    storage = Storage(cfg1.storage.root)
    assert publish.latest(storage, cfg1.embed.model_version) == rep1["index_version"]  # v1 untouched
    assert publish.latest(storage, V2) == rep2["index_version"]
    assert rep2["counts"]["processed"] == rep2["counts"]["rows_in"]  # a new model reuses nothing
    assert storage.exists("features", V2) and storage.exists("indexes", V2, rep2["index_version"])


def test_switch_v1_to_v2_under_load_drops_nothing(both_versions):
    from ray import serve

    from serve import app

    cfg1, rep1, cfg2, rep2 = both_versions
    port = free_port()
    with_port = lambda c: c.model_copy(update={"serve": c.serve.model_copy(update={"port": port})})  # noqa: E731
    base = app.start(with_port(cfg1))
    seen, errors, stop = [], [], threading.Event()
    product = "fm-00053"  # in the session sample catalog

    def hammer():
        while not stop.is_set():
            try:
                status, body = demo.http_json("GET", f"{base}/similar/{product}?k=5", timeout=30)
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a failed request too
                errors.append(repr(exc))
                continue
            if status != 200:
                errors.append((status, body))
            else:
                seen.append(body["index_version"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        serve.run(app.build_app(with_port(cfg2)), name="lookalike", route_prefix="/")
        deadline = time.monotonic() + 120
        while demo.http_json("GET", f"{base}/version")[1].get("model_version") != V2:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        status, version = demo.http_json("GET", f"{base}/version")
        serve.shutdown()
    assert errors == []
    assert set(seen) == {rep1["index_version"], rep2["index_version"]}
    assert seen[-1] == rep2["index_version"] and version["model_version"] == V2 and version["dim"] == 1280
