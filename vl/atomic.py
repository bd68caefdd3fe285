"""Atomic file output: write to a temporary file beside the target, then rename, so no reader ever sees half a file.

Crash safety: a file's data is fsynced before its rename and the directory after it, so that after a power loss or
a SIGKILL the name holds either the old content or the complete new one. A directory replacing an older one
(``atomic_directory``) first renames the old one aside, so that there is never a moment with neither; a crash
between the two renames leaves the old one aside, and ``atomic_directory`` and ``restore_aside`` put it back.

``tempfile.mkstemp`` creates private (0600) files; ``atomic_output`` gives the result the permissions an ordinary
``open(path, "w")`` would (0666 minus the umask), since runs, configs and weights are meant to be shared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's data to disk (a no-op where the platform cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root``, ``root`` last."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give the finished temporary file ordinary permissions, flush it, and rename it onto ``path``."""
    os.chmod(tmp, 0o666 & ~_umask())
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def _aside_prefix(path: Path) -> str:
    return f".{path.name}.replaced-"


def restore_aside(path: str | os.PathLike) -> None:
    """Where ``path`` is missing but a crash left its older version renamed aside, put that back; where ``path``
    exists, remove any leftover aside copies."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    asides = sorted(p for p in path.parent.iterdir() if p.name.startswith(_aside_prefix(path)))
    if not asides:
        return
    if not path.exists():
        os.replace(asides.pop(), path)
        fsync_path(path.parent)
    for leftover in asides:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it is flushed and replaces ``path`` (an older
    one is renamed aside, then removed), on any error it is removed. Checkpoint directories are written this way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_aside(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        fsync_tree(tmp)
        aside = None
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=_aside_prefix(path), dir=path.parent))
            os.replace(path, aside)  # an empty directory is replaced whole
        os.replace(tmp, path)
        fsync_path(path.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
