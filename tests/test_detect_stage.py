"""The pipeline's detect stage and per-category embedding models, on a catalog of outfit photos.

Each product photo shows 1-4 Fashion-MNIST items the detector never saw in training; the product
is the largest one. With ``detect.index_objects: all`` every object lands in its category's index.
"""
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import free_port, make_config
from engine import config, demo, detect, detector, index, manifest, outfits, pipeline, publish
from engine.storage import Storage

PRODUCTS = 24
FIT = 512 / outfits.CANVAS  # detect.image_size / the photos' size
DETECT = ["detect.catalog=true", "detect.index_objects=all", "index.validate.min_recall_at_10=0.9"]


@pytest.fixture(scope="module")
def outfit_catalog(tmp_path_factory):
    return outfits.write_catalog(tmp_path_factory.mktemp("outfits"), PRODUCTS, seed=11)


@pytest.fixture(scope="module")
def detected(ray_cluster, outfit_catalog, tmp_path_factory):
    path, truth = outfit_catalog
    cfg = make_config(path, tmp_path_factory.mktemp("store"), *DETECT)
    return cfg, pipeline.run(cfg), truth


def stored(cfg, rep) -> list[dict]:
    storage = Storage(cfg.storage.root)
    mv, run = cfg.embed.model_version, rep["index_version"]
    cols = ("product_id", "category", "catalog_category", "box", "score", "vector")
    return [r for cat in manifest.categories(storage, mv, run)
            for r in manifest.read_category(storage, mv, run, cat, columns=cols).to_pylist()]


def iou(a, b) -> float:
    return float(detector._box_iou(np.asarray([a], np.float32), np.asarray([b], np.float32))[0, 0])


def test_select_keeps_the_catalog_category_first_and_falls_back_to_the_whole_image():
    objs = [{"category": "shoes", "box": [0, 0, 5, 5], "score": 0.9}, {"category": "shoes", "box": [6, 6, 9, 9], "score": 0.8},
            {"category": "tops", "box": [1, 1, 4, 4], "score": 0.6}]
    assert [o["category"] for o in detect.select(objs, "tops", "all", (10, 10))] == ["tops", "shoes"]
    assert detect.select(objs, "shoes", "own", (10, 10)) == [objs[0]]  # the best of the pair
    whole = detect.select(objs, "bags", "own", (10, 20))
    assert whole == [{"category": "bags", "box": [0.0, 0.0, 10.0, 20.0], "score": None}]


def test_pools_that_leave_no_cpu_or_ask_too_many_gpus_fail_up_front(tmp_path):
    cfg = make_config(tmp_path / "c.parquet", tmp_path, *DETECT)
    pipeline.check_fits(cfg, 2, 1)  # the default pools fit a 2-CPU, 1-GPU node with detection on
    with pytest.raises(pipeline.RunFailed, match=r"detect 4x0.25.*cluster has 2"):
        pipeline.check_fits(config.load(None, [*DETECT, "detect.actors=4"]), 2)
    with pytest.raises(pipeline.RunFailed, match="ask for 1.5 GPUs"):
        pipeline.check_fits(config.load(None, [*DETECT, "embed.gpus_per_actor=1"]), 4, 1)


def test_detect_stage_finds_the_objects_of_each_photo(detected):
    cfg, rep, truth = detected
    c = rep["counts"]
    assert rep["status"] == "published" and (c["rows_in"], c["ok"], c["rejected"]) == (PRODUCTS, PRODUCTS, 0)
    rows = stored(cfg, rep)
    assert c["objects"] == c["indexed"] == len(rows)
    pairs = hits = 0  # per photo and category: one object is kept (the best of a pair of shoes)
    for i, (boxes, labels) in enumerate(truth):
        mine = {r["category"]: r for r in rows if r["product_id"] == f"outfit-{i:04d}"}
        assert len(mine) == len([r for r in rows if r["product_id"] == f"outfit-{i:04d}"])  # one per category
        for label in set(labels.tolist()):
            pairs += 1
            got = mine.get(outfits.CLASSES[label - 1])
            hits += got is not None and got["score"] is not None and max(
                iou(box * FIT, got["box"]) for box, lab in zip(boxes, labels) if lab == label) >= 0.5
    assert hits >= 0.8 * pairs, (hits, pairs)
    own = [r for r in rows if r["category"] == r["catalog_category"]]
    assert sorted(r["product_id"] for r in own) == [f"outfit-{i:04d}" for i in range(PRODUCTS)]


def test_a_product_sits_in_each_of_its_categories_its_own_first(detected):
    cfg, rep, truth = detected
    loaded = index.LoadedIndex.load(Storage(cfg.storage.root), cfg.embed.model_version, rep["index_version"],
                                    cfg.serve.cache_dir)
    manifest = loaded.manifest
    directory = index.Directory.load(Storage(cfg.storage.root), manifest, cfg.serve.cache_dir)
    catalog = {r["product_id"]: r["category"] for r in pq.read_table(cfg.source.path).to_pylist()}
    multi = 0
    for pid, category in catalog.items():
        found = directory.lookup(pid)
        assert found and found[0].category == category
        multi += len(found) > 1
    assert multi >= PRODUCTS // 3
    loaded.close()


@pytest.fixture(scope="module")
def bags_model(tmp_path_factory):
    """Other weights for bags: the pretrained ones with the head convolution scaled per channel."""
    import torch

    from engine.embed import load_state_dict

    state = load_state_dict(None)
    g = torch.Generator().manual_seed(0)
    state["_conv_head.weight"] = state["_conv_head.weight"] * (0.5 + torch.rand(
        state["_conv_head.weight"].shape[0], 1, 1, 1, generator=g))
    path = tmp_path_factory.mktemp("bags-model") / "bags-v2.pt"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def per_category(detected, bags_model):
    cfg, rep, truth = detected
    cfg2 = config.load(None, [f"source.path={cfg.source.path}", f"storage.root={cfg.storage.root}",
                              f"serve.cache_dir={cfg.serve.cache_dir}", *DETECT,
                              f"embed.categories={{bags: {{model_version: bags-v2, weights: {bags_model}}}}}"])
    return cfg, cfg2, pipeline.run(cfg2), truth


def test_a_category_gets_its_own_model_version(per_category):
    cfg, cfg2, rep2, _ = per_category
    storage = Storage(cfg.storage.root)
    manifest = index.read_manifest(storage, cfg.embed.model_version, rep2["index_version"])
    assert manifest["categories"]["bags"]["model_version"] == "bags-v2"
    assert {manifest["categories"][c]["model_version"] for c in manifest["categories"] if c != "bags"} \
        == {cfg.embed.model_version}
    assert storage.exists("features", "bags-v2", f"run={rep2['run_id']}", "category=bags")
    assert not storage.exists("features", cfg.embed.model_version, f"run={rep2['run_id']}", "category=bags")
    with_bags = {r["product_id"] for r in stored(cfg2, rep2) if r["category"] == "bags"}
    assert rep2["counts"]["processed"] == len(with_bags) > 0  # only products with a bag are embedded again
    assert rep2["counts"]["unchanged_reused"] == PRODUCTS - len(with_bags)
    # a service still configured with one model for all would embed bag queries wrongly: it refuses the index
    assert set(index.model_mismatch(manifest, cfg.embed)) == {"bags"}
    assert index.model_mismatch(manifest, cfg2.embed) == {}


def test_service_embeds_objects_like_the_pipeline(per_category):
    """An outfit photo from the catalog, uploaded: every object finds its own product at score 1,
    bags through the bags model (shared detection, cropping and preprocessing)."""
    from ray import serve

    from serve import app

    cfg, cfg2, rep2, truth = per_category
    cfg2 = cfg2.model_copy(update={"serve": cfg2.serve.model_copy(update={"port": free_port()})})
    base = app.start(cfg2)
    try:
        catalog = pq.read_table(cfg2.source.path).to_pylist()
        bag = outfits.CLASSES.index("bags") + 1
        picks = {next(i for i, (_, labels) in enumerate(truth) if bag in labels),  # through the bags model
                 max(range(len(truth)), key=lambda i: len(set(truth[i][1].tolist())))}  # the most objects
        for pick in picks:
            data = open(catalog[pick]["image_url"][len("file://"):], "rb").read()
            status, body = demo.http_json("POST", f"{base}/search?k=3", data, {"Content-Type": "image/png"})
            assert status == 200 and body["index_version"] == rep2["index_version"], body
            pid = catalog[pick]["product_id"]
            mine = {r["category"]: r for r in stored(cfg2, rep2) if r["product_id"] == pid and r["score"] is not None}
            assert mine
            for o in body["objects"]:
                box = [v * FIT for v in o["box"]]  # stored boxes: in the image as decoded for detection
                if o["category"] in mine and iou(box, mine[o["category"]]["box"]) > 0.95:
                    assert o["results"][0]["product_id"] == pid
                    assert o["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
                    mine.pop(o["category"])
            assert not mine, f"objects the service did not find as the pipeline did: {sorted(mine)}"
            status, body = demo.http_json("GET", f"{base}/similar/{pid}?k=3")
            assert status == 200 and body["category"] == catalog[pick]["category"]
    finally:
        serve.shutdown()


def test_a_service_with_other_category_models_refuses_the_index(per_category):
    from ray import serve

    from serve import app

    cfg, _, rep2, _ = per_category  # cfg: one model for all; the published index embedded bags with bags-v2
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": free_port()})})
    base = app.start(cfg)
    try:
        status, body = demo.http_json("GET", f"{base}/healthz")  # open: status only
        assert status == 503 and body.get("state") == "refused", body
        status, body = demo.http_json("GET", f"{base}/version")  # why (behind the token when one is set)
        assert status == 503 and "bags: bags-v2, effnet-lite0-512-v1" in str(body), body
    finally:
        serve.shutdown()


def test_crop_is_the_same_in_pipeline_and_service():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), np.uint8))
    a = detect.crop_input(img, [10, 20, 110, 220], 0.05, 224)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    from engine import imaging

    again = Image.fromarray(imaging.fit(imaging.decode(buf.getvalue()), 300))
    assert np.array_equal(a, detect.crop_input(again, [10, 20, 110, 220], 0.05, 224))


def test_rerun_reuses_objects_and_new_detect_settings_recompute(per_category):
    cfg, cfg2, rep2, _ = per_category
    again = pipeline.run(cfg2)
    c = again["counts"]
    assert (c["processed"], c["unchanged_reused"], c["indexed"]) == (0, PRODUCTS, rep2["counts"]["indexed"])
    stricter = cfg2.model_copy(update={"detect": cfg2.detect.model_copy(update={"score_threshold": 0.6})})
    third = pipeline.run(stricter)
    assert third["counts"]["processed"] == PRODUCTS and third["counts"]["changed"] == PRODUCTS
    assert third["counts"]["indexed"] <= rep2["counts"]["indexed"]


def test_a_product_shot_is_embedded_whole_and_an_outfit_item_by_its_crop():
    from engine import imaging

    cfg = config.load(None, ["detect.whole_photo_share=0.6", "detect.box_padding=0.1"]).detect
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), np.uint8))
    shot = {"category": "tops", "box": [40.0, 10.0, 240.0, 150.0], "score": 0.7}  # 200 of 300 px wide
    item = {"category": "shoes", "box": [10.0, 10.0, 100.0, 90.0], "score": 0.9}
    assert np.array_equal(detect.embed_input(img, shot, cfg, 224), imaging.preprocess(img, 224))
    white = detect.crop_input(img, item["box"], 0.1, 224, "white")  # the default crop_backdrop
    assert np.array_equal(detect.embed_input(img, item, cfg, 224), white)
    as_cut = cfg.model_copy(update={"crop_backdrop": "as_is"})
    assert np.array_equal(detect.embed_input(img, item, as_cut, 224), detect.crop_input(img, item["box"], 0.1, 224))
    never = cfg.model_copy(update={"whole_photo_share": None})
    assert np.array_equal(detect.embed_input(img, shot, never, 224),
                          detect.crop_input(img, shot["box"], 0.1, 224, "white"))
    # the service's whole-photo input is the catalog's: as decoded when embedded whole, from the
    # detect stage's decoded image when the pipeline detects
    assert np.array_equal(detect.whole_photo(img, cfg.model_copy(update={"catalog": False}), 224),
                          imaging.preprocess(img, 224))
    staged = Image.fromarray(imaging.fit(img, cfg.image_size))
    assert np.array_equal(detect.whole_photo(img, cfg.model_copy(update={"catalog": True, "detector": "shipped"}), 224),
                          imaging.preprocess(staged, 224))


def test_a_crop_on_a_tinted_backdrop_becomes_its_white_catalog_shot():
    """An item photographed on a tinted backdrop, cropped with its backdrop made white, is its
    catalog shot again (within rounding) and embeds closer to it than the crop as cut; a dark
    backdrop is left alone."""
    from engine import imaging, sample
    from engine.embed import Embedder

    items, _ = sample.load()
    shot = sample.render(items[outfits.HELD_OUT_FROM + 1])  # dark on white, as the catalog shows it
    tint = np.array([210.0, 180.0, 140.0])
    photo = np.ones((300, 300, 3)) * tint
    photo[60:172, 90:202] = tint * (np.asarray(shot, np.float32) / 255.0)  # the same item lit on the tint
    img = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    box = [90.0, 60.0, 202.0, 172.0]
    catalog = imaging.preprocess(shot, 224)
    white, as_cut = detect.crop_input(img, box, 0.0, 224, "white"), detect.crop_input(img, box, 0.0, 224)
    assert np.abs(white.astype(int) - catalog).max() <= 4
    assert np.abs(as_cut.astype(int) - catalog).mean() > 40
    emb = Embedder(config.load(None, []).embed, device="cpu")
    v = emb(np.stack([catalog, white, as_cut]))
    assert v[0] @ v[1] > 0.97 and v[0] @ v[1] > v[0] @ v[2] + 0.02, (v[0] @ v[1], v[0] @ v[2])

    dark = Image.fromarray((np.asarray(img, np.float32) * 0.25).astype(np.uint8))  # backdrop (52, 45, 35)
    crop = dark.crop(detect.padded(box, 0.0, dark.size))
    assert np.array_equal(np.asarray(detect.backdrop_to_white(crop)), np.asarray(crop))
    assert config.load(None, []).detect.crop_backdrop == "white"
