"""Safe weight I/O: safetensors out, safetensors or tensor-only pickles in, and checked copies into a model.

Nothing here unpickles arbitrary objects: ``.bin``/``.pt`` files go through ``torch.load(weights_only=True)``,
whose unpickler accepts only tensors and plain containers. Every failure is a ``UserError`` naming the file and,
where there is one, the tensor.

Tied weights. ``save_weights`` writes a tensor that several names share (BERT's decoder weight is its word
embedding matrix) ONCE, under its first name in state-dict order, and records the other names in the file's
metadata under ``vl.aliases``; ``load_state_file`` restores them, so a save/load round trip gives back every key.
Tensors that overlap in memory without being the same view are cloned, so each is stored in full.
``load_into`` also knows the model's own ties: a file that holds only one name of a tied pair loads completely.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from vl.atomic import atomic_output
from vl.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
ALIASES_METADATA_KEY = "vl.aliases"


# --------------------------------------------------------------------------------------------------------------
# Saving


def _tensor_view_key(tensor: torch.Tensor) -> tuple:
    """Identity of a view: two entries with equal keys are the same tensor under two names."""
    if tensor.numel() == 0:  # empty tensors may all report the same (null) data pointer
        return ("empty", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def dedupe_tied(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split ``state_dict`` into unique tensors and aliases.

    Returns (tensors, aliases): ``tensors`` keeps the first name of every tensor that several names share, and
    ``aliases`` maps each dropped name to the kept one. Tensors that share storage without being the same view
    (a slice of another tensor) are cloned, so every stored tensor owns its memory.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name_of_view: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry '{name}' is a {type(tensor).__name__}, not a tensor")
        view = _tensor_view_key(tensor)
        if view in first_name_of_view:
            aliases[name] = first_name_of_view[view]
            continue
        first_name_of_view[view] = name
        tensors[name] = tensor
    storages: dict[tuple, int] = {}
    for tensor in tensors.values():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        storages[storage] = storages.get(storage, 0) + 1
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        shared = storages[(tensor.device, tensor.untyped_storage().data_ptr())] > 1
        partial = tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        if shared or partial or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        tensors[name] = tensor.cpu()
    return tensors, aliases


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` as safetensors at ``path``, atomically (a temporary name, then a rename).

    Tied tensors are stored once (see the module docstring); ``metadata`` adds string entries to the header.
    The header always carries ``format: pt``, which Hugging Face's loaders require.
    """
    path = Path(path)
    tensors, aliases = dedupe_tied(state_dict)
    header = {"format": "pt", **(metadata or {})}
    if aliases:
        header[ALIASES_METADATA_KEY] = json.dumps(aliases, sort_keys=True)
    with atomic_output(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return path


# --------------------------------------------------------------------------------------------------------------
# Loading


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot read weights file {path}: not a valid safetensors file, truncated or corrupt "
                        f"({_first_line(err)})") from None
    if ALIASES_METADATA_KEY in metadata:
        try:
            aliases = json.loads(metadata[ALIASES_METADATA_KEY])
            for alias, name in aliases.items():
                tensors[alias] = tensors[name]
        except (ValueError, KeyError, AttributeError, TypeError):
            raise UserError(f"weights file {path} has a malformed '{ALIASES_METADATA_KEY}' header entry") from None
    return tensors


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refused a global (a class, a function): the file holds pickled objects, not just tensors.
        raise UserError(f"refusing to load {path}: it holds pickled objects other than tensors, which are never "
                        f"unpickled ({_first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise UserError(f"cannot read weights file {path}: truncated or corrupt ({_first_line(err)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"weights file {path} holds a {type(loaded).__name__}, not a dict of named tensors")
    for name, value in loaded.items():
        if not isinstance(name, str):
            raise UserError(f"weights file {path} has a non-string key {name!r}; expected a dict of named tensors")
        if not isinstance(value, torch.Tensor):
            raise UserError(f"weights file {path}: entry '{name}' is a {type(value).__name__}, not a tensor "
                            "(expected a plain dict of named tensors)")
    return loaded


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a dict of CPU tensors.

    ``.safetensors`` is read with safetensors (tied names restored from the header); ``.bin``, ``.pt`` and
    ``.pth`` with ``torch.load(weights_only=True)`` and must hold a plain dict of named tensors. A missing,
    truncated or corrupt file, or a pickle holding anything else, raises ``UserError`` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file not found: {path}")
    if path.is_dir():
        raise UserError(f"weights file {path} is a directory")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise UserError(f"weights file {path}: unknown type '{path.suffix}' "
                    f"(expected .safetensors, {', '.join(PICKLE_SUFFIXES)})")


# --------------------------------------------------------------------------------------------------------------
# Copying into a model


@dataclass(frozen=True)
class LoadReport:
    """What ``load_into`` did: model keys left at their initial values, and file keys it did not use."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def _has_prefix(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


def _list_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{key}'" for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    file_key: Callable[[str], str] | None = None,
) -> LoadReport:
    """Copy ``state_dict`` (keys in the model's names) into ``model``'s parameters and buffers, in place.

    source: the file the tensors came from; every error names it.
    strict: a model key the file lacks, or a file key the model lacks, is an error, except keys starting with
        a prefix in ``allow_missing`` / ``allow_unexpected``. With ``strict=False`` both are only reported.
    file_key: maps a model key to the name the tensor has in the file (e.g. its Hugging Face name), so errors
        name the tensor the user can find in the file. Identity when None.
    A tensor of the wrong shape is always an error naming the tensor, both shapes and the file. Names that the
    model ties (one tensor under two names) need only one of them in the file; if the file holds both with
    different values, that is an error.
    """
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    file_key = file_key or (lambda key: key)

    def describe(key: str) -> str:
        name = file_key(key)
        return f"'{name}'" if name == key else f"'{name}' (model parameter '{key}')"

    targets = model.state_dict()
    groups: dict[tuple, list[str]] = {}  # tied names in the model share one group
    for key, tensor in targets.items():
        groups.setdefault(_tensor_view_key(tensor), []).append(key)

    missing: list[str] = []
    plan: list[tuple[str, torch.Tensor]] = []
    for keys in groups.values():
        provided = [key for key in keys if key in state_dict]
        if not provided:
            missing.extend(keys)
            continue
        first = state_dict[provided[0]]
        for other in provided[1:]:
            tensor = state_dict[other]
            if tensor.shape != first.shape or not torch.equal(tensor.to(first.dtype), first):
                raise UserError(f"checkpoint {source}: tensors {describe(provided[0])} and {describe(other)} are "
                                "tied in the model but differ in the file")
        target = targets[keys[0]]
        if first.shape != target.shape:
            raise UserError(f"checkpoint {source}: tensor {describe(provided[0])} has shape {tuple(first.shape)} "
                            f"but the model expects {tuple(target.shape)}")
        plan.append((keys[0], first))

    unexpected = [key for key in state_dict if key not in targets]
    if strict:
        fatal_missing = [key for key in missing if not _has_prefix(key, allow_missing)]
        if fatal_missing:
            raise UserError(f"checkpoint {source} is missing tensor {describe(fatal_missing[0])}"
                            + (f" and {len(fatal_missing) - 1} more" if len(fatal_missing) > 1 else ""))
        fatal_unexpected = [key for key in unexpected if not _has_prefix(key, allow_unexpected)]
        if fatal_unexpected:
            raise UserError(f"checkpoint {source} has tensors the model does not have: "
                            f"{_list_keys([file_key(key) for key in fatal_unexpected])}")
    with torch.no_grad():
        for key, tensor in plan:
            targets[key].copy_(tensor)
    return LoadReport(missing=tuple(missing), unexpected=tuple(unexpected))


# --------------------------------------------------------------------------------------------------------------
# Checkpoint directories

# Hugging Face ``config.json`` model_type -> the checkpoint kind its loader handles. Each converter module in
# vl/checkpoints/ adds its model type here.
HF_MODEL_TYPES: dict[str, str] = {"bert": "hf-bert", "lxmert": "hf-lxmert", "visual_bert": "hf-visualbert"}
VL_RUN_KIND = "vl-run"

# Weight file names of a Hugging Face checkpoint directory, most preferred first; index files list shards.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_json_file(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; a missing file, invalid JSON or a non-object is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _require_dir(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.exists():
        raise UserError(f"checkpoint directory not found: {checkpoint_dir}")
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint {checkpoint_dir} is not a directory")


def is_hf_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """True when ``checkpoint_dir`` is a directory holding a Hugging Face ``config.json``."""
    return (Path(checkpoint_dir) / "config.json").is_file()


def detect_checkpoint_kind(checkpoint_dir: str | os.PathLike) -> str:
    """The kind of checkpoint directory: a value of ``HF_MODEL_TYPES`` (e.g. "hf-bert") or "vl-run".

    A Hugging Face directory is recognised by ``config.json`` and its ``model_type``; one of our run directories
    by ``config.yaml`` next to ``model.safetensors``. Anything else is a UserError naming the directory.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _require_dir(checkpoint_dir)
    if is_hf_checkpoint(checkpoint_dir):
        config_path = checkpoint_dir / "config.json"
        model_type = read_json_file(config_path).get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise UserError(f"{config_path}: model_type {model_type!r} is not supported "
                            f"(supported: {', '.join(sorted(HF_MODEL_TYPES))})")
        return HF_MODEL_TYPES[model_type]
    if (checkpoint_dir / "config.yaml").is_file() and (checkpoint_dir / "model.safetensors").is_file():
        return VL_RUN_KIND
    raise UserError(f"{checkpoint_dir} is not a checkpoint directory: it has neither a Hugging Face config.json "
                    "nor a run's config.yaml with model.safetensors")


def load_hf_weights(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a Hugging Face checkpoint directory, and the file (or index) they came from.

    Prefers ``model.safetensors`` over ``pytorch_model.bin``; sharded checkpoints are read through their index.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _require_dir(checkpoint_dir)
    for name in HF_WEIGHT_FILES:
        if (checkpoint_dir / name).is_file():
            return load_state_file(checkpoint_dir / name), checkpoint_dir / name
    for name in HF_INDEX_FILES:
        index_path = checkpoint_dir / name
        if index_path.is_file():
            weight_map = read_json_file(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index_path} has no 'weight_map' listing the shard files")
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not isinstance(shard, str) or Path(shard).name != shard:
                    raise UserError(f"{index_path}: shard name {shard!r} is not a file name in {checkpoint_dir}")
                tensors.update(load_state_file(checkpoint_dir / shard))
            return tensors, index_path
    raise UserError(f"checkpoint directory {checkpoint_dir} has no weights file "
                    f"(looked for {', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})")
