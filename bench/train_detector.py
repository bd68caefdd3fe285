"""Detector learnability: train the CPU-sized detector (configs/detector-tiny.yaml) on the generated world and
evaluate it on held-out images.

    .venv/bin/python bench/train_detector.py [--world DIR] [--out RUN] [--set train.steps=...]

It generates the world when ``--world`` does not hold one (``vl generate-world --train 1000 --val 100 --test 100
--size 128``), runs ``vl-regions train`` on its train split with the val split for ``metrics.json``, then evaluates
the test split (never seen in training or model selection): COCO mAP, mAP@0.5 and attribute accuracy against
chance. Acceptance: mAP@0.5 >= 0.8 on the test split, attribute accuracy well above chance. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import torch

from region_features.coco import read_instances
from region_features.evaluate import evaluate_detector
from region_features.runs import load_detector
from vl.train.detector import train_detector
from vl.world.dataset import WorldConfig, generate_world, load_world
from vl.precision import machine_info

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="/tmp/vl-world-128", help="generated world (made here when missing)")
    parser.add_argument("--out", default="/tmp/vl-detector-tiny", help="run directory (resumed when it exists)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "detector-tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="k=v")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)

    world_root = Path(args.world)
    started = time.time()
    if (world_root / "world.json").is_file():
        world = load_world(world_root)
    else:
        world = generate_world(world_root, WorldConfig(seed=0, train=args.train, val=100, test=100, size=args.size))
    world_seconds = time.time() - started

    started = time.time()
    val_metrics = train_detector(world.instances("train"), world.images_dir("train"), args.out,
                                 world.instances("val"), world.images_dir("val"), args.config, args.overrides)
    train_seconds = time.time() - started

    model, labels = load_detector(args.out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    test = evaluate_detector(model, read_instances(world.instances("test")), world.images_dir("test"), labels,
                             batch_size=16)
    result = {
        "bench": "train_detector",
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "overrides": args.overrides,
        "train_images": len(read_instances(world.instances("train")).images),
        "steps": val_metrics.get("step"),
        "train_seconds": round(train_seconds, 1),
        "world_seconds": round(world_seconds, 1),
        "test_images": test["images"],
        "test_mAP": test["mAP"],
        "test_mAP@0.5": test["mAP@0.5"],
        "test_attr_accuracy": test.get("attr_accuracy"),
        "test_attr_top1": test.get("attr_top1"),
        "attr_chance": test.get("attr_chance"),
        "val_mAP@0.5": val_metrics.get("mAP@0.5"),
        "passes": bool(test["mAP@0.5"] >= 0.8 and test.get("attr_accuracy", 0) > 2 * test.get("attr_chance", 1)),
    }
    print(json.dumps({**result, **machine_info()}))
    return result


if __name__ == "__main__":
    main()
