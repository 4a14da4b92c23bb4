"""The pipeline end to end on a real local Ray cluster, real images, real weights."""
import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import features, index, manifest, publish, validate
from engine.storage import Storage
from conftest import BROKEN, MALFORMED, SAMPLE_PRODUCTS


def test_every_row_is_indexed_or_rejected_with_a_reason(published, sample_catalog):
    cfg, rep = published
    assert rep["status"] == "published"
    c = rep["counts"]
    assert (c["rows_in"], c["ok"], c["rejected"]) == (SAMPLE_PRODUCTS + BROKEN + len(MALFORMED), SAMPLE_PRODUCTS,
                                                      BROKEN + len(MALFORMED))
    assert c["rows_in"] == c["ok"] + c["unchanged_reused"] + c["rejected"]
    rejects = pq.read_table(rep["rejects_uri"]).to_pylist()
    by_id = {r["product_id"]: r for r in rejects}
    assert by_id["broken-000"]["reason"] == "decode_error"
    assert by_id["broken-001"]["reason"] == "not_found"
    assert by_id["ftp-url"]["reason"] == "bad_url"
    assert by_id["no-url"]["reason"] == "malformed_row" and "image_url" in by_id["no-url"]["detail"]
    assert by_id["bad-category"]["reason"] == "malformed_row"
    assert any(r["product_id"] is None and r["reason"] == "malformed_row" for r in rejects)
    assert all(r["detail"] for r in rejects)


def test_categories_match_the_catalog(published, sample_catalog):
    cfg, rep = published
    catalog = [r for r in pq.read_table(sample_catalog).to_pylist() if r["label"] not in ("broken", "x")]
    assert rep["categories"] == dict(sorted(collections.Counter(r["category"] for r in catalog).items()))


def test_report_is_written_with_stage_timings(published):
    cfg, rep = published
    stored = Storage(cfg.storage.root).read_json("runs", rep["run_id"], "report.json")
    assert stored["status"] == "published" and stored["index_version"] == rep["index_version"]
    for stage in ("connect", "download_embed_store", "index", "validate", "publish"):
        assert stored["stages"][stage]["seconds"] >= 0
    assert stored["stages"]["download_embed_store"]["items"] == SAMPLE_PRODUCTS


def test_feature_shards_hold_unit_vectors_of_the_configured_dim(published):
    cfg, rep = published
    total, storage = 0, Storage(cfg.storage.root)
    for category in manifest.categories(storage, cfg.embed.model_version, rep["run_id"]):
        table = manifest.read_category(storage, cfg.embed.model_version, rep["run_id"], category,
                                       columns=("product_id", "image_url", "category", "label", "vector"))
        vecs = features.vectors(table)
        assert vecs.shape[1] == cfg.embed.dim == 512
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
        assert set(table.column("category").to_pylist()) == {category}  # catalog columns carried through
        total += len(vecs)
    assert total == SAMPLE_PRODUCTS


def test_published_index_passes_validation_and_latest_points_at_it(published):
    cfg, rep = published
    storage = Storage(cfg.storage.root)
    assert publish.latest(storage, cfg.embed.model_version) == rep["index_version"]
    val = rep["validation"]
    assert val["ok"] and val["sample"] >= 200 and val["recall_at_10"] >= 0.95
    manifest = storage.read_json(*index.version_prefix(cfg.embed.model_version, rep["index_version"]),
                                 index.MANIFEST)
    assert {c: sum(s["count"] for s in e["shards"]) for c, e in manifest["categories"].items()} == rep["categories"]
    again = validate.validate_uri(storage.uri("indexes", cfg.embed.model_version), cfg.index.validate_)
    assert again["ok"], again


def test_validate_cli_fails_on_a_corrupt_index_copy(published, tmp_path):
    import shutil

    from engine import cli

    cfg, rep = published
    src = Storage(cfg.storage.root).path("indexes", cfg.embed.model_version, rep["index_version"])
    dst = tmp_path / "indexes" / cfg.embed.model_version / rep["index_version"]
    shutil.copytree(src, dst)
    assert cli.main(["validate", str(dst)]) == 0
    victim = next(dst.glob("*/shard-000.ann"))
    victim.write_bytes(victim.read_bytes()[:1000])
    assert cli.main(["validate", str(dst)]) == 1
    assert cli.main(["validate", str(tmp_path / "not-an-index")]) == 2


def test_the_stream_and_the_one_task_path_compute_the_same_outcomes(published, sample_catalog, tmp_path):
    """A small run computes its rows in one task (plan.one_task_rows); the actor-pool stream over the
    same catalog gives the same counts, the same rejects and the same vectors."""
    from conftest import make_config
    from engine import pipeline

    cfg, rep = published
    streamed = pipeline.run(make_config(sample_catalog, tmp_path, "plan.one_task_rows=0"))
    assert rep["compute"]["mode"] == "one_task" and streamed["compute"]["mode"] == "stream"
    assert {"download", "embed"} <= set(streamed["throughput"])  # Ray Data's per-stage stats
    seconds = rep["compute"]["seconds"]
    assert seconds["embed"] > 0 and seconds["download"] > 0 and seconds["load"] > 0
    for key in ("rows_in", "ok", "rejected", "objects", "indexed"):
        assert rep["counts"][key] == streamed["counts"][key], key
    assert rep["rejects_by_reason"] == streamed["rejects_by_reason"]
    mv = cfg.embed.model_version
    vectors = []
    for root, run in ((cfg.storage.root, rep["run_id"]), (str(tmp_path), streamed["run_id"])):
        storage = Storage(root)
        table = pa.concat_tables([manifest.read_category(storage, mv, run, c, columns=("product_id", "vector"))
                                  for c in manifest.categories(storage, mv, run)]).sort_by("product_id")
        vectors.append((table.column("product_id").to_pylist(), features.vectors(table)))
    assert vectors[0][0] == vectors[1][0] and len(vectors[0][0]) == SAMPLE_PRODUCTS
    np.testing.assert_allclose(vectors[0][1], vectors[1][1], atol=1e-4)
