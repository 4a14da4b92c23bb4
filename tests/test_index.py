"""Sharded index build on the session's Ray cluster, and the validation gate in front of publish."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from engine import index, publish, sample, synthetic, validate
from engine.config import IndexConfig, ValidateConfig
from engine.storage import Storage

MV = "synthetic-64"
DIM = 64
SIZES = {"tops": 2400, "bags": 700, "hats": 3}
CLUSTERS = dict(clusters=60, local_dim=6, spread=0.5, noise=0.1, decay=0.0)


@pytest.fixture(scope="module")
def built(ray_cluster, tmp_path_factory):
    """Run r1's synthetic features (files of 500 rows) built into v1: shards of at most 1000 items."""
    root = tmp_path_factory.mktemp("index-store")
    storage = Storage(str(root))
    vectors = {}
    synthetic.make_run(storage, MV, "r1", SIZES, DIM, synthetic.Clusters(DIM, **CLUSTERS), rows_per_file=500,
                       vectors_out=vectors)
    cfg = IndexConfig(max_shard_size=1000, n_trees=20, search_k=2000, categories={"bags": {"n_trees": 8, "search_k": 3000}})
    manifest = index.build(str(root), MV, "r1", "v1", cfg)
    return storage, manifest, vectors, cfg


def copy_version(storage: Storage, src: str, dst: str) -> str:
    """A byte-for-byte copy of a version under a new name (its manifest renamed to match)."""
    shutil.copytree(storage.path("indexes", MV, src), storage.path("indexes", MV, dst))
    manifest = storage.read_json("indexes", MV, dst, index.MANIFEST)
    storage.write_json({**manifest, "index_version": dst}, "indexes", MV, dst, index.MANIFEST)
    return storage.path("indexes", MV, dst)


def check(storage, version, **kw):
    return validate.validate(storage, MV, version, ValidateConfig(sample=200), **kw)


def test_categories_split_into_even_shards_with_params_and_checksums(built):
    storage, manifest, vectors, cfg = built
    cats = manifest["categories"]
    assert {c: [s["count"] for s in e["shards"]] for c, e in cats.items()} == {
        "bags": [700], "hats": [3], "tops": [800, 800, 800]}
    assert manifest["count"] == sum(SIZES.values()) and manifest["dim"] == DIM
    assert manifest["model_version"] == MV and manifest["index_version"] == "v1" and manifest["run_id"] == "r1"
    assert cats["bags"]["params"] == {"metric": "angular", "n_trees": 8, "search_k": 3000}
    assert cats["tops"]["params"] == {"metric": "angular", "n_trees": 20, "search_k": 2000}
    assert manifest["build"]["shards"] == 5
    for name, entry in cats.items():
        for shard in entry["shards"]:
            ann = storage.path("indexes", MV, "v1", name, shard["index"])
            ids = storage.path("indexes", MV, "v1", name, shard["ids"])
            assert index.sha256(ann) == shard["sha256"] and os.path.getsize(ann) == shard["bytes"]
            assert index.sha256(ids) == shard["ids_sha256"]
            params = entry["params"]
            assert shard["memory_request"] == index.shard_memory_bytes(shard["count"], DIM, params["n_trees"],
                                                                       params["metric"])
            # the request covers what the build really holds: vectors plus the index it writes
            assert shard["memory_request"] > shard["count"] * DIM * 4 + shard["bytes"]
            estimate = index.index_bytes(shard["count"], DIM, params["n_trees"], params["metric"])
            assert 0.6 < shard["bytes"] / estimate < 1.4, (name, shard["bytes"], estimate)


def test_id_maps_line_up_with_the_vectors_in_every_shard(built):
    storage, manifest, vectors, cfg = built
    loaded = index.LoadedIndex.load(storage, MV, "v1", cache_dir=str(storage.path("cache")))
    try:
        for name, shards in loaded.categories.items():
            ids = [pid for s in shards for pid in s.ids.to_pylist()]
            assert ids == [f"{name}-{i:07d}" for i in range(SIZES[name])]  # every product once, in order
            stacked = np.concatenate([np.asarray(s.item_vectors()) for s in shards])
            np.testing.assert_allclose(stacked, vectors[name], atol=1e-6)
        loc = loaded.locate("tops-0001700")
        assert (loc.category, loc.shard, loc.position) == ("tops", 2, 100)
        hits = loaded.search(vectors["tops"][1700], 5, ["tops"])
        assert hits[0]["product_id"] == "tops-0001700" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert loaded.locate("tops-9999999") is None and loaded.locate("") is None
    finally:
        loaded.close()


def test_a_good_index_passes_the_gate(built):
    storage, manifest, vectors, cfg = built
    result = check(storage, "v1")
    assert result["ok"], result["failures"]
    assert result["counts"] == SIZES and result["counts_checked_against"] == "features"
    assert result["recall_at_10"] >= 0.95 and result["self_hit_rate"] == 1.0 and result["sample"] >= 200
    assert set(result["per_category"]) == set(SIZES)


def test_versions_are_immutable(built):
    storage, manifest, vectors, cfg = built
    with pytest.raises(RuntimeError, match="immutable"):
        index.build(storage.root, MV, "r1", "v1", cfg)


def test_gate_blocks_a_corrupt_shard(built):
    storage, *_ = built
    folder = copy_version(storage, "v1", "v-corrupt")
    victim = os.path.join(folder, "tops", "shard-001.ann")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # same size, different bytes
    open(victim, "wb").write(bytes(data))
    result = check(storage, "v-corrupt")
    assert not result["ok"] and "tops/shard-001.ann: checksum mismatch" in result["failures"][0]


def test_gate_blocks_a_truncated_shard_even_when_its_manifest_agrees(built):
    storage, manifest, *_ = built
    folder = copy_version(storage, "v1", "v-truncated")
    victim = os.path.join(folder, "tops", "shard-000.ann")
    open(victim, "r+b").truncate(os.path.getsize(victim) * 2 // 3)
    result = check(storage, "v-truncated")
    assert not result["ok"] and "tops/shard-000.ann" in result["failures"][0] and "bytes" in result["failures"][0]
    # a build that wrote a short file and checksummed it: the structure check still refuses it
    m = storage.read_json("indexes", MV, "v-truncated", index.MANIFEST)
    shard = m["categories"]["tops"]["shards"][0]
    shard.update(bytes=os.path.getsize(victim), sha256=index.sha256(victim))
    storage.write_json(m, "indexes", MV, "v-truncated", index.MANIFEST)
    result = check(storage, "v-truncated")
    assert not result["ok"] and "tops/shard-000.ann" in result["failures"][0]
    assert "items in the index" in result["failures"][0] or "cannot load" in result["failures"][0]


def test_gate_blocks_a_missing_or_damaged_id_map(built):
    storage, *_ = built
    folder = copy_version(storage, "v1", "v-ids")
    os.remove(os.path.join(folder, "bags", "shard-000.ids.parquet"))
    result = check(storage, "v-ids")
    assert not result["ok"] and "bags/shard-000.ids.parquet" in result["failures"][0]


def test_gate_blocks_low_recall(built):
    storage, manifest, vectors, cfg = built
    weak = IndexConfig(max_shard_size=1000, n_trees=1, search_k=10)
    index.build(storage.root, MV, "r1", "v-weak", weak)
    result = check(storage, "v-weak")
    assert not result["ok"] and result["recall_at_10"] < 0.95
    assert any(f.startswith("recall@10") and "< threshold 0.95" in f for f in result["failures"])


def test_gate_blocks_counts_that_differ_from_the_features_written(built):
    storage, *_ = built
    result = check(storage, "v1", expected={**SIZES, "tops": SIZES["tops"] + 1})
    assert not result["ok"] and len(result["failures"]) == 1
    assert result["failures"][0].startswith("counts: index has") and "'tops': 2401" in result["failures"][0]


def test_gate_blocks_a_product_indexed_twice_in_one_category(built):
    storage, manifest, vectors, cfg = built
    vecs = vectors["bags"][:300]
    ids = [f"bags-{i:07d}" for i in range(300)]
    synthetic.write_features(storage, MV, "r-dup", "bags", ids + ids[:5], np.concatenate([vecs, vecs[:5]]))
    index.build(storage.root, MV, "r-dup", "v-dup", cfg)
    result = check(storage, "v-dup")
    assert not result["ok"] and "duplicates: product_ids indexed twice in one category: {'bags': 5}" in result["failures"]


def test_validate_cli_checks_a_version_by_uri(built):
    from engine import cli

    storage, *_ = built
    assert cli.main(["validate", storage.uri("indexes", MV, "v1")]) == 0
    assert cli.main(["validate", storage.uri("indexes", MV, "v-weak")]) == 1


def lookalike(ray_address, *args):
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    return subprocess.run([sys.executable, "-m", "engine", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_run_with_a_failing_index_exits_nonzero_keeps_it_and_leaves_latest(ray_cluster, tmp_path):
    """Real images through the real pipeline. 8-d vectors make Annoy leaves small (10 items), so one
    tree searched with search_k=1 (stop at the first leaf) is a poor index even on a small catalog."""
    mv, storage = "effnet-lite0-512-v1", Storage(str(tmp_path / "store"))
    synthetic.make_run(storage, mv, "r0", {"tops": 50}, 8)
    index.build(storage.root, mv, "r0", "v0-good", IndexConfig())
    publish.publish(storage, mv, "v0-good", keep=5)
    catalog = sample.make_catalog(tmp_path / "catalog", 80, seed=3)
    bad = lookalike(ray_cluster, "run", "--set", f"source.path={catalog}", "--set", f"storage.root={storage.root}",
                    "--set", "embed.dim=8", "--set", "index.n_trees=1", "--set", "index.search_k=1")
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "index failed validation, not published" in bad.stderr and "recall@10" in bad.stderr
    assert publish.latest(storage, mv) == "v0-good"
    failed = [v for v in publish.versions(storage, mv) if v != "v0-good"]
    assert len(failed) == 1  # kept for inspection
    report = storage.read_json("runs", failed[0], "report.json")
    assert report["status"] == "failed" and not report["validation"]["ok"]
    assert report["validation"]["recall_at_10"] < 0.95
    from engine import cli

    assert cli.main(["validate", storage.uri("indexes", mv, failed[0])]) == 1
