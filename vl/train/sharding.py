"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the training loop.

With ``train.fsdp: true`` under several processes, each process holds 1/N of every parameter, of its gradient and
of its optimizer state; a layer's full weights exist only while it runs. Launch as for DDP::

    accelerate launch --multi_gpu --num_processes N -m vl pretrain ... --set train.fsdp=true

The sharding is applied here rather than by ``accelerate``'s FSDP plugin, which shards only on accelerators; so the
same code runs on CPU processes (gloo) and on GPUs (NCCL). Checkpoints and ``model.safetensors`` hold full, unsharded
tensors (gathered on rank 0), so an FSDP run's directory is an ordinary run: every other command reads it, and
unlike a sharded checkpoint it does not tie a resume to the original process count's layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from vl.errors import UserError


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard ``model`` in place over ``world_size`` processes: each layer of its outermost layer lists
    (``nn.ModuleList``: the transformer blocks) is one unit, gathered only while it runs; the rest of the model
    (embeddings, heads, tied weights) is the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    for block in _layer_units(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _layer_units(model: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                units.extend(layer for layer in child if any(True for _ in layer.parameters()))
            else:
                visit(child)

    visit(model)
    return units


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model state dict and (with ``optimizer``) the optimizer's, keyed by parameter name, on rank 0's
    CPU; other ranks get empty dicts. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, _inner(optimizer), options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: Mapping[str, torch.Tensor],
                    optimizer_state: Mapping[str, Any], source: str,
                    save_filter: Callable[[str], bool] | None = None) -> None:
    """Load full (unsharded) states, as ``full_state`` returns them, into the sharded model and its optimizer.

    Every rank passes the full dicts. ``save_filter``: only the keys it selects are expected in ``model_state``.
    A parameter without optimizer state (one that has had no gradient yet) keeps its fresh state.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    expected = [key for key in model.state_dict() if save_filter is None or save_filter(key)]
    missing = [key for key in expected if key not in model_state]
    unexpected = [key for key in model_state if key not in set(model.state_dict())]
    if missing or unexpected:
        raise UserError(f"checkpoint {source} does not match the model (first mismatching tensor: "
                        f"'{(missing or unexpected)[0]}')")
    set_state_dict(model, _inner(optimizer), model_state_dict=dict(model_state), optim_state_dict=dict(optimizer_state),
                   options=StateDictOptions(full_state_dict=True, strict=False))


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The root unit's full weights present for the duration, so that code calling sub-modules directly (an
    evaluation callback) runs; each layer unit gathers itself when called. Collective."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (``clip_grad_norm_`` on sharded gradients returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
