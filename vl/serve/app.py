"""The retrieval demo (``vl serve``): one static page and a small JSON API on the standard library's HTTP server.

At start-up the service loads a retrieval run, reads the split's captions and regions into memory and computes every
first-stage embedding once (``vl.tasks.retrieval.index.RetrievalIndex``). Then:

=====================================  =========================================================================
``GET /``                              the page (``index.html``)
``GET /api/info``                      ``{"split", "num_images", "num_captions", "k", "pair_score", ...}``
``POST /api/search`` ``{"q", "top"}``  the top images for a caption: ``{"query", "results": [{"image_id",
(or ``GET /api/search?q=..&top=..``)   "url", "score", "similarity"}], "ms"}``; the first-stage top ``k`` are
                                       re-ranked by the full model's pair score
``GET /api/captions?image_id=&top=``   the top captions of the split for one image: ``{"image_id", "url",
                                       "captions": [{"sentid", "text", "score", "similarity", "matches"}], "ms"}``
``GET /images/<image_id>``             the image file, looked up by id among the split's images (never a path
                                       taken from the request)
=====================================  =========================================================================

A bad request (empty, over ``MAX_QUERY_CHARS`` characters, not printable ASCII, an unknown image id, a malformed
body) gets status 400 (404 for unknown paths and ids) and ``{"error": "<a sentence saying what to fix>"}``.
"""

from __future__ import annotations

import json
import mimetypes
import os
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import torch

from vl.data.formats import read_karpathy
from vl.errors import UserError

MAX_QUERY_CHARS = 500
MAX_TOP = 50
MAX_BODY_BYTES = 64 * 1024
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp"}


class BadRequest(Exception):
    """A request the service refuses, with the status and the message the page shows."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def check_query(text: Any) -> str:
    """The caption to search for, stripped; BadRequest with a clear message when it is unusable."""
    if not isinstance(text, str):
        raise BadRequest("The query must be a string of text.")
    text = text.strip()
    if not text:
        raise BadRequest("Type a caption to search for, e.g. \"a red circle\".")
    if len(text) > MAX_QUERY_CHARS:
        raise BadRequest(f"The query is too long: {len(text):,} characters (at most {MAX_QUERY_CHARS}).")
    for position, char in enumerate(text):
        if not (" " <= char <= "~"):
            shown = repr(char) if char.isprintable() else f"U+{ord(char):04X}"
            raise BadRequest(f"The query must be plain ASCII text: {shown} at position {position + 1} is not. "
                             "Use English letters, digits and punctuation.")
    return text


def parse_top(value: Any, default: int = 10) -> int:
    if value is None or value == "":
        return default
    try:
        top = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"'top' must be a whole number, got {str(value)[:20]!r}.") from None
    if not 1 <= top <= MAX_TOP:
        raise BadRequest(f"'top' must be between 1 and {MAX_TOP}, got {top}.")
    return top


class RetrievalService:
    """A retrieval run over one Karpathy split, loaded once; ``search`` and ``captions`` answer the page's queries.

    Model calls are serialised by a lock (the HTTP server answers each request in its own thread).
    """

    def __init__(self, run_dir: str | os.PathLike, karpathy: str | os.PathLike, split: str,
                 features: str | os.PathLike, images_dir: str | os.PathLike, k: int | None = None,
                 max_images: int | None = None, progress: bool | None = None):
        from vl.tasks.retrieval.data import load_split
        from vl.tasks.retrieval.index import RetrievalIndex
        from vl.tasks.retrieval.model import RETRIEVAL_RUN
        from vl.tasks.runs import load_task_run
        from vl.tasks.vl_finetune import check_store, open_store

        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise UserError(f"--images directory not found: {images_dir}")
        if k is not None and k < 1:
            raise UserError(f"--k must be >= 1, got {k}")
        model, run, tokenizer = load_task_run(run_dir, RETRIEVAL_RUN)
        store = open_store(features)
        check_store(store, run.model)
        started = time.perf_counter()
        self.split_name = split
        self.split = load_split(karpathy, split, store, max_images)
        self.index = RetrievalIndex(model, tokenizer, self.split, store, run.settings, progress=progress)
        self.k = k or run.settings.rerank_k
        self.load_seconds = time.perf_counter() - started
        self.position = {str(image_id): index for index, image_id in enumerate(self.split.image_ids)}
        self.image_files = self._image_files(karpathy, split, images_dir)
        self.lock = threading.Lock()
        missing = sum(path is None for path in self.image_files)
        if missing:
            print(f"serve: warning: {missing} of {len(self.image_files)} images of split {split} are not under "
                  f"--images {images_dir} (shown without a picture)", file=sys.stderr)

    def _image_files(self, karpathy: str | os.PathLike, split: str, images_dir: Path) -> list[Path | None]:
        """The file of every split image: DIR/filepath/filename, else DIR/filename (resolved inside DIR)."""
        entries = {image.image_id: image for image in read_karpathy(karpathy, split)}
        root = images_dir.resolve()
        files: list[Path | None] = []
        for image_id in self.split.image_ids:
            entry = entries[image_id]
            found = None
            for candidate in (root / entry.filepath / entry.filename, root / entry.filename):
                resolved = candidate.resolve()
                if resolved.is_file() and resolved.is_relative_to(root):
                    found = resolved
                    break
            files.append(found)
        return files

    def image_url(self, image_index: int) -> str | None:
        return f"/images/{self.split.image_ids[image_index]}" if self.image_files[image_index] else None

    def info(self) -> dict[str, Any]:
        return {"split": self.split_name, "num_images": len(self.split.image_ids),
                "num_captions": len(self.split.texts), "k": self.k, "pair_score": self.index.pair_score,
                "max_query_chars": MAX_QUERY_CHARS}

    def search(self, query: Any, top: Any = None) -> dict[str, Any]:
        text, count = check_query(query), parse_top(top)
        started = time.perf_counter()
        with self.lock, torch.no_grad():
            results = self.index.search(text, count, self.k)
        return {"query": text, "ms": round(1000 * (time.perf_counter() - started), 1),
                "results": [{"image_id": item["image_id"], "url": self.image_url(item["image_index"]),
                             "score": item["score"], "similarity": item["similarity"]} for item in results]}

    def captions(self, image_id: Any, top: Any = None) -> dict[str, Any]:
        if image_id is None or str(image_id).strip() == "":
            raise BadRequest("Give the image_id of an image of the split.")
        key = str(image_id).strip()
        if key not in self.position:
            raise BadRequest(f"No image with id {key[:40]!r} in the {self.split_name} split.", HTTPStatus.NOT_FOUND)
        index, count = self.position[key], parse_top(top)
        started = time.perf_counter()
        with self.lock, torch.no_grad():
            captions = self.index.captions_for_image(index, count, self.k)
        return {"image_id": self.split.image_ids[index], "url": self.image_url(index),
                "ms": round(1000 * (time.perf_counter() - started), 1),
                "captions": [{"sentid": item["sentid"], "text": item["text"], "score": item["score"],
                              "similarity": item["similarity"], "matches": item["matches"]} for item in captions]}

    def image_file(self, image_id: str) -> Path:
        index = self.position.get(image_id)
        if index is None or self.image_files[index] is None:
            raise BadRequest(f"No image file for id {image_id[:40]!r}.", HTTPStatus.NOT_FOUND)
        return self.image_files[index]


def page_html() -> bytes:
    return resources.files("vl.serve").joinpath("index.html").read_bytes()


def make_handler(service: RetrievalService, quiet: bool = False) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to ``service``."""
    page = page_html()

    class Handler(BaseHTTPRequestHandler):
        server_version = "vl-serve/1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            if not quiet:
                super().log_message(format, *args)

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"), "application/json; charset=utf-8")

        def _answer(self, work) -> None:
            try:
                self._json(HTTPStatus.OK, work())
            except BadRequest as err:
                self._json(err.status, {"error": str(err)})
            except Exception as err:  # noqa: BLE001 - a bug must not kill the server; the page shows a message
                print(f"serve: error on {self.path[:200]}: {type(err).__name__}: {err}", file=sys.stderr)
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "Something went wrong on the server; "
                                                                       "see its log."})

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlsplit(self.path)
            params = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif url.path == "/api/info":
                self._answer(service.info)
            elif url.path == "/api/search":
                self._answer(lambda: service.search(params.get("q", ""), params.get("top")))
            elif url.path == "/api/captions":
                self._answer(lambda: service.captions(params.get("image_id"), params.get("top")))
            elif url.path.startswith("/images/"):
                self._image(unquote(url.path[len("/images/"):]))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"No page at {url.path[:80]}."})

        do_HEAD = do_GET  # noqa: N815

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            if url.path != "/api/search":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"No endpoint at {url.path[:80]}."})
                return
            self._answer(lambda: service.search(*self._search_body()))

        def _search_body(self) -> tuple[Any, Any]:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                raise BadRequest("The request has a malformed Content-Length.") from None
            if length > MAX_BODY_BYTES:
                self.rfile.read(min(length, 16 * MAX_BODY_BYTES))
                raise BadRequest(f"The query is too long (the request has {length:,} bytes; a query may have at "
                                 f"most {MAX_QUERY_CHARS} characters).", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            raw = self.rfile.read(length) if length > 0 else b""
            try:
                body = json.loads(raw.decode("utf-8")) if raw else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BadRequest("The request body must be JSON: {\"q\": \"a caption\"}.") from None
            if not isinstance(body, dict):
                raise BadRequest("The request body must be a JSON object: {\"q\": \"a caption\"}.")
            return body.get("q", ""), body.get("top")

        def _image(self, image_id: str) -> None:
            try:
                path = service.image_file(image_id)
            except BadRequest as err:
                self._json(err.status, {"error": str(err)})
                return
            content_type = IMAGE_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] \
                or "application/octet-stream"
            self._send(HTTPStatus.OK, path.read_bytes(), content_type)

    return Handler


def serve(service: RetrievalService, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
          ready: threading.Event | None = None) -> None:
    """Serve until interrupted; prints ``serving on http://HOST:PORT/`` (the real port when ``port`` is 0)."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(service, quiet))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    print(f"serving on http://{bound_host}:{bound_port}/ ({len(service.split.image_ids)} images, "
          f"{len(service.split.texts)} captions of split {service.split_name}; loaded in "
          f"{service.load_seconds:.1f} s)", flush=True)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    finally:
        server.server_close()
