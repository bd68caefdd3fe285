"""Checkpoints of a training run: writing, reading and listing them, and the RNG states they hold.

Layout under the run directory::

    RUN/checkpoints/step-N/model.safetensors   the weights (``save_filter`` may leave out frozen parts)
    RUN/checkpoints/step-N/train_state.pt      optimizer, scheduler, step, data position and RNG states

``train_state.pt`` holds tensors and plain containers only, so ``torch.load(path, weights_only=True)`` reads it.
A checkpoint directory is written under a temporary name, fsynced and renamed into place (``vl.atomic``): a crash
leaves the previous checkpoint, never a half-written one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vl.atomic import atomic_directory, restore_aside
from vl.checkpoints.io import load_into, load_state_file, save_weights
from vl.config import atomic_write_text
from vl.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ASIDE_DIR = re.compile(r"^\.(step-\d+)\.replaced-")  # vl.atomic's name for a replaced directory




def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (call before building the model)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    version, mt_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": int(version), "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])




def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``run_dir/checkpoints`` as (step, path), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    for path in list(root.iterdir()):  # a replacement that a crash interrupted: its older version is put back
        aside = _ASIDE_DIR.match(path.name)
        if aside:
            restore_aside(root / aside.group(1))
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / WEIGHTS_FILE).is_file() and (path / TRAIN_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def load_model_weights(model: nn.Module, path: str | os.PathLike,
                       save_filter: Callable[[str], bool] | None = None) -> None:
    """Load a weights file written by the loop; with ``save_filter``, only the keys it selects are expected."""
    state = load_state_file(path)
    if save_filter is None:
        load_into(model, state, path)
        return
    report = load_into(model, state, path, strict=False)
    expected_missing = [key for key in report.missing if save_filter(key)]
    if expected_missing or report.unexpected:
        names = expected_missing or list(report.unexpected)
        raise UserError(f"checkpoint {path} does not match the model (first mismatching tensor: '{names[0]}')")


def data_state(data: Any) -> Any:
    return data.state_dict() if hasattr(data, "state_dict") and hasattr(data, "load_state_dict") else None


def capture_snapshot(data: Any) -> dict[str, Any]:
    """This process's RNG states and data position, as a checkpoint stores them (taken at a step boundary)."""
    return {"rng": rng_state(), "data": copy.deepcopy(data_state(data))}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    scheduler: Any,
    data: Any,
    keep_last: int,
    snapshot: Mapping[str, Any] | None = None,
    rank_snapshots: list[Mapping[str, Any]] | None = None,
    sharded: bool = False,
) -> Path:
    """Write ``RUN/checkpoints/step-N`` through a temporary directory and a rename; prune to ``keep_last``.

    model_state: the tensors to write (the loop leaves out what ``save_filter`` excludes).
    optimizer_state: ``optimizer.state_dict()``, or under FSDP the full state keyed by parameter name
        (``sharded``, recorded so that a resume reads it the same way).
    snapshot: the RNG states and data position to store (``capture_snapshot``); default: taken now.
    rank_snapshots: every rank's snapshot, in rank order, when several processes train.
    """
    snapshot = snapshot if snapshot is not None else capture_snapshot(data)
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    with atomic_directory(final) as tmp:
        save_weights(model_state, tmp / WEIGHTS_FILE)
        state = {
            "version": TRAIN_STATE_VERSION,
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": snapshot["rng"],
            "data": snapshot["data"],
        }
        if rank_snapshots is not None:
            state["ranks"] = list(rank_snapshots)
        if sharded:
            state["sharded"] = True
        torch.save(state, tmp / TRAIN_STATE_FILE)
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_train_state(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / TRAIN_STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, or one holding objects that weights_only refuses
        raise UserError(f"cannot read training state {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("version") != TRAIN_STATE_VERSION:
        raise UserError(f"training state {path} is not a version-{TRAIN_STATE_VERSION} train_state.pt")
    return state


def own_snapshot(state: Mapping[str, Any], accelerator: Any, checkpoint: Path) -> Mapping[str, Any]:
    """This rank's RNG states and data position from a training state (several processes: its ``ranks`` entry)."""
    ranks = state.get("ranks")
    saved_by = len(ranks) if ranks is not None else 1
    if saved_by != accelerator.num_processes:
        raise UserError(f"checkpoint {checkpoint} was saved by {saved_by} process(es); resume it with "
                        f"{saved_by} (now {accelerator.num_processes})")
    if ranks is not None:
        return ranks[accelerator.process_index]
    return {"rng": state["rng"], "data": state.get("data")}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a run interrupted between a log and the next checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
