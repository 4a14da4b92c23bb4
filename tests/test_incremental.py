"""Incremental runs: only what changed is downloaded and embedded; crashes resume; v1 and v2 side by side."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_config
from engine import index, manifest, pipeline, publish, sample
from engine.storage import Storage

MV = "effnet-lite0-512-v1"
PRODUCTS = 150


def write_catalog(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def add_products(rows, out_dir, ids):
    """Fashion-MNIST items not yet in the catalog, rendered to new files."""
    images, labels = sample.load()
    for i in ids:
        path = out_dir / "images" / f"{sample.product_id(i)}.png"
        sample.render(images[i]).save(path)
        label = sample.LABELS[labels[i]]
        rows.append({"product_id": sample.product_id(i), "image_url": path.as_uri(),
                     "category": sample.CATEGORY[label], "label": label, "updated_at": "2026-11-02T00:00:00Z"})


def index_of(cfg, version):
    return index.LoadedIndex.load(Storage(cfg.storage.root), MV, version, cfg.serve.cache_dir)


def all_ids(loaded):
    return {pid for shards in loaded.categories.values() for s in shards for pid in s.ids.to_pylist()}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("incr")
    path = sample.make_catalog(out, PRODUCTS, seed=3)
    rows = pq.read_table(path).to_pylist()
    cfg = make_config(path, out / "store")
    return out, rows, cfg, pipeline.run(cfg)


def test_first_run_processes_everything(first_run):
    out, rows, cfg, rep = first_run
    c = rep["counts"]
    assert (c["rows_in"], c["new"], c["processed"], c["unchanged_reused"], c["indexed"]) == (150, 150, 150, 0, 150)


def test_one_percent_change_processes_exactly_the_changed_rows(first_run):
    out, rows, cfg, rep1 = first_run
    rows = [dict(r) for r in rows]
    removed = {rows[0]["product_id"], rows[1]["product_id"]}
    changed = {rows[2]["product_id"], rows[3]["product_id"]}
    images, _ = sample.load()
    for r in rows[2:4]:  # a new photo behind a new URL, and a new updated_at
        path = out / "images" / f"{r['product_id']}-v2.png"
        sample.render(np.flipud(images[int(r["product_id"][3:])])).save(path)
        r["image_url"], r["updated_at"] = path.as_uri(), "2026-11-03T00:00:00Z"
    current = rows[2:]
    taken = {int(r["product_id"][3:]) for r in rows}
    new_ids = [i for i in range(10000) if i not in taken][:2]
    add_products(current, out, new_ids)
    path = write_catalog(current, out / "catalog-day2.parquet")
    cfg2 = make_config(path, cfg.storage.root)
    rep2 = pipeline.run(cfg2)
    c = rep2["counts"]
    assert (c["new"], c["changed"], c["processed"], c["removed"]) == (2, 2, 4, 2)
    assert c["unchanged_reused"] == 146 and c["ok"] == 4 and c["indexed"] == 150
    v1, v2 = index_of(cfg, rep1["index_version"]), index_of(cfg, rep2["index_version"])
    assert all_ids(v2) == {r["product_id"] for r in current}
    affected = removed | changed | {sample.product_id(i) for i in new_ids}
    same = 0
    for pid in {r["product_id"] for r in current} - affected:
        loc1, loc2 = v1.locate(pid), v2.locate(pid)
        cat = loc1.category
        np.testing.assert_array_equal(v1.vector(loc1), v2.vector(loc2))  # reused, not recomputed
        before = [h["product_id"] for h in v1.search(v1.vector(loc1), 10, [cat], exclude=pid)
                  if h["product_id"] not in affected]
        after = [h["product_id"] for h in v2.search(v2.vector(loc2), 10, [cat], exclude=pid)
                 if h["product_id"] not in affected]
        n = min(len(before), len(after))
        same += before[:n] == after[:n]
    assert same == 146 - 0, same

    # nothing changed since: nothing is processed; by config, nothing is published either
    rep3 = pipeline.run(make_config(path, cfg.storage.root, "plan.publish_unchanged=false"))
    assert rep3["status"] == "unchanged" and rep3["counts"]["processed"] == 0
    assert publish.latest(Storage(cfg.storage.root), MV) == rep2["index_version"]
    rep4 = pipeline.run(cfg2)
    assert rep4["status"] == "published" and rep4["counts"]["processed"] == 0
    assert all_ids(index_of(cfg, rep4["index_version"])) == all_ids(v2)
    full = pipeline.run(make_config(path, cfg.storage.root, "plan.full=true"))
    assert full["counts"]["processed"] == 150 and full["counts"]["unchanged_reused"] == 0


def test_duplicate_product_ids_are_reported_not_collapsed(first_run, tmp_path):
    out, rows, cfg, _ = first_run
    dup = dict(rows[5], image_url=rows[6]["image_url"])
    path = write_catalog(rows + [dup], tmp_path / "dups.parquet")  # images stay beside the first catalog
    rep = pipeline.run(make_config(path, tmp_path / "store", f"download.file_roots=[{out}]"))
    assert rep["counts"]["duplicates"] == 1 and rep["counts"]["indexed"] == PRODUCTS
    rejects = pq.read_table(rep["rejects_uri"]).to_pylist()
    assert [(r["product_id"], r["reason"]) for r in rejects] == [(rows[5]["product_id"], "duplicate_product_id")]


def committed_rows(root, run_dir_count_before):
    storage = Storage(str(root))
    return manifest.pending_state(storage, [MV], None, "").num_rows


ROWS = 1200  # embedding runs at ~150 rows/s here: enough rows that the kill lands mid-stream


def test_kill_9_mid_embedding_then_resume(ray_cluster, tmp_path):
    catalog = sample.make_catalog(tmp_path / "cat", ROWS, seed=11)
    root = tmp_path / "store"
    sets = ["--set", f"source.path={catalog}", "--set", f"storage.root={root}",
            "--set", "storage.feature_batch_rows=16", "--set", "embed.batch_size=16"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run", *sets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while committed_rows(root, 0) < 16:  # the first committed batch: embedding is fast, the rest follows in seconds
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # tasks the dead driver owned are torn down by Ray
    done = committed_rows(root, 0)
    assert 16 <= done < ROWS
    assert publish.latest(Storage(str(root)), MV) is None
    resumed = subprocess.run([sys.executable, "-m", "engine", "run", *sets], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rep = Storage(str(root)).read_json("runs", publish.latest(Storage(str(root)), MV), "report.json")
    assert rep["counts"]["unchanged_reused"] == done
    assert rep["counts"]["processed"] == ROWS - done
    assert rep["counts"]["indexed"] == ROWS
    assert publish.versions(Storage(str(root)), MV) == [rep["index_version"]]
