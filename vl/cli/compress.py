"""``vl quantize RUN --out RUN_INT8``: dynamic int8 quantization of a fine-tuned VQA or retrieval run."""

from __future__ import annotations

import argparse


def _quantize(args: argparse.Namespace) -> int:
    from vl.compress.quantize import describe, quantize_run

    info = quantize_run(args.run, args.out)
    print(f"wrote {args.out}: {describe(info)}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help="int8 linear layers of a fine-tuned VQA or retrieval run",
        description="Quantize every linear layer of a fine-tuned VQA or retrieval run to int8 (PyTorch's dynamic "
                    "quantization: per-channel int8 weights, activations quantized per batch). The new run "
                    "directory says so in quantization.json; vl predict, vl evaluate, vl vqa and vl serve load it.")
    parser.add_argument("run", metavar="RUN", help="fine-tuned VQA or retrieval run directory")
    parser.add_argument("--out", required=True, metavar="RUN_INT8", help="the int8 run directory to write")
    parser.set_defaults(func=_quantize)
