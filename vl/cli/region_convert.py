"""``vl-regions convert``: import a feature store from lxmert-tsv / npz-dir, or export one to them (contract:
docs/cli.md)."""

from __future__ import annotations

import argparse

from region_features.convert import FORMATS, read_names
from region_features.convert_lxmert import export_lxmert_tsv, import_lxmert_tsv
from region_features.convert_npz import export_npz_dir, import_npz_dir
from region_features.images import ProblemLog
from region_features.store_writer import DEFAULT_SHARD_BYTES
from vl.errors import UserError

IMPORTERS = {"lxmert-tsv": import_lxmert_tsv, "npz-dir": import_npz_dir}
EXPORTERS = {"lxmert-tsv": export_lxmert_tsv, "npz-dir": export_npz_dir}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="import a feature store from lxmert-tsv / npz-dir, or export one to them",
        description=(
            "Import: vl-regions convert --from FORMAT IN --out STORE. "
            "Export: vl-regions convert STORE --to FORMAT OUT. "
            f"Formats: {', '.join(FORMATS)}. Bad rows or files are warned about (with the line number) and skipped."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="IN (with --from), or STORE (with --to)")
    parser.add_argument("--from", dest="from_format", choices=FORMATS, help="import from this format into --out STORE")
    parser.add_argument(
        "--to",
        dest="to_format",
        nargs="+",
        metavar="FORMAT",
        help=f"FORMAT [OUT]: export STORE to this format ({', '.join(FORMATS)}), into OUT or --out",
    )
    parser.add_argument("--out", help="the STORE to write (import) or the OUT file/directory (export)")
    parser.add_argument("--num-classes", type=int, help="object classes (default: names file, existing store, or 1600)")
    parser.add_argument("--num-attributes", type=int, help="attributes (default: names file, existing store, or 400)")
    parser.add_argument("--class-names", metavar="FILE", help="one class name per line (e.g. objects_vocab.txt)")
    parser.add_argument("--attribute-names", metavar="FILE", help="one attribute name per line (attributes_vocab.txt)")
    parser.add_argument(
        "--keep-ids",
        action="store_true",
        help="keep image ids verbatim as strings (default: the id's trailing number, COCO_val2014_000000000042 -> 42)",
    )
    parser.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20, help="store shard size in MiB")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    if (args.from_format is None) == (args.to_format is None):
        raise UserError("give exactly one of --from FORMAT (import into --out STORE) or --to FORMAT (export STORE)")
    problems = ProblemLog()
    if args.from_format is not None:
        if len(args.paths) != 1:
            raise UserError(
                f"--from {args.from_format} takes one input: vl-regions convert --from FORMAT IN --out STORE"
            )
        if not args.out:
            raise UserError(f"--from {args.from_format} needs --out STORE")
        if args.shard_mb < 1:
            raise UserError(f"--shard-mb must be at least 1, got {args.shard_mb}")
        stats = IMPORTERS[args.from_format](
            args.paths[0],
            args.out,
            num_classes=args.num_classes,
            num_attributes=args.num_attributes,
            class_names=read_names(args.class_names, "--class-names"),
            attribute_names=read_names(args.attribute_names, "--attribute-names"),
            keep_ids=args.keep_ids,
            problems=problems,
            shard_bytes=args.shard_mb << 20,
        )
        print(
            f"imported {stats.converted} images into {args.out} "
            f"({stats.skipped} already there, {stats.bad} skipped as bad); {problems.summary()}"
        )
        return 0
    to_format, *rest = args.to_format
    if to_format not in FORMATS:
        raise UserError(f"--to {to_format}: unknown format; choose from {', '.join(FORMATS)}")
    outputs = rest + ([args.out] if args.out else []) + args.paths[1:]
    if len(outputs) != 1:
        raise UserError(f"--to {to_format} takes STORE and one OUT: vl-regions convert STORE --to FORMAT OUT")
    store_path, out = args.paths[0], outputs[0]
    count = EXPORTERS[to_format](store_path, out)
    print(f"exported {count} images from {store_path} to {out} ({to_format})")
    return 0
