"""The service's local cache of a GCS index (fake-gcs-server on 127.0.0.1): it holds the version
served and the one before, no more; a corrupt cached file is fetched again; a file that stays
corrupt on storage refuses the version while the last good one keeps serving, with the reason."""
import os
import uuid

import pytest

from engine import index, publish, synthetic
from engine.config import IndexConfig
from engine.storage import Storage
from serve.searcher import VersionStore

pytestmark = pytest.mark.gcs
MV = "cache-test"
SIZES = {"tops": 300, "bags": 200}
CFG = IndexConfig(max_shard_size=150, n_trees=5, search_k=500)


@pytest.fixture(scope="module")
def remote(ray_cluster, gcs_emulator):
    """Eleven index versions on GCS (v00..v10), each from its own run of synthetic features."""
    storage = Storage(gcs_emulator.make_bucket("cache-" + uuid.uuid4().hex[:6]), gcs_emulator.options())
    for i in range(11):
        synthetic.make_run(storage, MV, f"r{i:02d}", SIZES, 16, seed=i)
        index.build(storage, MV, f"r{i:02d}", f"v{i:02d}", CFG)
    return storage


def cached_versions(cache_dir) -> set[str]:
    top = os.path.join(cache_dir, "indexes", MV)
    return {v for v in os.listdir(top) if any(files for _, _, files in os.walk(os.path.join(top, v)))}


def test_the_cache_holds_at_most_two_versions_after_ten_swaps(remote, tmp_path):
    cache = str(tmp_path / "cache")
    store = VersionStore(remote, MV, 0, 1, cache, grace_s=0.0, retry_s=300.0)
    for i in range(11):
        version = f"v{i:02d}"
        store.load(version)
        store.retire(version)
        held = cached_versions(cache)
        assert held == ({version} | ({f"v{i - 1:02d}"} if i else set()))
        wanted = index.cached_files(store.loaded[version].manifest)
        for rel in wanted:  # what the served version reads is complete and checked
            assert index.sha256(os.path.join(cache, rel))
    assert not [n for _, _, names in os.walk(cache) for n in names if n.endswith(index.PARTIAL)]
    assert len(store.loaded) <= 2


def test_a_corrupt_cached_shard_is_fetched_again(remote, tmp_path):
    cache = str(tmp_path / "cache")
    first = VersionStore(remote, MV, 0, 1, cache, grace_s=0.0, retry_s=300.0)
    loaded = first.load("v03")
    entry = loaded.manifest["categories"]["tops"]["shards"][1]
    victim = os.path.join(cache, "indexes", MV, "v03", "tops", entry["index"])
    with open(victim, "r+b") as f:
        f.seek(200)
        f.write(bytes(64))
    assert index.sha256(victim) != entry["sha256"]
    restarted = VersionStore(remote, MV, 0, 1, cache, grace_s=0.0, retry_s=300.0)  # a replica restart
    again = restarted.load("v03")
    assert index.sha256(victim) == entry["sha256"]
    assert again.counts() == SIZES


def test_a_file_corrupt_on_storage_refuses_the_version_and_the_old_one_keeps_serving(remote, tmp_path):
    cache = str(tmp_path / "cache")
    storage = remote
    m = storage.read_json("indexes", MV, "v10", index.MANIFEST)
    bad = dict(m, index_version="v11")
    bad["categories"] = {c: dict(e, version="v10") for c, e in m["categories"].items()}
    bad["categories"]["bags"] = dict(bad["categories"]["bags"], shards=[
        dict(s, sha256="0" * 64) if s["shard"] == 0 else s for s in m["categories"]["bags"]["shards"]])
    storage.write_json(bad, "indexes", MV, "v11", index.MANIFEST)
    store = VersionStore(storage, MV, 0, 1, cache, grace_s=0.0, retry_s=300.0)
    store.load("v10")
    fetched = []
    real = Storage.get_file
    Storage.get_file = lambda self, local, *parts: (fetched.append(parts), real(self, local, *parts))[1]
    try:
        with pytest.raises(index.IndexLoadError, match="bags/shard-000.ann: checksum mismatch.*fetched twice"):
            store.load("v11")
    finally:
        Storage.get_file = real
    assert sum(p[-1] == "shard-000.ann" and p[-2] == "bags" for p in fetched) == 2
    assert "fetched twice" in store.failed["v11"][1]
    assert "v10" in store.loaded and store.loaded["v10"].counts() == SIZES
    publish.publish(storage, MV, "v10", keep=20)
