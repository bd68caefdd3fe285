"""``vl quantize``: dynamic int8 quantization of a fine-tuned VQA or retrieval run's linear layers.

PyTorch's own dynamic quantization does the work (``torch.ao.quantization.quantize_dynamic``): each ``nn.Linear``
keeps int8 weights, quantized per output channel (symmetric), and quantizes its input per batch at run time; the
embeddings, LayerNorms and everything else stay fp32. The run directory it writes is a run like its source, with:

    RUN_INT8/quantization.json   what it is: the method, the scheme, the quantized layers, the source run
    RUN_INT8/model.safetensors   the fp32 tensors, and per quantized layer NAME: NAME.weight_int8 (int8),
                                 NAME.weight_scales (fp64), NAME.weight_zero_points (int64) and NAME.bias

plus the source's config.yaml, answer vocabulary and tokenizer. Nothing is pickled: ``load_quantized`` builds the
model from config.yaml, quantizes it the same way and puts the stored int8 weights into it, checking every tensor.
``vl predict``, ``vl evaluate``, ``vl vqa`` and ``vl serve`` load such a run through ``vl.tasks.runs.load_task_run``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl.errors import UserError

QUANTIZATION_FILE = "quantization.json"
FORMAT = "vl-dynamic-int8"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# Written by training, or describing the fp32 model: not carried into the int8 run.
_NOT_COPIED = {WEIGHTS_FILE, "metrics.jsonl", "loss.png", "val_metrics.json"}
_PARTS = ("weight_int8", "weight_scales", "weight_zero_points", "bias")


def is_quantized(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / QUANTIZATION_FILE).is_file()


def _dynamic_linear() -> type:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Linear`` replaced by PyTorch's dynamic int8 linear (per-channel weights), in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig
    from torch.ao.quantization import quantize_dynamic as torch_quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore")
        return torch_quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                      inplace=True)


def quantized_layers(model: nn.Module) -> list[str]:
    linear = _dynamic_linear()
    return [name for name, module in model.named_modules() if isinstance(module, linear)]


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a quantized model is saved as (the module docstring's layout)."""
    layers = quantized_layers(model)
    prefixes = tuple(f"{name}." for name in layers)
    state = {key: value for key, value in model.state_dict().items()
             if isinstance(value, torch.Tensor) and not key.startswith(prefixes)}
    modules = dict(model.named_modules())
    for name in layers:
        weight, bias = modules[name]._packed_params._weight_bias()
        state[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        state[f"{name}.weight_scales"] = weight.q_per_channel_scales().double().contiguous()
        state[f"{name}.weight_zero_points"] = weight.q_per_channel_zero_points().long().contiguous()
        state[f"{name}.bias"] = (bias if bias is not None else torch.zeros(weight.shape[0])).detach().float()
    return state


def quantize_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the int8 version of fine-tuned run ``run_dir`` to ``out``; returns what ``quantization.json`` says."""
    from vl.atomic import atomic_directory
    from vl.checkpoints.io import save_weights
    from vl.tasks.runs import load_any_task_run

    run_dir, out = Path(run_dir), Path(out)
    if is_quantized(run_dir):
        raise UserError(f"{run_dir} is already quantized ({QUANTIZATION_FILE}); quantize its fp32 source")
    if out.resolve() == run_dir.resolve():
        raise UserError(f"--out {out} is the run itself; give a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    model, run, _ = load_any_task_run(run_dir)
    quantize_dynamic(model)
    layers = quantized_layers(model)
    if not layers:
        raise UserError(f"{run_dir}: the model has no linear layers to quantize")
    info = {
        "format": FORMAT, "version": VERSION, "task": run.task,
        "method": "torch.ao.quantization.quantize_dynamic",
        "scheme": "int8 weights per output channel (symmetric); int8 activations per batch at run time; "
                  "the rest fp32",
        "modules": "torch.nn.Linear", "quantized_layers": layers, "source": str(run_dir.resolve()),
        "torch": torch.__version__,
    }
    with atomic_directory(out) as tmp:
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and path.name not in _NOT_COPIED:
                shutil.copy2(path, tmp / path.name)
        save_weights(quantized_state(model), tmp / WEIGHTS_FILE, metadata={"quantization": FORMAT})
        (tmp / QUANTIZATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    info["bytes"] = (out / WEIGHTS_FILE).stat().st_size
    info["source_bytes"] = (run_dir / WEIGHTS_FILE).stat().st_size
    return info


def read_quantization(run_dir: Path) -> dict[str, Any]:
    path = run_dir / QUANTIZATION_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UserError(f"{path} is not a version-{VERSION} {FORMAT} description")
    layers = info.get("quantized_layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(name, str) for name in layers):
        raise UserError(f"{path}: 'quantized_layers' must be a non-empty list of layer names")
    return info


def load_quantized(model: nn.Module, run_dir: str | os.PathLike) -> nn.Module:
    """Put the int8 run ``run_dir``'s weights into ``model`` (built fp32 from its config.yaml); returns it quantized.

    Every stored tensor is checked against the layer it fills: a layer missing from the model or the file, a
    wrong dtype or shape, or a tensor left over is an error naming the file.
    """
    from vl.checkpoints.io import load_into, load_state_file

    run_dir = Path(run_dir)
    info = read_quantization(run_dir)
    weights = run_dir / WEIGHTS_FILE
    state = load_state_file(weights)
    modules = dict(model.named_modules())
    layers: list[str] = info["quantized_layers"]
    for name in layers:
        if not isinstance(modules.get(name), nn.Linear):
            raise UserError(f"{run_dir / QUANTIZATION_FILE}: '{name}' is not a linear layer of the model")
    packed = {name: {part: _take(state, f"{name}.{part}", weights) for part in _PARTS} for name in layers}
    load_into(model, state, weights, allow_missing=tuple(f"{name}." for name in layers))
    quantize_dynamic(model)
    quantized = dict(model.named_modules())
    for name, parts in packed.items():
        linear = quantized[name]
        shape = (linear.out_features, linear.in_features)
        _check(parts["weight_int8"], torch.int8, shape, f"{name}.weight_int8", weights)
        for part, dtype in (("weight_scales", torch.float64), ("weight_zero_points", torch.int64),
                            ("bias", torch.float32)):
            _check(parts[part], dtype, (shape[0],), f"{name}.{part}", weights)
        if not bool(torch.isfinite(parts["weight_scales"]).all()) or bool((parts["weight_scales"] <= 0).any()):
            raise UserError(f"weights file {weights}: '{name}.weight_scales' must be finite and positive")
        weight = torch._make_per_channel_quantized_tensor(parts["weight_int8"], parts["weight_scales"],
                                                          parts["weight_zero_points"], 0)
        linear.set_weight_bias(weight, parts["bias"])
    return model


def _take(state: dict[str, torch.Tensor], key: str, source: Path) -> torch.Tensor:
    if key not in state:
        raise UserError(f"weights file {source} lacks '{key}' (not the int8 run its {QUANTIZATION_FILE} describes)")
    return state.pop(key)


def _check(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], key: str, source: Path) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise UserError(f"weights file {source}: '{key}' is {str(tensor.dtype).removeprefix('torch.')} "
                        f"{tuple(tensor.shape)}, expected {str(dtype).removeprefix('torch.')} {shape}")


def describe(info: Mapping[str, Any]) -> str:
    """The line ``vl quantize`` prints."""
    size = ""
    if "bytes" in info and "source_bytes" in info:
        size = f"; weights {info['source_bytes'] / 1e6:.1f} MB -> {info['bytes'] / 1e6:.1f} MB"
    return f"{len(info['quantized_layers'])} linear layers to int8 ({info['task']} run){size}"
