"""Fusion architectures, picked by name in YAML (``model.fusion``).

``FUSION_REGISTRY`` maps the name to the model class; every class is called as ``cls(cfg: FusionConfig)`` and then
``model(batch) -> VLOutput`` (batch keys and output shapes: ``vl.fusion.base``).
"""

from __future__ import annotations

from torch import nn

from vl.fusion.base import FusionConfig, VLOutput, fusion_config_from_dict, load_fusion_config
from vl.fusion.dual_stream import DualStreamModel
from vl.fusion.single_stream import SingleStreamModel

FUSION_REGISTRY: dict[str, type[nn.Module]] = {
    "single_stream": SingleStreamModel,
    "dual_stream": DualStreamModel,
}


def build_fusion(cfg: FusionConfig) -> nn.Module:
    """The fusion model ``cfg.fusion`` names, built from ``cfg``."""
    if cfg.fusion not in FUSION_REGISTRY:
        from vl.errors import UserError

        raise UserError(f"model.fusion '{cfg.fusion}' is not one of {', '.join(sorted(FUSION_REGISTRY))}")
    return FUSION_REGISTRY[cfg.fusion](cfg)


__all__ = [
    "FUSION_REGISTRY",
    "DualStreamModel",
    "FusionConfig",
    "SingleStreamModel",
    "VLOutput",
    "build_fusion",
    "fusion_config_from_dict",
    "load_fusion_config",
]
