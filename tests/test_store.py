"""The bounded feature store: compaction and garbage collection survive a crash at any step, never
delete what a kept version needs, and categories nobody changed keep their shards by reference.

Runs go through the real post-plan code (features.write_batch, compaction, manifest, index build,
validation, publish, gc) with vectors from a deterministic function of the content key
(engine.synthetic.daily_run) instead of downloads and the model.
"""
import os

import numpy as np
import pyarrow.compute as pc
import pytest

from engine import compact, config, gc, index, manifest, pipeline, pointer, synthetic, validate
from engine.storage import Storage

CATS = ["tops", "bags", "shoes", "hats"]
DIM = 16


def make_cfg(root, *more):
    return config.load(None, [f"storage.root={root}", f"embed.dim={DIM}", "storage.keep_versions=2",
                              "features.target_file_mb=0.05", "index.n_trees=10", "index.search_k=2000",
                              "storage.feature_batch_rows=128", "index.validate.sample=60", *more])


def files_on_disk(root) -> set[str]:
    out = set()
    for folder, _, names in os.walk(os.path.join(root, "features")):
        out |= {os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".parquet")}
    return out


def assert_state_matches(storage, mv, version, catalog):
    """Every catalog product exactly once, its vector the one its content key gives."""
    state = manifest.read_state(storage, mv, version)
    assert sorted(state.column("product_id").to_pylist()) == sorted(catalog.column("product_id").to_pylist())
    for category in CATS:
        table = manifest.read_category(storage, mv, version, category, columns=("product_id", "content_key", "vector"))
        vecs = synthetic.features.vectors(table)
        np.testing.assert_allclose(vecs, synthetic.key_vectors(table.column("content_key").to_pylist(), DIM),
                                   atol=1e-6)
    for file in pc.unique(state.column("file")).to_pylist():
        assert os.path.exists(storage.path(file)), file


@pytest.fixture()
def store(ray_cluster, tmp_path):
    cfg = make_cfg(tmp_path / "store")
    churn = synthetic.Churn(1200, CATS, rate=0.02, seed=3)
    catalog = churn.table()
    for day in range(3):
        synthetic.daily_run(cfg, catalog, f"d{day:03d}")
        catalog = churn.advance()
    return cfg, churn, catalog


class Crash(RuntimeError):
    pass


def crash(*_, **__):
    raise Crash("injected")


@pytest.mark.parametrize("step", ["copy", "manifest", "index", "publish", "gc-start", "gc-midway"])
def test_compaction_interrupted_at_each_step_then_resumed(store, monkeypatch, step):
    cfg, churn, catalog = store
    storage, mv = Storage(cfg.storage.root), cfg.embed.model_version
    published = pointer.latest(storage, mv)
    monkeypatch.setattr(compact, "MAX_SMALL", 2)  # this day's parts merge with the tail file: compaction runs
    with monkeypatch.context() as m:
        if step == "copy":  # dies while copying: some new files complete, one half-written, none referenced
            real = compact.compact

            def midway(storage, *a, **kw):
                moved, stats = real(storage, *a, **kw)
                new = sorted(set(pc.unique(moved.column("file")).to_pylist()) - set(pc.unique(a[0].column("file")).to_pylist()))
                assert new, "the store had nothing to compact"
                for f in new[len(new) // 2:]:
                    os.unlink(storage.path(f))
                folder = os.path.dirname(storage.path(new[0]))
                open(os.path.join(folder, "." + os.path.basename(new[-1]) + ".tmp"), "wb").write(b"PAR1 half")
                raise Crash("injected")
            m.setattr(compact, "compact", midway)
        elif step == "manifest":
            m.setattr(manifest, "write", crash)
        elif step == "index":
            m.setattr(index, "build_version", crash)
        elif step == "publish":
            m.setattr(pipeline.publish, "publish", crash)
        elif step == "gc-start":
            m.setattr(gc, "collect", crash)
        else:  # gc deletes two files, then dies
            real_rm, done = Storage.rm, []

            def rm(self, *parts):
                if parts and parts[0] == "features" and parts[-1].endswith(".parquet"):
                    if len(done) >= 2:
                        raise Crash("injected")
                    done.append(parts)
                return real_rm(self, *parts)
            m.setattr(Storage, "rm", rm)
        with pytest.raises((Crash, pipeline.RunFailed)):
            synthetic.daily_run(cfg, catalog, "d100-crashed")
    now = pointer.latest(storage, mv)
    if step in ("gc-start", "gc-midway"):
        assert now == "d100-crashed"  # published; only the garbage is left
    else:
        assert now == published
    assert_state_matches(storage, mv, now, catalog if now != published else manifest.read_state(storage, mv, now))
    assert validate.validate(storage, mv, now, cfg.index.validate_)["ok"]
    synthetic.daily_run(cfg, catalog, "d101-resumed")
    assert_state_matches(storage, mv, "d101-resumed", catalog)
    referenced = set()
    for v in gc.kept(storage, mv, cfg.storage.keep_versions):
        referenced |= set(manifest.read_meta(storage, mv, v)["files"])
    assert files_on_disk(storage.root) == referenced  # the resumed run finished the job: no garbage left


def test_gc_never_deletes_a_file_a_kept_version_references(ray_cluster, tmp_path):
    cfg = make_cfg(tmp_path / "store", "storage.keep_versions=3")
    storage, mv = Storage(cfg.storage.root), cfg.embed.model_version
    churn = synthetic.Churn(1000, CATS, rate=0.05, seed=5)
    catalogs, catalog = {}, churn.table()
    for day in range(9):
        version = f"d{day:03d}"
        synthetic.daily_run(cfg, catalog, version)
        catalogs[version] = catalog
        kept = gc.kept(storage, mv, 3)
        assert len(kept) <= 3 and kept[-1] == version
        for v in kept:  # every kept version still reads whole, vectors and all
            assert_state_matches(storage, mv, v, catalogs[v])
            assert validate.validate(storage, mv, v, cfg.index.validate_)["ok"]
        catalog = churn.advance()
    on_disk = files_on_disk(storage.root)
    referenced = set().union(*(manifest.read_meta(storage, mv, v)["files"] for v in gc.kept(storage, mv, 3)))
    assert on_disk == referenced
    assert len(manifest.versions(storage, mv)) <= 3 + len(manifest.read_meta(storage, mv, gc.kept(storage, mv, 3)[0])["chain"])


def test_a_category_reused_by_reference_survives_deletion_of_the_version_that_wrote_it(ray_cluster, tmp_path):
    cfg = make_cfg(tmp_path / "store")
    storage, mv = Storage(cfg.storage.root), cfg.embed.model_version
    churn = synthetic.Churn(1200, CATS, rate=0.02, seed=7)
    catalog = churn.table()
    synthetic.daily_run(cfg, catalog, "d000")
    for day in range(1, 5):  # only tops changes: bags, shoes, hats keep d000's shards
        catalog = churn.advance(only="tops")
        rep = synthetic.daily_run(cfg, catalog, f"d{day:03d}")
        assert rep["index_build"]["reused"] == ["bags", "hats", "shoes"]
        assert rep["validation"]["ok"] and set(rep["validation"]["per_category"]) == set(CATS)
    m = index.read_manifest(storage, mv, "d004")
    assert index.owner(m, "bags") == "d000" and index.owner(m, "tops") == "d004"
    assert gc.kept(storage, mv, 2) == ["d003", "d004"]
    assert not storage.exists("indexes", mv, "d000", index.MANIFEST)  # retired: no longer a version
    assert storage.exists("indexes", mv, "d000", gc.RETIRED) and storage.exists("indexes", mv, "d000", "bags")
    assert not storage.exists("indexes", mv, "d000", "tops")  # nobody refers to d000's tops
    assert not storage.exists("indexes", mv, "d001")  # d001 wrote only tops, which d002+ rebuilt
    loaded = index.LoadedIndex.load(storage, mv, "d004", cache_dir=str(tmp_path / "cache"))
    assert loaded.counts() == manifest.read_meta(storage, mv, "d004")["categories"]
    loaded.close()
    for day in range(5, 8):  # now everything changes: d000's shards lose their last reference
        catalog = churn.advance()
        synthetic.daily_run(cfg, catalog, f"d{day:03d}")
    assert not storage.exists("indexes", mv, "d000")


def test_lookalike_compact_merges_and_publishes_the_same_objects(ray_cluster, tmp_path):
    cfg = make_cfg(tmp_path / "store", "features.target_file_mb=0.02")
    storage, mv = Storage(cfg.storage.root), cfg.embed.model_version
    churn = synthetic.Churn(600, CATS, rate=0.02, seed=9)
    catalog = churn.table()
    for day in range(3):
        synthetic.daily_run(cfg, catalog, f"d{day:03d}")
        catalog = churn.advance()
    before = manifest.read_meta(storage, mv, "d002")
    big = make_cfg(tmp_path / "store", "features.target_file_mb=100")  # every file is small next to 100 MB
    rep = pipeline.compact_store(big, version="d003")
    after = manifest.read_meta(storage, mv, "d003")
    assert rep["status"] == "published" and after["categories"] == before["categories"]
    assert len(after["files"]) == len(CATS) < len(before["files"])  # one file per category
    assert rep["index_build"]["shards"] == 0
    assert sorted(rep["index_build"]["reused"]) == sorted(CATS)
    again = pipeline.compact_store(big, version="d004")
    assert again["status"] == "unchanged"


def test_choose_merges_a_runs_own_parts_and_lets_older_small_files_wait():
    """A run's per-batch parts become one file per category; other small files wait for MAX_SMALL
    (no daily rewrite of the tail); sparse files are always rewritten."""
    mib = compact.MIB

    def name(run, cat, i):
        return f"features/mv/run={run}/category={cat}/part-{i}.parquet"

    small = {"rows": 10, "live": 10, "bytes": mib}
    catalog = {name("old", "tops", i): small for i in range(3)}
    catalog |= {name("r2", "tops", i): small for i in range(2)} | {name("r2", "bags", 0): small}
    catalog |= {name("old", "shoes", 0): {"rows": 10, "live": 4, "bytes": mib}}
    got = compact.choose(catalog, 256 * mib, run_id="r2")
    assert got == {("mv", "tops"): [name("r2", "tops", 0), name("r2", "tops", 1)],  # bags: one part, nothing to merge
                   ("mv", "shoes"): [name("old", "shoes", 0)]}
    assert ("mv", "tops") not in compact.choose(catalog, 256 * mib)  # without a run: 5 small files wait for 8
    catalog |= {name("old", "tops", i): small for i in range(3, 6)}
    assert len(compact.choose(catalog, 256 * mib, run_id="r2")[("mv", "tops")]) == 8  # 8 small: all merge
