"""Region feature extraction speed: our resnet50-FPN extraction against stock torchvision Faster R-CNN inference.

Both sides get the same images at the same resolution in the same run, with random weights (nothing can be
downloaded) and the same batch size:

- stock: ``torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` in eval mode
  under ``torch.inference_mode()``, fp32, its default 1000 proposals per image; it returns detections only;
- ours: ``configs/detector-resnet50.yaml`` (timm resnet50 + FPN, 2048-d region features) through the code path
  ``vl-regions extract`` runs per batch (``region_features.extract.extract_batch``): a fixed K boxes per image with
  their features, class distributions and attributes, turned into fp16 store records. Levers: bf16 autocast
  (AVX-512 bf16 / AMX), channels-last convolutions, batch norms folded into the convolutions, inference mode, 300
  proposals (bottom-up attention's count), no mask/keypoint work;
- bottom-up attention's own layout (``configs/detector-butd-r101.yaml``: ResNet-101 C4, res5 on each of 300
  proposals, 1,600 classes and 400 attributes) through the same code path as ours.

Images are made at the model's input size (``--size`` shorter side, 4:3), so neither side spends time resizing.
Achieved GFLOP/s counts each side's convolutions and matmuls (``torch.utils.flop_counter``) over its measured time,
reported as a fraction of this machine's measured matmul peak (a large fp32 and bf16 matmul timed in this run).

    .venv/bin/python bench/extract.py [--images 4] [--batch-size 2] [--size 480] [--num-boxes 36]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


from region_features.detector import BoxSelection, RegionDetector
from region_features.extract import extract_batch
from region_features.images import ProblemLog
from region_features.runs import read_detector_config
from vl.precision import bf16_native, machine_info, resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def make_images(count: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """uint8 (3, H, W) images: smooth noise with a few bright rectangles."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        base = torch.rand(3, height // 16, width // 16, generator=generator)
        image = torch.nn.functional.interpolate(base[None], size=(height, width), mode="bilinear")[0]
        for _ in range(6):
            y, x = int(torch.randint(0, height - 40, (1,), generator=generator)), int(
                torch.randint(0, width - 40, (1,), generator=generator))
            image[:, y : y + 40 + int(torch.randint(0, 120, (1,), generator=generator)), x : x + 60] = torch.rand(
                3, 1, 1, generator=generator)
        images.append((image * 255).to(torch.uint8))
    return images


def time_batches(run_batch, batches: list, repeats: int) -> float:
    """Best-of-``repeats`` seconds for one pass over ``batches`` (after one warm-up batch)."""
    run_batch(batches[0])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            run_batch(batch)
        best = min(best, time.perf_counter() - started)
    return best


def count_flops(run_batch, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_batch(batch)
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large square matmul in ``dtype`` (best of ``repeats``)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=480, help="shorter image side; both models run at it")
    parser.add_argument("--num-boxes", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="ours")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    height, width = args.size, args.size * 4 // 3
    max_size = max(width, int(round(args.size * 1333 / 800)))
    images = make_images(args.images, height, width)
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]

    # stock torchvision
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    stock = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=args.size, max_size=max_size).eval()

    def run_stock(batch):
        with torch.inference_mode():
            return stock([image.float() / 255.0 for image in batch])

    # ours
    resnet50 = read_detector_config(ROOT / "configs" / "detector-resnet50.yaml")
    detector_cfg = dataclasses.replace(resnet50, num_classes=90, num_attributes=0, min_size=args.size,
                                       max_size=max_size)
    ours = RegionDetector(detector_cfg).eval().fold_batch_norms().use_channels_last()  # as vl-regions extract does
    precision = resolve_precision(args.precision, "cpu", what="--precision")
    selection = BoxSelection(num_boxes=args.num_boxes)
    problems = ProblemLog()

    def samples_of(batch):
        return [{"image_id": i, "path": f"bench-{i}", "image": image, "orig_size": (height, width),
                 "scale": torch.ones(4)} for i, image in enumerate(batch)]

    sample_batches = [samples_of(batch) for batch in batches]

    def run_ours(samples, mode=precision, model=ours):
        records = extract_batch(model, samples, selection, None, mode, problems)
        assert all(record["features"].shape == (args.num_boxes, model.feature_dim) for record in records)
        return records

    # bottom-up attention's own layout: ResNet-101 C4, 1,600 classes and 400 attributes (Visual Genome)
    butd = read_detector_config(ROOT / "configs" / "detector-butd-r101.yaml")
    c4 = RegionDetector(dataclasses.replace(butd, num_classes=1600, num_attributes=400, min_size=args.size,
                                            max_size=max_size)).eval().fold_batch_norms().use_channels_last()

    def run_c4(samples, mode=precision):
        return run_ours(samples, mode, c4)

    stock_seconds = time_batches(run_stock, batches, args.repeats)
    ours_seconds = time_batches(run_ours, sample_batches, args.repeats)
    c4_seconds = time_batches(run_c4, sample_batches, args.repeats)
    stock_flops = sum(count_flops(run_stock, batch) for batch in batches)
    ours_flops = sum(count_flops(lambda s: run_ours(s, "fp32"), samples) for samples in sample_batches)
    c4_flops = sum(count_flops(lambda s: run_c4(s, "fp32"), samples) for samples in sample_batches)
    peak_fp32 = matmul_peak(torch.float32)
    peak_bf16 = matmul_peak(torch.bfloat16) if bf16_native() else None
    ours_peak = peak_bf16 if precision == "bf16" and peak_bf16 else peak_fp32
    stock_ips = len(images) / stock_seconds
    ours_ips = len(images) / ours_seconds
    result = {
        "bench": "extract",
        "images": len(images),
        "image_size": [height, width],
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "num_boxes": args.num_boxes,
        "feature_dim": ours.feature_dim,
        "ours_precision": precision,
        "stock_images_per_s": round(stock_ips, 3),
        "ours_images_per_s": round(ours_ips, 3),
        "speedup": round(ours_ips / stock_ips, 3),
        "stock_gflop_per_image": round(stock_flops / len(images) / 1e9, 2),
        "ours_gflop_per_image": round(ours_flops / len(images) / 1e9, 2),
        "stock_gflop_per_s": round(stock_flops / stock_seconds / 1e9, 1),
        "ours_gflop_per_s": round(ours_flops / ours_seconds / 1e9, 1),
        "peak_fp32_gflop_per_s": round(peak_fp32, 1),
        "peak_bf16_gflop_per_s": round(peak_bf16, 1) if peak_bf16 else None,
        "stock_fraction_of_fp32_peak": round(stock_flops / stock_seconds / 1e9 / peak_fp32, 3),
        "ours_fraction_of_peak": round(ours_flops / ours_seconds / 1e9 / ours_peak, 3),
        "c4_images_per_s": round(len(images) / c4_seconds, 3),
        "c4_vs_stock": round(stock_seconds / c4_seconds, 3),
        "c4_gflop_per_image": round(c4_flops / len(images) / 1e9, 2),
        "c4_fraction_of_peak": round(c4_flops / c4_seconds / 1e9 / ours_peak, 3),
    }
    print(f"stock torchvision: {stock_ips:.2f} images/s; ours ({precision}, features included): {ours_ips:.2f} "
          f"images/s; {result['speedup']}x; bottom-up attention's ResNet-101 C4: {result['c4_images_per_s']:.2f} "
          f"images/s", file=sys.stderr)
    print(json.dumps({**result, **machine_info()}))
    return result


if __name__ == "__main__":
    main()
