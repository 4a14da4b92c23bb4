"""engine/api.py on the index the pipeline published (tests/conftest.py `published`): what a notebook
opens is what the service serves and what the gate checked."""
import collections
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import api, index, validate
from engine.config import ValidateConfig
from engine.storage import Storage


@pytest.fixture(scope="module")
def opened(published):
    cfg, rep = published
    with api.open_index(cfg.storage.root) as ix:
        yield ix, cfg, rep


@pytest.fixture(scope="module")
def catalog(sample_catalog):
    return {r["product_id"]: r for r in pq.read_table(sample_catalog).to_pylist() if r["product_id"]}


def test_open_index_is_the_published_version(opened):
    ix, cfg, rep = opened
    assert ix.version == rep["index_version"] and ix.model_version == cfg.embed.model_version
    assert ix.categories == sorted(rep["categories"]) and ix.counts() == rep["categories"]
    assert ix.dim == 512 and ix.summary()["counts"] == rep["categories"]
    again = api.open_index(cfg.storage.root, cfg.embed.model_version, rep["index_version"])
    try:
        assert again.version == ix.version and again.counts() == ix.counts()
    finally:
        again.close()


def test_neighbours_are_the_services_answer(opened, catalog):
    """The same merge the service's /similar does: own category, product left out, best first."""
    ix, cfg, rep = opened
    loaded = index.LoadedIndex.load(Storage(cfg.storage.root), ix.model_version, ix.version, cfg.serve.cache_dir)
    try:
        for pid in sorted(p for p, r in catalog.items() if r["label"] not in ("broken", "x"))[:20]:
            got = ix.neighbours(pid, k=10)
            cat = catalog[pid]["category"]
            assert len(got) == 10 and pid not in {h["product_id"] for h in got}
            assert {h["category"] for h in got} == {cat}
            scores = [h["score"] for h in got]
            assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
            loc = loaded.locate(pid)
            assert got == loaded.search(loaded.vector(loc), 10, [cat], exclude=pid)
            assert len(ix.neighbours(pid, k=3)) == 3
    finally:
        loaded.close()


def test_vectors_and_exact_search_agree_with_numpy(opened):
    ix, _, _ = opened
    cat = max(ix.counts(), key=ix.counts().get)
    ids, vecs = ix.vectors(cat)
    assert isinstance(ids, pa.Array) and ids.type == pa.string() and len(ids) == ix.counts()[cat]
    assert vecs.dtype == np.float32 and vecs.shape == (len(ids), 512) and vecs.flags.c_contiguous
    assert len(set(ids.to_pylist())) == len(ids)
    for i in (0, len(ids) // 2, len(ids) - 1):
        where, vec = ix.locate(ids[i].as_py())
        assert where == cat and np.array_equal(vec, vecs[i])
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    q = vecs[7]
    truth = np.argsort(-(unit @ (q / np.linalg.norm(q))), kind="stable")[:10]
    exact = ix.neighbours_of_vector(q, 10, [cat], exact=True)
    assert [h["product_id"] for h in exact][0] == ids[7].as_py()  # itself, at cosine 1
    assert exact[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert {h["product_id"] for h in exact} == set(ids.take(pa.array(truth)).to_pylist())
    approx = ix.neighbours_of_vector(q, 10, [cat])
    assert approx[0]["product_id"] == ids[7].as_py()
    everywhere = ix.neighbours_of_vector(q, 5)  # every category: still finds itself first
    assert everywhere[0]["product_id"] == ids[7].as_py() and len(everywhere) == 5


def test_bad_questions_say_what_is_wrong(opened):
    ix, _, _ = opened
    with pytest.raises(KeyError, match="not in index"):
        ix.neighbours("no-such-product")
    with pytest.raises(KeyError, match="no category"):
        ix.vectors("no-such-category")
    with pytest.raises(KeyError, match="no categories"):
        ix.neighbours_of_vector(np.zeros(512), 5, ["no-such-category"])
    with pytest.raises(ValueError, match="512 dimensions"):
        ix.neighbours_of_vector(np.zeros(64), 5)
    some = ix.vectors(ix.categories[0])[0][0].as_py()
    other = next(c for c in ix.categories if c != ix.categories[0])
    with pytest.raises(KeyError, match=f"in {other}"):
        ix.neighbours(some, category=other)


def test_open_index_refuses_missing_and_ambiguous_roots(published, tmp_path):
    cfg, rep = published
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError):
        api.open_index(str(missing))
    assert not missing.exists()  # reading never creates a store
    with pytest.raises(ValueError, match="no published index line"):
        api.open_index(str(tmp_path))
    root = tmp_path / "two"
    shutil.copytree(cfg.storage.root, root, ignore=shutil.ignore_patterns("cache", "features", "runs"))
    shutil.copytree(root / "indexes" / cfg.embed.model_version, root / "indexes" / "other-model")
    with pytest.raises(ValueError, match="index lines"):
        api.open_index(str(root))
    with pytest.raises(index.IndexLoadError, match="not this folder"):  # its manifest names the first line
        api.open_index(str(root), "other-model")
    with api.open_index(str(root), cfg.embed.model_version) as ix:
        assert ix.version == rep["index_version"]


def test_a_corrupt_shard_is_refused_by_the_api_and_by_the_gate(published, tmp_path):
    """One loading path: the notebook, the gate (and the service) refuse the same file for the same reason."""
    cfg, rep = published
    root = tmp_path / "store"
    shutil.copytree(cfg.storage.root, root, ignore=shutil.ignore_patterns("cache"))
    storage = Storage(str(root))
    manifest = index.read_manifest(storage, cfg.embed.model_version, rep["index_version"])
    cat = sorted(manifest["categories"])[0]
    shard = manifest["categories"][cat]["shards"][0]
    path = storage.path(*index.shard_prefix(manifest, cat), cat, shard["index"])
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(index.IndexLoadError, match="checksum mismatch") as refused:
        api.open_index(str(root))
    result = validate.validate(storage, cfg.embed.model_version, rep["index_version"], ValidateConfig(sample=50))
    assert not result["ok"] and result["failures"] == [f"load: {refused.value}"]


def test_report_and_rejects_of_the_latest_run(published):
    cfg, rep = published
    table = api.read_report(cfg.storage.root)
    assert table.num_rows == 1 and api.runs(cfg.storage.root)[-1] == rep["run_id"]
    row = table.to_pylist()[0]
    assert row["run_id"] == rep["run_id"] and row["status"] == rep["status"] == "published"
    assert (row["counts.rows_in"], row["counts.ok"], row["counts.rejected"]) == \
        (rep["counts"]["rows_in"], rep["counts"]["ok"], rep["counts"]["rejected"])
    assert {k.removeprefix("categories."): v for k, v in row.items() if k.startswith("categories.")} == rep["categories"]
    assert api.report_dict(table)["rejects_by_reason"] == rep["rejects_by_reason"]
    assert api.read_report(cfg.storage.root, rep["run_id"]).to_pylist() == table.to_pylist()

    rejects = api.read_rejects(cfg.storage.root)
    assert rejects.column_names == ["product_id", "image_url", "category", "reason", "detail"]
    assert rejects.num_rows == rep["counts"]["rejected"] > 0
    assert dict(collections.Counter(rejects.column("reason").to_pylist())) == rep["rejects_by_reason"]
    assert api.read_rejects(cfg.storage.root, rep["run_id"]).equals(rejects)
    with pytest.raises(FileNotFoundError, match="no such run"):
        api.read_rejects(cfg.storage.root, "no-such-run")
    with pytest.raises(FileNotFoundError, match="no such run report"):
        api.read_report(cfg.storage.root, "no-such-run")


def test_vectors_outlive_close(published):
    cfg, _ = published
    ix = api.open_index(cfg.storage.root)
    ids, vecs = ix.vectors(ix.categories[0])
    ix.close()
    assert float(np.linalg.norm(vecs[0])) > 0 and len(ids) == len(vecs)


def test_the_same_answers_from_gcs_with_a_cache_removed_on_close(published, gcs_emulator, tmp_path):
    """The published store copied to the GCS emulator: shards are copied to a temporary cache (Annoy
    maps local files), answers equal the local store's, and close() removes the cache."""
    import os
    import uuid

    cfg, rep = published
    local = Storage(cfg.storage.root)
    remote = Storage(f"{gcs_emulator.make_bucket('api-' + uuid.uuid4().hex[:6])}/store", gcs_emulator.options())
    for top in ("indexes", "runs"):
        base = local.path(top)
        for folder, _, names in os.walk(base):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), local.path()).split(os.sep)
                remote.put_file(os.path.join(folder, name), *rel)
    with api.open_index(str(cfg.storage.root)) as here:
        pid = here.vectors(here.categories[0])[0][3].as_py()
        expected, counts = here.neighbours(pid, k=5), here.counts()
    ix = api.open_index(remote.root, storage_options=remote.options)
    cache = ix._own_cache
    try:
        assert ix.version == rep["index_version"] and ix.counts() == counts
        assert ix.neighbours(pid, k=5) == expected
        assert cache and any(n.endswith(".ann") for _, _, names in os.walk(cache) for n in names)
    finally:
        ix.close()
    assert not os.path.exists(cache)
    assert api.read_report(remote.root, storage_options=remote.options).to_pylist() == \
        api.read_report(cfg.storage.root).to_pylist()
    assert api.read_rejects(remote.root, storage_options=remote.options).equals(api.read_rejects(cfg.storage.root))
