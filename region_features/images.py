"""Reading users' image files robustly: odd modes are converted, bad files are warned about, never fatal.

``load_image(path)`` returns a ``LoadedImage`` (8-bit RGB PIL image or None, plus a warning naming what happened):

    grayscale (1, L, LA, I;16, I, F)  converted to RGB; 16-bit and 32-bit values are scaled to 8 bits
    RGBA, LA, PA, P with transparency  composited on white
    CMYK, YCbCr, LAB, HSV, P           converted to RGB
    corrupt or truncated files         image None (PIL's LOAD_TRUNCATED_IMAGES is never touched)
    tiny (a side < 16 px)              kept, with a warning
    very large (a side >= 10,000 px or more than 89 M pixels)  kept, decoded at reduced size when ``max_side``
                                       is given (JPEG ``draft``, then ``thumbnail``); beyond ``max_pixels`` refused

``ProblemLog`` prints one warning line per problem, naming the file, and counts problems per kind for the summary at
the end of a run. ``list_images`` walks a directory tree in sorted order, warning about unreadable subdirectories.
``ImageFileDataset`` decodes images in DataLoader workers; ``collate_image_items`` keeps a batch as lists.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch.utils.data
from PIL import Image

from vl.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TINY_SIDE = 16  # images with a side below this are warned about (kept)
LARGE_SIDE = 10_000  # images with a side at least this long are warned about
LARGE_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold
DEFAULT_MAX_PIXELS = 1 << 30  # refuse to decode more than this (about 3 GiB as RGB), after any draft reduction

# Warning kinds, in the order the summary lists them.
CORRUPT = "corrupt"
TRUNCATED = "truncated"
UNREADABLE = "unreadable"
TOO_LARGE = "too large"
GRAYSCALE = "grayscale"
SIXTEEN_BIT = "16-bit"
ALPHA = "alpha"
CMYK = "cmyk"
PALETTE = "palette"
OTHER_MODE = "other mode"
TINY = "tiny"
LARGE = "large"
DECODER = "decoder warning"
UNREADABLE_DIR = "unreadable directory"

_OPEN_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is a module global; only touched under this lock


class ImageWarning(str):
    """A warning message that also carries its ``kind`` (one of the kinds above), for ``ProblemLog.warn``."""

    kind: str

    def __new__(cls, kind: str, message: str) -> ImageWarning:
        obj = super().__new__(cls, message)
        obj.kind = kind
        return obj

    def __reduce__(self) -> tuple:
        return (ImageWarning, (self.kind, str(self)))


@dataclass(frozen=True)
class LoadedImage:
    """The result of ``load_image``: unpacks as ``image, warning = load_image(path)``.

    ``image`` is an 8-bit RGB PIL image or None (unusable file); ``warning`` an ``ImageWarning`` (a str with
    ``.kind``) or None; ``original_size`` the file's (width, height) before any ``max_side`` reduction, or None when
    unknown. Boxes found on a reduced image map back with ``original_size[0] / image.width``.
    """

    image: Image.Image | None
    warning: ImageWarning | None
    original_size: tuple[int, int] | None = None

    @property
    def kind(self) -> str | None:
        return None if self.warning is None else self.warning.kind

    def __iter__(self):
        return iter((self.image, self.warning))


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None, str | None]:
    """Convert any PIL mode to 8-bit RGB; return (image, kind, message) with kind None for plain RGB."""
    mode = image.mode
    if mode == "RGB":
        return image, None, None
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image)
        if mode == "F":
            finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            low, high = float(finite.min()), float(finite.max())
            scaled = (finite - low) * (255.0 / (high - low)) if high > low else np.zeros_like(finite)
            message = "32-bit float image (F) scaled to 8-bit RGB"
        elif mode.startswith("I;16"):
            scaled = values.astype(np.int64) >> 8
            message = f"16-bit grayscale image ({mode}) converted to 8-bit RGB"
        else:  # "I": 32-bit signed container, e.g. 16-bit PNG/TIFF grayscale in some PIL versions
            values = np.clip(values.astype(np.int64), 0, None)
            peak = int(values.max()) if values.size else 0
            scaled = values if peak <= 255 else values >> (8 if peak <= 65535 else 24)
            message = "integer grayscale image (I) converted to 8-bit RGB"
        gray = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB"), SIXTEEN_BIT, message
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), ALPHA, f"{mode} image composited on white"
    if mode in ("1", "L"):
        return image.convert("RGB"), GRAYSCALE, f"grayscale image ({mode}) converted to RGB"
    if mode == "CMYK":
        return image.convert("RGB"), CMYK, "CMYK image converted to RGB"
    if mode == "P":
        return image.convert("RGB"), PALETTE, "palette image converted to RGB"
    try:
        return image.convert("RGB"), OTHER_MODE, f"{mode} image converted to RGB"
    except ValueError:  # e.g. LAB has no direct path in older PIL
        return image.convert("RGBA").convert("RGB"), OTHER_MODE, f"{mode} image converted to RGB"


def load_image(
    path: str | os.PathLike,
    max_side: int | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Decode ``path`` to 8-bit RGB; never raises for a bad file (see the module docstring).

    ``max_side``: when given, an image longer than this on a side is reduced (aspect kept) while decoding, for
    pipelines that resize to at most ``max_side`` anyway (use the detector's largest input side). Decoding more than
    ``max_pixels`` pixels is refused with a warning.
    """
    path = Path(path)
    notes: list[tuple[str, str]] = []
    rgb: Image.Image | None = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _OPEN_LOCK:  # the bomb check is ours (below), so PIL's global limit is lifted only while opening
                saved_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    image = Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved_limit
            try:
                original_size = image.size
                width, height = original_size
                if width < 1 or height < 1:
                    return LoadedImage(None, ImageWarning(CORRUPT, f"image has size {width}x{height}"), original_size)
                if max_side is not None and max(width, height) > max_side and image.format == "JPEG":
                    scale = max_side / max(width, height)
                    image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
                if image.size[0] * image.size[1] > max_pixels:
                    return LoadedImage(
                        None,
                        ImageWarning(TOO_LARGE, f"image {width}x{height} has more than {max_pixels} pixels; skipped"),
                        original_size,
                    )
                image.load()
                rgb, kind, message = _to_rgb(image)
                if rgb is image and getattr(image, "fp", None) is not None:  # multi-frame files keep their file open
                    rgb = image.copy()
            finally:
                if rgb is not image:
                    image.close()
        if kind is not None:
            notes.append((kind, message))
        for item in caught:
            notes.append((DECODER, f"{item.category.__name__}: {item.message}"))
    except FileNotFoundError as err:
        return LoadedImage(None, ImageWarning(UNREADABLE, f"file not found ({err.strerror})"))
    except PermissionError as err:
        return LoadedImage(None, ImageWarning(UNREADABLE, f"cannot read file ({err.strerror})"))
    except IsADirectoryError:
        return LoadedImage(None, ImageWarning(UNREADABLE, "is a directory"))
    except Exception as err:  # PIL raises many types on bad data (OSError, SyntaxError, ValueError, struct.error)
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        kind = TRUNCATED if "truncated" in text.lower() else CORRUPT
        return LoadedImage(None, ImageWarning(kind, f"cannot decode image: {text}"))
    width, height = original_size
    if max(width, height) >= LARGE_SIDE or width * height > LARGE_PIXELS:
        notes.append((LARGE, f"very large image {width}x{height}"))
    if min(width, height) < TINY_SIDE:
        notes.append((TINY, f"tiny image {width}x{height}"))
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    if rgb.size != original_size and any(kind == LARGE for kind, _ in notes):
        notes.append((LARGE, f"decoded at {rgb.size[0]}x{rgb.size[1]}"))
    if not notes:
        return LoadedImage(rgb, None, original_size)
    message = "; ".join(dict.fromkeys(text for _, text in notes))
    return LoadedImage(rgb, ImageWarning(notes[0][0], message), original_size)


# ------------------------------------------------------------------------------------------------------ problem log


@dataclass
class ProblemLog:
    """Warns about bad inputs, one line each naming the file, and counts them per kind for the end-of-run summary.

    Lines go to ``stream`` (stderr by default) through ``tqdm.write`` so they do not break progress bars. With
    ``max_lines_per_kind``, further warnings of a kind are only counted.
    """

    prog: str = "vl-regions"
    stream: TextIO | None = None
    max_lines_per_kind: int | None = None
    counts: Counter = field(default_factory=Counter)

    def warn(self, kind: str, path: str | os.PathLike, message: str) -> None:
        self.counts[kind] += 1
        if self.max_lines_per_kind is not None and self.counts[kind] > self.max_lines_per_kind:
            if self.counts[kind] == self.max_lines_per_kind + 1:
                self._write(f"{self.prog}: warning: further '{kind}' warnings are only counted")
            return
        self._write(f"{self.prog}: warning: {os.fspath(path)}: {message}")

    def warn_image(self, path: str | os.PathLike, warning: str | None) -> None:
        """Log a ``load_image`` warning (no-op for None), counted under its ``kind``."""
        if warning is not None:
            self.warn(getattr(warning, "kind", "image"), path, str(warning))

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.stream if self.stream is not None else sys.stderr)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: ``3 problems: 2 corrupt, 1 grayscale`` or ``no problems``."""
        if not self.counts:
            return "no problems"
        parts = ", ".join(f"{count} {kind}" for kind, count in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{self.total} problem{'s' if self.total != 1 else ''}: {parts}"


# ---------------------------------------------------------------------------------------------------- listing files


def list_images(
    directory: str | os.PathLike,
    problems: ProblemLog | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[Path]:
    """Image files under ``directory``, recursively, sorted by their path relative to it.

    Extensions match case-insensitively; hidden files and directories (names starting with ".") are skipped.
    An unreadable subdirectory is warned about (``problems``) and skipped; a missing or unreadable ``directory``
    is a UserError. Symlinked directories are followed once.
    """
    root = Path(directory)
    if not root.exists():
        raise UserError(f"image directory {root} does not exist")
    if not root.is_dir():
        raise UserError(f"image directory {root} is not a directory")
    suffixes = tuple(ext.lower() for ext in extensions)
    found: list[tuple[str, Path]] = []
    visited: set[str] = set()

    def walk(folder: Path, relative: str) -> None:
        real = os.path.realpath(folder)
        if real in visited:
            return
        visited.add(real)
        try:
            with os.scandir(folder) as entries:
                listing = sorted(entries, key=lambda entry: entry.name)
        except OSError as err:
            if folder == root:
                raise UserError(f"cannot read image directory {root}: {err.strerror or err}") from err
            if problems is not None:
                problems.warn(UNREADABLE_DIR, folder, f"cannot read directory ({err.strerror or err}); skipped")
            return
        for entry in listing:
            if entry.name.startswith("."):
                continue
            name = f"{relative}/{entry.name}" if relative else entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                walk(Path(entry.path), name)
            elif entry.name.lower().endswith(suffixes):
                found.append((name, Path(entry.path)))

    walk(root, "")
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


# ---------------------------------------------------------------------------------------------------------- dataset


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes image files in DataLoader workers.

    ``paths_with_ids``: a sequence of ``(image_id, path)``. Item ``i`` is ``(image_id, path_str, image, warning)``:
    ``image`` an 8-bit RGB PIL image (after the optional ``transform``) or None for an unusable file, ``warning`` an
    ``ImageWarning`` or None. Pair with ``collate_fn=collate_image_items`` so a batch stays four lists; the main
    process logs the warnings (``ProblemLog.warn_image``). With ``max_side`` an image may come back reduced; pass
    ``with_original_size=True`` to get the file's (width, height) as a fifth item field, to map boxes back.
    """

    def __init__(
        self,
        paths_with_ids: Sequence[tuple[Any, str | os.PathLike]],
        max_side: int | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        with_original_size: bool = False,
    ) -> None:
        self.items = [(image_id, os.fspath(path)) for image_id, path in paths_with_ids]
        self.max_side = max_side
        self.transform = transform
        self.with_original_size = with_original_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple:
        image_id, path = self.items[index]
        loaded = load_image(path, self.max_side)
        image: Any = loaded.image
        if image is not None and self.transform is not None:
            image = self.transform(image)
        if self.with_original_size:
            return image_id, path, image, loaded.warning, loaded.original_size
        return image_id, path, image, loaded.warning


def collate_image_items(batch: Sequence[tuple]) -> tuple[list, ...]:
    """Transpose a batch of ``ImageFileDataset`` items into lists: (ids, paths, images, warnings[, sizes])."""
    return tuple(list(column) for column in zip(*batch)) if batch else ([], [], [], [])
