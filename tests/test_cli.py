"""`lookalike run` as a user runs it: a separate process joining the session's Ray cluster."""
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import publish, sample
from engine.storage import Storage

MV = "effnet-lite0-512-v1"


def lookalike(ray_address, *args, timeout=600):
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run([sys.executable, "-m", "engine", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    return sample.make_catalog(tmp_path_factory.mktemp("small"), 80, seed=7)


def test_run_twice_publishes_two_versions_and_latest_points_at_the_second(ray_cluster, small_catalog, tmp_path):
    sets = ["--set", f"source.path={small_catalog}", "--set", f"storage.root={tmp_path}"]
    first = lookalike(ray_cluster, "run", *sets)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    v1 = publish.latest(Storage(str(tmp_path)), MV)
    second = lookalike(ray_cluster, "run", *sets)
    assert second.returncode == 0, second.stderr[-3000:]
    v2 = publish.latest(Storage(str(tmp_path)), MV)
    assert v1 and v2 and v1 < v2
    assert publish.versions(Storage(str(tmp_path)), MV) == [v1, v2]
    assert "PUBLISHED" in second.stdout and f"published {v2}" in second.stdout
    assert "rows 80: ok 80, rejected 0" in first.stdout
    assert "rows 80: ok 0, rejected 0, reused 80" in second.stdout  # incremental: nothing changed


def test_run_with_nothing_usable_exits_nonzero_and_publishes_nothing(ray_cluster, tmp_path):
    bad = tmp_path / "bad.csv"
    pq_rows = [{"product_id": f"p{i}", "image_url": f"file://{tmp_path}/missing-{i}.png", "category": "tops"}
               for i in range(5)]
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.Table.from_pylist(pq_rows), bad)
    result = lookalike(ray_cluster, "run", "--set", f"source.path={bad}", "--set", f"storage.root={tmp_path}/store")
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "nothing to index" in result.stderr
    assert "not_found 5" in result.stdout
    assert publish.latest(Storage(str(tmp_path / "store")), MV) is None
    rejects = pq.read_table(next((tmp_path / "store" / "runs").glob("*/rejects.parquet")))
    assert rejects.num_rows == 5


def test_missing_catalog_is_a_clear_failure(ray_cluster, tmp_path):
    result = lookalike(ray_cluster, "run", "--set", f"source.path={tmp_path}/nope.parquet",
                       "--set", f"storage.root={tmp_path}/store")
    assert result.returncode == 1
    assert "no such file" in result.stderr and "source.path" in result.stderr


def test_version_names_the_package_and_ray():
    import tomllib
    from pathlib import Path

    result = subprocess.run([sys.executable, "-m", "engine", "--version"], capture_output=True, text=True)
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert result.returncode == 0 and result.stdout.strip() == f"lookalike {project['version']} (ray 2.60.0)"


def test_log_flags_on_every_command_are_config_keys():
    from engine import cli

    for command in ("demo", "run", "serve", "validate"):
        argv = [command] + (["gs://b/indexes/mv"] if command == "validate" else []) + [
            "--log-level", "warning", "--log-format", "json"]
        args = cli.parser().parse_args(argv)
        assert cli.overrides(args)[-2:] == ["log.level=WARNING", "log.format=json"], command
    cfg = cli.load(cli.parser().parse_args(["run", "--log-level", "ERROR"]))
    assert cfg.log.level == "ERROR" and cfg.log.format == "text"


def test_json_log_is_one_object_per_line_with_run_id_and_stage(ray_cluster, small_catalog, tmp_path):
    import json
    import re

    result = lookalike(ray_cluster, "run", "--log-format", "json", "--set", f"source.path={small_catalog}",
                       "--set", f"storage.root={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"^run (\S+): PUBLISHED", result.stdout, re.M).group(1)
    records = []
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:  # what is not ours: Ray's forwarded worker lines "(Actor pid=..) ..."
            assert not re.search(r"\b(INFO|WARNING|ERROR) engine\.", line), f"a text log line: {line}"
    ours = [r for r in records if r["logger"].startswith("engine.")]
    assert ours and all(set(r) >= {"time", "level", "logger", "message", "run_id", "stage"} for r in records)
    assert {r["run_id"] for r in ours if r["run_id"]} == {run_id}
    stages = {r["stage"] for r in ours}
    assert {"connect", "download_embed_store"} & stages, stages
    assert "\r" not in result.stderr, "no progress bars in a json log"
