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
