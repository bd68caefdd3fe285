"""``vl serve``: the retrieval demo page on localhost."""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from vl.serve.app import RetrievalService, serve

    service = RetrievalService(args.run, args.karpathy, args.split, args.features, args.images, args.k,
                               args.max_images)
    serve(service, args.host, args.port, args.quiet)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the image-text retrieval demo page",
        description="Serve a web page where a caption finds the split's best-matching images and a click on an "
                    "image shows its best-matching captions. Everything is loaded and embedded once at start-up; "
                    "each query runs the cheap first stage and re-ranks its top --k by the full ITM score. Stop "
                    "with Ctrl-C.")
    parser.add_argument("--run", required=True, metavar="RUN", help="retrieval run directory (vl finetune retrieval)")
    parser.add_argument("--karpathy", required=True, metavar="K.json", help="Karpathy split JSON")
    parser.add_argument("--split", default="test", help="split to search (default test)")
    parser.add_argument("--features", required=True, metavar="STORE", help="region feature store directory")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="image root: files are found at DIR/filepath/filename or DIR/filename")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--k", type=int, metavar="K", help="first-stage candidates re-ranked per query "
                                                           "(default: the run's retrieval.rerank_k)")
    parser.add_argument("--max-images", type=int, metavar="N", help="serve only the split's first N images")
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    parser.set_defaults(func=_serve)
