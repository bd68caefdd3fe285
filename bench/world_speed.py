"""Generation speed of the generated world, on one core.

    .venv/bin/python bench/world_speed.py [--images 500 --size 224]

Times (1) rendering alone: scene sampling, drawing and JPEG encoding in this process, and (2) ``generate_world``
end to end: rendering plus captions, questions and writing every format (images, COCO, Karpathy, VQA, shards,
corpus). Prints one JSON line with images per second of wall time and of CPU time (the machine may be shared) for
both; the target is >= 100 images/s at 224 px.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


from vl.world.dataset import WorldConfig, generate_world, measure_speed
from vl.precision import machine_info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says
    render = measure_speed(args.images, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        test = max(1, args.images // 10)
        cfg = WorldConfig(seed=0, train=args.images - 2 * test, val=test, test=test, size=args.size)
        start, cpu_start = time.perf_counter(), time.process_time()
        generate_world(Path(tmp) / "world", cfg, progress=False)
        end_to_end, end_to_end_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({
        "bench": "world_speed", "size": args.size, "images": args.images,
        "render_images_per_s": render["images_per_s"], "render_images_per_cpu_s": render["images_per_cpu_s"],
        "mean_jpeg_kb": render["mean_jpeg_kb"],
        "generate_world_images_per_s": round(args.images / end_to_end, 1),
        "generate_world_images_per_cpu_s": round(args.images / end_to_end_cpu, 1),
        "target_images_per_s": 100,
        **machine_info(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
