"""Progress bars for long work (training, extraction, evaluation), shown where someone can see them.

``progress_bar`` is ``tqdm`` with one rule for whether it shows: ``show=True`` / ``False`` decide; ``None`` (the
default) follows ``VL_PROGRESS`` in the environment (``1``: always, ``0``: never) and otherwise shows on a terminal
only. ``vl demo`` runs every stage with ``VL_PROGRESS=1`` and its output in a log file, and reports the latest
state of each running stage's bar on the console (``latest_progress``).

This module is a leaf (tqdm and the standard library only), so ``region_features`` can use it alone.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

PROGRESS_ENV = "VL_PROGRESS"


def progress_disabled(show: bool | None = None) -> bool | None:
    """tqdm's ``disable`` for ``show`` (see the module docstring); None lets tqdm hide the bar off a terminal."""
    if show is not None:
        return not show
    setting = os.environ.get(PROGRESS_ENV, "").strip()
    if setting == "1":
        return False
    if setting == "0":
        return True
    return None


def progress_bar(iterable: Iterable[Any] | None = None, *, show: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (``kwargs`` are tqdm's) that shows per ``show`` and ``VL_PROGRESS``."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=progress_disabled(show), **kwargs)


_BAR_GLYPHS = re.compile(r"\|[^|]*\|")  # the bar itself, between the percentage and the counts


def latest_progress(text: str) -> str | None:
    """The last tqdm state written in ``text`` (a log: bars redraw with a carriage return), without the bar glyphs:
    ``"pretrain:  32% 800/2500 [01:10<02:30, 11.3it/s, loss=1.23]"``; None when ``text`` holds no bar."""
    for segment in reversed(re.split(r"[\r\n]", text)):
        segment = segment.strip()
        if re.search(r"\d+/\d+ \[", segment) or re.search(r"\d+%\|", segment):
            return " ".join(_BAR_GLYPHS.sub(" ", segment).split())
    return None
