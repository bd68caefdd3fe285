"""``vl generate-world``: write the generated visual world in all the standard formats (see vl/world/dataset.py)."""

from __future__ import annotations

import argparse

from vl.world.dataset import SPLITS, WorldConfig, generate_world


def _generate(args: argparse.Namespace) -> int:
    cfg = WorldConfig(seed=args.seed, train=args.train, val=args.val, test=args.test, size=args.size,
                      shard_size=args.shard_size, questions_per_image=args.questions_per_image)
    paths = generate_world(args.out, cfg, force=args.force, progress=not args.quiet)
    counts = ", ".join(f"{split} {cfg.count(split)}" for split in SPLITS)
    print(f"wrote a {cfg.size}px world (seed {cfg.seed}; images: {counts}) to {paths.root}; manifest {paths.manifest}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate-world", help="write the generated visual world in the standard dataset formats",
        description="Render scenes of coloured shapes and write them as COCO instances and captions, a Karpathy "
                    "split, VQA v2 questions and annotations, webdataset shards and a text corpus. The same "
                    "arguments give byte-identical output.")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--train", type=int, required=True, metavar="N", help="number of training images")
    parser.add_argument("--val", type=int, required=True, metavar="N", help="number of validation images")
    parser.add_argument("--test", type=int, required=True, metavar="N", help="number of test images")
    parser.add_argument("--size", type=int, default=224, metavar="PX", help="image side in pixels (default 224)")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="K",
                        help="images per webdataset shard (default 1000)")
    parser.add_argument("--questions-per-image", type=int, default=6, metavar="Q",
                        help="VQA questions per image (default 6)")
    parser.add_argument("--force", action="store_true", help="replace a world already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_generate)
