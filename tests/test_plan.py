"""The plan's columnar join: classification, first-row-wins duplicates, pending runs, buckets."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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
                  "model_version": [MV] * len(rows), "detect_version": [DV] * len(rows),
                  "objects": pa.array([r[3] for r in rows], pa.int32()), "image_url": [r[1] for r in rows],
                  "file": ["features/v1/run=run-a/category=tops/part-0.parquet"] * len(rows),
                  "row": pa.array(range(len(rows)), pa.int64())})
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
    table = pa.Table.from_pylist(rows)
    blocks = [ray.put(table.slice(at, 480)) for at in range(0, table.num_rows, 480)]  # 7 blocks
    sources = plan.StateSources(Storage(str(tmp_path)), MV, None, (), 0)
    change = plan.make(blocks, sources, SETTINGS, bucket_rows=1000)
    assert change.buckets == 4
    assert change.counts["rows_in"] == 3300 and change.counts["duplicates"] == 300
    assert change.counts["new"] == change.counts["work"] == 3000
    rejects = pa.concat_tables(ray.get(change.rejects))
    assert rejects.num_rows == 300
    assert all(r["image_url"] == f"u{int(r['product_id'][1:]) + 3000}" and r["detail"].endswith(
        f"(kept u{int(r['product_id'][1:])})") for r in rejects.to_pylist())
    work = pa.concat_tables(ray.get(change.work))
    assert sorted(work.column("image_url").to_pylist()) == sorted(f"u{i}" for i in range(3000))


def test_the_published_chain_is_applied_per_bucket(tmp_path):
    """StateSources over engine.manifest: each part (a row group of one chain file) is split by
    bucket and every bucket applies base + deltas to its own rows only."""
    from engine import features, manifest

    storage = Storage(str(tmp_path))
    ids = [f"p{i}" for i in range(10)]
    f1 = features.write_part(storage, ("features", MV, "run=r1", "category=tops"), pa.table({"product_id": ids}))
    f2 = features.write_part(storage, ("features", MV, "run=r2", "category=tops"), pa.table({"product_id": ["p1"]}))

    def rows(pids, urls, file):
        t = state([(p, u, "tops", 1) for p, u in zip(pids, urls)]).drop_columns(["source", "file", "row"])
        return t.append_column("file", pa.array([file] * len(pids))).append_column(
            "row", pa.array(range(len(pids)), pa.int64()))

    manifest.write(storage, MV, "v1", None, rows(ids, [f"u-{p}" for p in ids], f1),
                   manifest.REMOVED_SCHEMA.empty_table())
    meta = manifest.write(storage, MV, "v2", "v1", rows(["p1"], ["u-p1-new"], f2),
                          pa.table({"product_id": ["p1", "p2"], "category": ["tops", "tops"]}))
    assert meta["chain"] == ["v1", "v2"]  # a delta, not a fresh base
    sources = plan.StateSources(storage, MV, "v2", (), meta["rows"], tuple(meta["chain"]))
    cat = catalog([(p, "u-p1-new" if p == "p1" else f"u-{p}", "tops") for p in ids if p != "p2"])
    n = 2
    pieces = [plan._split_state(sources, part, n)[1:] for part in sources.parts()]
    _, *cat_pieces = plan._split(cat, 0, n)
    totals, kept = {}, []
    for i in range(n):
        out = plan._plan_bucket(SETTINGS, 1, cat_pieces[i], *(p[i] for p in pieces))
        for k, v in out[0]["counts"].items():
            totals[k] = totals.get(k, 0) + v
        kept.append(out[3])
        assert out[4].num_rows == 0  # p2 left in v2 already: nothing published leaves now
    kept = pa.concat_tables(kept)
    assert totals["unchanged_reused"] == 9 and totals["work"] == 0 and totals["gone"] == 0
    assert totals["state_rows"] == 9
    p1 = {(r["product_id"], r["file"], r["row"]) for r in kept.to_pylist() if r["product_id"] == "p1"}
    assert p1 == {("p1", f2, 0)}  # the delta's location, not the base's


def test_next_state_equals_the_chain_applied_and_stays_lean(tmp_path):
    """manifest.next_state (batches of the chain, rows dropped as read) gives the same rows as
    read_state + apply, with the repeated columns dictionary-encoded; a small READ_ROWS makes
    every file several batches."""
    from engine import manifest

    storage = Storage(str(tmp_path))

    def rows(pids, file, category="tops"):
        pq.write_table(pa.table({"product_id": pids}), storage.path(file))  # the footer file_catalog reads
        t = state([(p, f"u-{p}-{file}", category, 1) for p in pids]).drop_columns(["source", "file", "row"])
        return t.append_column("file", pa.array([file] * len(pids))).append_column(
            "row", pa.array(range(len(pids)), pa.int64()))

    def keys(pids, category="tops"):
        return pa.table({"product_id": pids, "category": [category] * len(pids)})

    ids = [f"p{i:03d}" for i in range(200)]
    manifest.write(storage, MV, "v1", None, pa.concat_tables([rows(ids, "f1"), rows(ids[:50], "f1b", "bags")]),
                   manifest.REMOVED_SCHEMA.empty_table())
    manifest.write(storage, MV, "v2", "v1", rows(ids[10:20], "f2"), keys(ids[100:110]))
    assert manifest.read_meta(storage, MV, "v2")["chain"] == ["v1", "v2"]
    added, removed = rows(ids[15:25] + ["p999"], "f3"), keys(ids[:5] + ids[12:14])
    expected = manifest.apply(manifest.read_state(storage, MV, "v2"), added, removed)
    old = manifest.READ_ROWS
    try:
        manifest.READ_ROWS = 16
        got = manifest.next_state(storage, MV, "v2", added, removed)
    finally:
        manifest.READ_ROWS = old
    assert all(pa.types.is_dictionary(got.schema.field(c).type) for c in manifest.DICT_COLUMNS)
    as_rows = lambda t: sorted(tuple(r.values()) for r in t.select(manifest.STATE_SCHEMA.names)  # noqa: E731
                               .cast(manifest.STATE_SCHEMA).to_pylist())
    assert as_rows(got) == as_rows(expected)
    assert got.num_rows == 250 - 10 - 7 + 1  # v2 dropped p100-p109; now p000-p004, p012, p013 go; p999 comes
    where = {(r["product_id"], r["category"]): r["file"] for r in got.to_pylist()}
    assert ("p012", "tops") not in where and where[("p015", "tops")] == "f3" and where[("p011", "tops")] == "f2" and where[("p030", "tops")] == "f1"
    assert ("p101", "tops") not in where and ("p003", "tops") not in where and where[("p003", "bags")] == "f1b"
