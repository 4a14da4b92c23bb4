"""The plan's columnar join: classification, first-row-wins duplicates, pending runs, buckets."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine import partition, plan
from engine.storage import Storage

DV, MV = "whole", "v1"
SETTINGS = plan.Settings(DV, False, MV, {})


def test_bucket_is_pinned_and_nests_by_powers_of_two():
    # stored in manifests and compared across processes: these numbers must never change
    assert partition.bucket(pa.array(["sku-1", "sku-2", "p000000042", "", None]), 16).to_pylist() == [9, 3, 12, 6, 6]
    ids = pa.array([f"id-{i}" for i in range(20000)])
    b64 = partition.bucket(ids, 64).to_numpy()
    assert (partition.bucket(ids, 8).to_numpy() == b64 % 8).all()
    assert np.bincount(b64).min() > 20000 / 64 * 0.7  # spread evenly enough to bound a bucket's size
    assert partition.bucket(ids.slice(7, 5), 64).to_pylist() == b64[7:12].tolist()


def catalog(rows: list[tuple]) -> pa.Table:
    return pa.table({"product_id": [r[0] for r in rows], "image_url": [r[1] for r in rows],
                     "category": [r[2] for r in rows], "updated_at": ["t"] * len(rows)})


def state(rows: list[tuple], source: int = 0) -> pa.Table:
    """rows: (product_id, url the key was made from, category, objects)."""
    t = pa.table({"product_id": [r[0] for r in rows], "content_key": [plan.content_key(r[1], "t") for r in rows],
                  "category": [r[2] for r in rows], "catalog_category": [r[4] if len(r) > 4 else r[2] for r in rows],
                  "source_run": ["run-a"] * len(rows), "model_version": [MV] * len(rows),
                  "detect_version": [DV] * len(rows), "objects": pa.array([r[3] for r in rows], pa.int32())})
    return plan._state(t, source)


def run_bucket(cat: pa.Table, *states: pa.Table, settings=SETTINGS):
    _, piece = plan._split(cat, 0, 1)
    out = plan._plan_bucket(settings, 1, piece, *states)
    return out[0]["counts"], out[1], out[2], out[3], out[4], out[5]


def test_rows_are_classified_by_a_columnar_join():
    cat = catalog([("a", "u-a", "tops"), ("b", "u-b2", "tops"), ("d", "u-d", "shoes"), ("a", "u-a-dup", "tops"),
                   ("e", "u-e", "tops"), ("f", "u-f", "tops"), (None, "u-x", "tops"), ("g", "u-g", "bags")])
    base = state([("a", "u-a", "tops", 1), ("b", "u-b", "tops", 1), ("c", "u-c", "tops", 1),
                  ("e", "u-e", "tops", 2), ("e", "u-e", "bags", 2, "tops"),  # two objects, both current
                  ("f", "u-f", "tops", 2),  # stored with 2 objects, one missing: recompute
                  ("g", "u-g", "tops", 1, "bags")])  # only another category's object: recompute
    counts, work, rejects, kept, removed, base_changed = run_bucket(cat, base)
    assert counts["rows_in"] == 8 and counts["duplicates"] == 1 and counts["gone"] == 1
    assert (counts["new"], counts["changed"], counts["unchanged_reused"]) == (2, 3, 2)
    assert work.column("product_id").to_pylist() == ["b", "d", "f", None, "g"]  # catalog order
    assert work.column("action").to_pylist() == ["changed", "new", "changed", "new", "changed"]
    assert set(work.column("content_key").to_pylist()) >= {plan.content_key("u-b2", "t")}
    assert rejects.to_pylist() == [{"product_id": "a", "image_url": "u-a-dup", "category": "tops",
                                    "reason": "duplicate_product_id",
                                    "detail": "product_id seen earlier in this catalog (kept u-a)"}]
    assert sorted(zip(kept.column("product_id").to_pylist(), kept.column("category").to_pylist())) == \
        [("a", "tops"), ("e", "bags"), ("e", "tops")]
    assert kept.column("image_url").to_pylist()[0].startswith("u-")
    assert sorted(zip(removed.column("product_id").to_pylist(), removed.column("category").to_pylist())) == \
        [("b", "tops"), ("c", "tops"), ("f", "tops"), ("g", "tops")]
    assert sorted(base_changed.column("product_id").to_pylist()) == ["b", "f", "g"]


def test_a_pending_run_wins_over_the_published_state():
    """Crash-resume: features committed by a run that never published are the latest source."""
    cat = catalog([("b", "u-b2", "tops"), ("h", "u-h", "tops")])
    base = state([("b", "u-b", "tops", 1)])
    pending = state([("b", "u-b2", "tops", 1), ("h", "u-h", "tops", 1), ("h", "u-h", "tops", 1)], source=1)
    counts, work, _, kept, removed, _ = run_bucket(cat, base, pending)
    assert counts["unchanged_reused"] == 2 and work.num_rows == 0
    assert kept.column("source").to_pylist() == [1, 1]  # h's twice-committed row counted once
    assert removed.column("product_id").to_pylist() == ["b"]  # the base row is replaced, not kept


def test_full_and_new_models_recompute():
    cat = catalog([("a", "u-a", "tops")])
    base = state([("a", "u-a", "tops", 1)])
    assert run_bucket(cat, base, settings=plan.Settings(DV, True, MV, {}))[0]["new"] == 1
    counts = run_bucket(cat, base, settings=plan.Settings(DV, False, MV, {"tops": "tops-v2"}))[0]
    assert counts["changed"] == 1 and counts["unchanged_reused"] == 0
    assert run_bucket(cat, base, settings=plan.Settings("other", False, MV, {}))[0]["changed"] == 1


@pytest.mark.usefixtures("ray_cluster")
def test_plan_over_many_blocks_and_buckets_keeps_the_first_row(tmp_path):
    import ray

    rows = [{"product_id": f"p{i % 3000}", "image_url": f"u{i}", "category": "tops", "updated_at": "t"}
            for i in range(3300)]  # p0..p299 appear twice: the first (i < 3000) wins
    ds = ray.data.from_items(rows, override_num_blocks=7)
    sources = plan.StateSources(Storage(str(tmp_path)), MV, None, (), 0)
    change = plan.make(ds, sources, SETTINGS, bucket_rows=1000)
    assert change.buckets == 4
    assert change.counts["rows_in"] == 3300 and change.counts["duplicates"] == 300
    assert change.counts["new"] == change.counts["work"] == 3000
    rejects = pa.concat_tables(ray.get(change.rejects))
    assert rejects.num_rows == 300
    assert all(r["image_url"] == f"u{int(r['product_id'][1:]) + 3000}" and r["detail"].endswith(
        f"(kept u{int(r['product_id'][1:])})") for r in rejects.to_pylist())
    work = pa.concat_tables(ray.get(change.work))
    assert sorted(work.column("image_url").to_pylist()) == sorted(f"u{i}" for i in range(3000))
