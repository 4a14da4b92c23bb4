"""Tombstones without a cluster: files, the delete command's rules, the plan fold and the service's masks."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import manifest, pointer, publish, tombstones
from engine.index import Location
from engine.plan import content_keys, drop_deleted
from engine.storage import Storage
from serve.fresh import Dead, keep_mask, live

MV = "mv1"


def _table(rows):
    return pa.Table.from_pylist([{"product_id": p, "before": b, "content_key": k} for p, b, k in rows],
                                schema=tombstones.SCHEMA)


def _published(tmp_path, ids, version="v1"):
    """A store whose LATEST names ``version`` with a manifest state holding ``ids`` (category tops)."""
    storage = Storage(str(tmp_path))
    n = len(ids)
    state = pa.table({"product_id": ids, "content_key": [f"k-{i}" for i in ids], "category": ["tops"] * n,
                      "catalog_category": ["tops"] * n, "model_version": [MV] * n, "detect_version": ["whole"] * n,
                      "objects": pa.array([1] * n, pa.int32()), "image_url": [f"file:///{i}.png" for i in ids],
                      "file": ["f.parquet"] * n, "row": pa.array(range(n), pa.int64())})
    pq.write_table(pa.table({"x": [0] * n}), storage.path("f.parquet"))
    manifest.write(storage, MV, version, None, state, manifest.REMOVED_SCHEMA.empty_table(), state=state)
    publish.swap(storage, MV, version, pointer.read_pointer(storage, MV))
    return storage


def test_files_are_write_once_and_read_back_as_one_row_per_product(tmp_path):
    storage = Storage(str(tmp_path))
    a = tombstones.write(storage, MV, "v1", _table([("p1", 3, None), ("p2", tombstones.ALL, "k2")]))
    b = tombstones.write(storage, MV, "v1", _table([("p1", tombstones.ALL, "k1")]))
    open(storage.path(*tombstones.folder(MV, "v1"), ".half.parquet.tmp"), "w").write("junk")
    assert a != b and tombstones.names(storage, MV, "v1") == sorted([a, b])
    got = {r["product_id"]: r["before"] for r in tombstones.read(storage, MV, "v1").to_pylist()}
    assert got == {"p1": tombstones.ALL, "p2": tombstones.ALL}  # the widest mask wins
    assert tombstones.read(storage, MV, "v1", only=[a]).num_rows == 2
    assert tombstones.read(storage, MV, "v2").num_rows == 0


def test_delete_reports_unknown_and_repeated_ids_and_is_bounded(tmp_path, monkeypatch):
    storage = _published(tmp_path, [f"p{i}" for i in range(10)])
    out = tombstones.delete(storage, MV, ["p1", "p2", "nope", "p1"])
    assert (out["index_version"], out["deleted"], out["unknown"], out["tombstones"]) == ("v1", 2, ["nope"], 2)
    again = tombstones.delete(storage, MV, ["p2", "p3"])
    assert (again["deleted"], again["already_deleted"], again["tombstones"]) == (1, 1, 3)
    dead = tombstones.read(storage, MV, "v1")
    assert dict(zip(dead.column("product_id").to_pylist(), dead.column("content_key").to_pylist())) == {
        "p1": "k-p1", "p2": "k-p2", "p3": "k-p3"}  # the stored key: the daily run tells unchanged from changed
    monkeypatch.setattr(tombstones, "MAX_PER_CALL", 3)
    with pytest.raises(tombstones.TombstoneError, match="at most 3"):
        tombstones.delete(storage, MV, ["a", "b", "c", "d"])
    monkeypatch.setattr(tombstones, "MAX_TOTAL", 4)
    with pytest.raises(tombstones.TombstoneError, match="lookalike run"):
        tombstones.delete(storage, MV, ["p4", "p5"])
    with pytest.raises(tombstones.TombstoneError, match="no product ids"):
        tombstones.delete(storage, MV, [])
    monkeypatch.setattr(tombstones, "MAX_TOTAL", 100)
    monkeypatch.setattr(tombstones, "MAX_FILES", 2)  # two calls so far wrote two files
    with pytest.raises(tombstones.TombstoneError, match="fewer, larger calls"):
        tombstones.delete(storage, MV, ["p6"])
    assert tombstones.delete(storage, MV, ["p1"])["already_deleted"] == 1  # nothing new: no file, no refusal


def test_delete_refuses_when_nothing_is_published(tmp_path):
    with pytest.raises(tombstones.TombstoneError, match="nothing published"):
        tombstones.delete(Storage(str(tmp_path)), MV, ["p1"])


def test_a_delete_racing_a_publish_reaches_the_new_version(tmp_path):
    storage = _published(tmp_path, ["p1", "p2"])
    seen = tombstones.names(storage, MV, "v1")  # what a publisher read before building v2
    tombstones.delete(storage, MV, ["p1"])      # lands on v1 meanwhile
    storage2 = _published(tmp_path, ["p1", "p2"], version="v2")
    assert tombstones.carry(storage2, MV, "v1", "v2", seen) == 1
    assert tombstones.read(storage2, MV, "v2").column("product_id").to_pylist() == ["p1"]
    assert tombstones.carry(storage2, MV, "v1", "v2", tombstones.names(storage, MV, "v1")) == 0


def test_fold_drops_deleted_rows_the_catalog_still_lists_unchanged():
    catalog = pa.table({"product_id": ["a", "b", "c"], "image_url": ["u-a", "u-b", "u-c"],
                        "category": ["tops"] * 3, "updated_at": ["t"] * 3})
    keys = content_keys(catalog).to_pylist()
    gone = pa.table({"product_id": ["a", "b", "zz"], "content_key": [keys[0], "an older key", "k"]})
    kept = drop_deleted(catalog, gone)
    assert kept.column("product_id").to_pylist() == ["b", "c"]  # b came back changed: embedded again


class FakeShard:
    def __init__(self, ids, delta=0):
        self.ids = pa.array(ids, pa.string())
        self.entry = {"shard": 0, "delta": delta}

    def __len__(self):
        return len(self.ids)


def test_masks_follow_generations():
    dead = Dead(("f",), _table([("b", tombstones.ALL, None), ("c", 1, None)]))
    base, delta = FakeShard(["a", "b", "c", "d"]), FakeShard(["c", "e"], delta=1)
    assert dead.mask(base).tolist() == [True, False, False, True]  # c's old vector is masked in the base
    assert dead.mask(delta) is None                                # and its new one answers
    assert dead.alive("c", 1) and not dead.alive("c", 0) and not dead.alive("b", 5) and dead.alive("a", 0)
    assert Dead((), tombstones.SCHEMA.empty_table()).mask(base) is None
    manifest_ = {"categories": {"tops": {"shards": [{"shard": 0}, {"shard": 1, "delta": 1}]}}}
    found = [Location("tops", 0, 2), Location("tops", 1, 0)]
    assert live(found, dead, manifest_, "c") == [Location("tops", 1, 0)]
    assert live(found[:1], dead, manifest_, "b") == []


def test_keep_mask_ands_what_restricts():
    a, b = np.array([True, True, False]), np.array([True, False, True])
    assert keep_mask(None, None) is None
    assert keep_mask(a, None) is a
    assert keep_mask(a, b).tolist() == [True, False, False]
