"""Image ids and shard lists: the rules of docs/cli.md that the extractor and the trainers must agree on.

The feature store is keyed by image id, so an id computed one way at extraction and another way at training would
leave every caption without features. Every command takes ids from here:

- a file: the annotations' ``file_name`` -> ``id`` when given, else the trailing number of its stem (COCO's
  ``COCO_val2014_000000000042.jpg`` is 42), else the stem itself;
- a webdataset sample: its JSON ``image_id`` when present, else its key (numeric keys become ints).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from vl.errors import UserError

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def image_id_from_filename(name: str | os.PathLike) -> int | str:
    """The image id of a file by name (docs/cli.md's rules 2 and 3): the trailing number of its stem (COCO's
    ``COCO_val2014_000000000042.jpg`` is 42), else the stem itself (``cat.jpg`` is ``"cat"``). A number too long for
    a 64-bit id (over 18 digits) stays part of the stem."""
    stem = Path(name).stem
    match = _TRAILING_NUMBER.search(stem)
    return int(match.group(1)) if match and len(match.group(1)) <= 18 else stem


def image_id_for(path: str | os.PathLike, root: str | os.PathLike | None, file_ids: dict[str, int | str]
                 ) -> int | str:
    """The image id of the file ``path`` by docs/cli.md's rule, the one every command uses: the annotations'
    ``file_name`` -> ``id`` (``file_ids``; matched as the path relative to ``root``, then by base name), else
    ``image_id_from_filename``."""
    path = Path(path)
    if file_ids:
        if root is not None:
            try:
                relative = path.relative_to(root).as_posix()
            except ValueError:
                relative = None
            if relative is not None and relative in file_ids:
                return file_ids[relative]
        if path.name in file_ids:
            return file_ids[path.name]
    return image_id_from_filename(path.name)


def image_id_of(key: str, meta: dict[str, Any]) -> int | str:
    """The sample's JSON ``image_id`` when present, else its key (docs/cli.md); numeric keys become ints."""
    value = meta.get("image_id", key)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def expand_shards(pattern: str) -> list[str]:
    """A shard list from a brace pattern, a glob, a directory (its ``*.tar``) or one file; errors name the pattern."""
    path = Path(pattern)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise UserError(f"shard directory {pattern} holds no .tar files")
        return shards
    if any(ch in pattern for ch in "{}"):
        shards = list(braceexpand(pattern))
    elif any(ch in pattern for ch in "*?["):
        shards = sorted(glob.glob(pattern))
        if not shards:
            raise UserError(f"shard pattern {pattern} matches no files")
    else:
        shards = [pattern]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} from {pattern} does not exist{more}")
    return shards
