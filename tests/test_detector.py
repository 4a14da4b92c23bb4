"""The shipped detector on outfit photos it never saw, and the plumbing around it."""
import numpy as np
import pytest

from engine import detector, outfits


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(2)
    return detector.load()


@pytest.fixture(scope="module")
def held_out():
    return outfits.dataset(24, seed=2026, held_out=True)


def test_composites_have_ground_truth_and_never_share_items():
    items, cats, train, test = outfits.item_pools()
    assert not set(train) & set(test) and len(train) + len(test) == len(items)
    for img, boxes, labels in outfits.dataset(10, seed=1, held_out=True):
        assert img.size == (outfits.CANVAS, outfits.CANVAS) and len(boxes) == len(labels) >= 1
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= outfits.CANVAS).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all() and set(labels) <= {1, 2, 3, 4, 5}
    a, b = outfits.dataset(2, seed=5, held_out=False), outfits.dataset(2, seed=5, held_out=False)
    assert np.array_equal(np.asarray(a[1][0]), np.asarray(b[1][0]))  # reproducible from the seed


def test_map50_scores_perfect_wrong_and_missing_answers():
    boxes = np.array([[0, 0, 50, 50], [100, 100, 200, 180]], np.float32)
    truth = [(boxes, np.array([1, 4]))]
    perfect = [[{"category": "tops", "box": [0, 0, 50, 50], "score": 0.9},
                {"category": "shoes", "box": [102, 98, 200, 182], "score": 0.8}]]
    assert detector.map50(perfect, truth)["map50"] == 1.0
    wrong_class = [[{**perfect[0][0], "category": "bags"}, perfect[0][1]]]
    assert detector.map50(wrong_class, truth)["ap50"] == {"tops": 0.0, "shoes": 1.0}
    shifted = [[{**perfect[0][0], "box": [30, 30, 80, 80]}, perfect[0][1]]]  # IoU 0.22 < 0.5
    assert detector.map50(shifted, truth)["ap50"]["tops"] == 0.0


def test_shipped_weights_find_unseen_items_in_place_with_their_category(model, held_out):
    preds = detector.detect(model, [im for im, _, _ in held_out])
    found = total = 0
    for objs, (_, boxes, labels) in zip(preds, held_out):
        for box, label in zip(boxes, labels):
            total += 1
            same = [o for o in objs if o["category"] == outfits.CLASSES[label - 1]]
            if same:
                iou = detector._box_iou(np.asarray([box]), np.asarray([o["box"] for o in same], np.float32))
                found += iou.max() >= 0.5
    assert total >= 40 and found / total >= 0.8, (found, total)
    assert detector.map50(preds, [(b, l) for _, b, l in held_out])["map50"] >= 0.6


def test_a_file_that_is_not_this_detector_is_refused(tmp_path):
    import torch

    bad = tmp_path / "not-a-detector.pt"
    torch.save({"head.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a detector of this architecture"):
        detector.load(bad)
    with pytest.raises(FileNotFoundError):
        detector.load(tmp_path / "missing.pt")


def test_a_missing_detector_file_is_a_config_error_before_the_service_starts(tmp_path):
    from engine import config
    from serve import app

    cfg = config.load(None, [f"detect.detector={tmp_path}/no-such-detector.pt"])
    with pytest.raises(config.ConfigError, match="detect.detector: no such file"):
        app.build_app(cfg)


def test_boxes_of_different_categories_on_one_item_become_one_object_with_alternatives():
    from engine import detect

    pullover = [40.0, 40.0, 140.0, 150.0]
    found = [{"category": "tops", "box": pullover, "score": 0.81},
             {"category": "bags", "box": [45.0, 60.0, 130.0, 150.0], "score": 0.52},  # mostly inside: same item
             {"category": "dresses", "box": [38.0, 42.0, 141.0, 152.0], "score": 0.40},  # IoU ~0.95
             {"category": "bags", "box": [41.0, 40.0, 139.0, 148.0], "score": 0.20},  # bags already listed
             {"category": "shoes", "box": [180.0, 200.0, 240.0, 240.0], "score": 0.70}]  # another item
    kept = detect.one_per_item(found)
    assert [(o["category"], o["score"]) for o in kept] == [("tops", 0.81), ("shoes", 0.70)]
    assert kept[0]["alternatives"] == [{"category": "bags", "score": 0.52}, {"category": "dresses", "score": 0.40}]
    assert kept[1]["alternatives"] == [] and kept[0]["box"] == pullover
    # two items side by side stay two objects, whatever their categories
    apart = detect.one_per_item([{"category": "shoes", "box": [0, 0, 50, 50], "score": 0.9},
                                 {"category": "shoes", "box": [45, 0, 95, 50], "score": 0.8}])
    assert len(apart) == 2


def test_an_uncertain_object_is_routed_to_its_top_categories():
    from engine import config, detect

    cfg = config.load(None, ["detect.uncertain_score=0.6", "detect.uncertain_margin=0.15", "detect.max_routes=2"]).detect
    sure = {"category": "tops", "score": 0.9, "alternatives": [{"category": "dresses", "score": 0.5}]}
    assert detect.routes(sure, cfg) == ["tops"]
    close = {"category": "tops", "score": 0.9, "alternatives": [{"category": "dresses", "score": 0.8}]}
    assert detect.routes(close, cfg) == ["tops", "dresses"]  # a small margin to the next category
    weak = {"category": "dresses", "score": 0.45, "alternatives": [{"category": "tops", "score": 0.2},
                                                                   {"category": "bags", "score": 0.1}]}
    assert detect.routes(weak, cfg) == ["dresses", "tops"]  # a low score: its best alternatives, max_routes in all
    wider = cfg.model_copy(update={"max_routes": 3})
    assert detect.routes(weak, wider) == ["dresses", "tops", "bags"]
    assert detect.routes({"category": "bags", "score": 0.4, "alternatives": []}, cfg) == ["bags"]


def test_per_item_counts_duplicates_and_false_positives():
    truth = [(np.array([[0, 0, 50, 50], [100, 100, 200, 200]], np.float32), np.array([1, 4]))]
    preds = [[{"category": "tops", "box": [0, 0, 50, 50], "score": 0.9},
              {"category": "bags", "box": [1, 1, 50, 50], "score": 0.5},  # a second object on the top
              {"category": "dresses", "box": [100, 100, 200, 200], "score": 0.6,
               "alternatives": [{"category": "shoes", "score": 0.3}]},
              {"category": "bags", "box": [220, 220, 250, 250], "score": 0.4}]]  # on nothing
    got = detector.per_item(preds, truth)
    assert got == {"objects_per_item": 2.0, "fp_per_photo": 1.0, "duplicates_per_item": 0.5, "items_found": 1.0,
                   "category": 0.5, "category_or_alt": 1.0}


def test_the_detector_gives_one_object_per_unseen_item(model, held_out):
    from engine import config, detect

    cfg = config.load(None, ["detect.detector=shipped"]).detect
    kept = detect.find(detect.load(cfg), cfg, [im for im, _, _ in held_out])
    got = detector.per_item(kept, [(b, l) for _, b, l in held_out])
    assert got["items_found"] >= 0.85 and got["duplicates_per_item"] <= 0.05, got
    assert got["objects_per_item"] <= 1.1 and got["category_or_alt"] >= got["category"] >= 0.8, got
    for objs in kept:
        for a in objs:
            assert all(not detect.same_item(a["box"], b["box"]) for b in objs if b is not a)
            assert a["score"] >= cfg.score_threshold and a["category"] not in {x["category"] for x in a["alternatives"]}


def test_routes_merge_with_the_best_matching_category_first():
    from engine import detect

    parts = [("dresses", ["d1", "d2", "d3"], [0.80, 0.79, 0.78]),
             ("tops", ["t1", "t2"], [0.95, 0.70]), ("tops", ["t3", "t4"], [0.90, 0.85])]  # two shards
    got = detect.merge_routes(parts, 5)  # tops' top 3 average 0.90 > dresses' 0.79: all of tops first
    assert [h["product_id"] for h in got] == ["t1", "t3", "t4", "t2", "d1"]
    assert [h["category"] for h in got] == ["tops"] * 4 + ["dresses"]
    assert detect.merge_routes(parts[:1], 2) == [{"product_id": "d1", "category": "dresses", "score": 0.8},
                                                 {"product_id": "d2", "category": "dresses", "score": 0.79}]
    assert detect.merge_routes([], 3) == []
