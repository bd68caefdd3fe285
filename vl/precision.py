"""Which number format a run computes in: the one place that decides it, for training and inference alike.

``auto`` (the default everywhere) is bf16 where the device runs it natively and fp32 elsewhere:

- a CUDA GPU: bf16 when ``torch.cuda.is_bf16_supported()`` says so (Ampere and newer);
- a CPU: bf16 when oneDNN has native bf16 kernels for it (AVX-512 bf16 or AMX), which
  ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` reports. On an AVX2-only CPU a bf16 matmul emulated in
  software is tens of times slower than fp32, so ``auto`` never picks it there.

An explicit ``bf16`` is honoured everywhere, with a one-line warning where it is not native. ``"no"`` (accelerate's
word) means fp32. The choice of ``auto`` is printed once per process, so a log says what a run computed in.

This module is a leaf: it imports torch and ``vl.errors`` only, so ``region_features`` can use it alone.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Literal

import torch

from vl.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "no")
Resolved = Literal["fp32", "bf16", "fp16"]

_announced: set[tuple[str, str, str]] = set()


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions natively (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_info() -> dict[str, object]:
    """What a bench's JSON line says about the machine that measured it: the CPU's name, whether bf16 is native
    (``bf16``: "native" or "not native", where a bench times no bf16), and the vector ISA torch's kernels use
    (``torch.backends.cpu.get_cpu_capability()``: "AVX2" under ``ATEN_CPU_CAPABILITY=avx2`` emulation)."""
    native = bf16_native("cpu")
    return {"cpu": cpu_name(), "bf16_native": native, "bf16": "native" if native else "not native",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def cpu_name() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_precision(requested: str, device: torch.device | str = "cpu", *, what: str = "train.precision",
                      quiet: bool = False) -> Resolved:
    """``requested`` (one of ``PRECISIONS``) -> what to compute in on ``device``: fp32, bf16 or fp16.

    ``what`` names the setting in messages. Prints the choice of ``auto`` once per process and warns once about a
    bf16 that is not native; ``quiet`` prints nothing.
    """
    if requested not in PRECISIONS:
        raise UserError(f"{what} must be one of auto, fp32, bf16, fp16, got {requested!r}")
    device = torch.device(device)
    native = bf16_native(device)
    if requested == "auto":
        resolved: Resolved = "bf16" if native else "fp32"
        reason = "native bf16" if native else "no native bf16"
        _once(quiet, ("auto", device.type, resolved),
              f"precision: auto -> {resolved} ({reason} on {_device_name(device)})")
        return resolved
    if requested == "no":
        return "fp32"
    if requested == "bf16" and not native:
        _once(quiet, ("slow", device.type, "bf16"),
              f"warning: {what}=bf16 on {_device_name(device)}, which has no native bf16: this will be slow "
              "(auto would pick fp32)")
    return requested  # type: ignore[return-value]


def accelerate_mixed_precision(resolved: Resolved) -> Literal["no", "bf16", "fp16"]:
    """accelerate's ``mixed_precision`` word for a resolved precision."""
    return "no" if resolved == "fp32" else resolved


def autocast(resolved: Resolved, device: torch.device | str = "cpu"):
    """An autocast context for a resolved precision on ``device`` (nothing for fp32)."""
    if resolved == "fp32":
        return contextlib.nullcontext()
    device = torch.device(device)
    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_name() if device.type == "cpu" else device.type


def _once(quiet: bool, key: tuple[str, str, str], message: str) -> None:
    if quiet or key in _announced:
        return
    _announced.add(key)
    print(message, file=sys.stderr, flush=True)
