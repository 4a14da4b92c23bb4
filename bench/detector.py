"""Detector benchmark: mAP@0.5 of the shipped detector on held-out outfit composites.

    python bench/detector.py [--weights PATH_OR_URI] [--composites 300]

Composites are made from Fashion-MNIST items the training never saw (engine/outfits.py,
``HELD_OUT_FROM``). Prints one JSON object with ``"bench": "detector"``, ``map50`` and AP per class,
and the detector's images/s on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import detector  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="default: the shipped engine/weights/detector-outfits-v1.pt")
    ap.add_argument("--composites", type=int, default=300)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = detector.load(args.weights)
    t0 = time.perf_counter()
    result = detector.evaluate(model, args.composites)
    seconds = time.perf_counter() - t0
    print(json.dumps({"bench": "detector", "weights": str(args.weights or detector.SHIPPED), **result,
                      "target_map50": 0.7, "meets_target": result["map50"] >= 0.7,
                      "img_per_s": round(args.composites / seconds, 1), "cpus": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
