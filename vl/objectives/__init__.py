"""Pretraining objectives, picked by name in YAML.

Every VL objective is an ``nn.Module`` called as ``objective(output: VLOutput, batch) -> {name: loss}`` (scalar
losses); the training loop sums the losses with the configured weights. Each class states:

- ``batch_keys``: the target keys its collator must add (``vl.data.vl_masking.prepare_vl_batch``);
- ``needs_masking``: "text" | "regions" | None, and ``needs_negatives``: whether the batch needs ITM negatives.
  ``VLBatchPlan.for_objectives(objectives)`` turns these into the collator's plan.

``OBJECTIVE_REGISTRY`` maps the YAML name to the class; ``build_objective(name, model, options)`` constructs one
on a ``vl.fusion.pretraining.VLPretrainingModel``, handing it the model's head (``model.heads.mlm``,
``.region``, ``.itm``, ``.answer``) so that the heads' weights live in the model's ``state_dict`` only; the
objectives own no weights of their own then (constructed without a head, an objective builds its own).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from vl.errors import UserError
from vl.fusion.pretraining import VLPretrainingModel
from vl.objectives.itm import ImageTextMatching, mine_hard_negatives
from vl.objectives.mlm import MaskedLanguageModeling
from vl.objectives.mrm import (
    MaskedRegionClassification,
    MaskedRegionClassificationKL,
    MaskedRegionFeatureRegression,
)
from vl.objectives.qa import ImageQuestionAnswering
from vl.objectives.wra import WordRegionAlignment

OBJECTIVE_REGISTRY: dict[str, type[nn.Module]] = {
    "mlm": MaskedLanguageModeling,
    "mrc": MaskedRegionClassification,
    "mrc_kl": MaskedRegionClassificationKL,
    "mrfr": MaskedRegionFeatureRegression,
    "itm": ImageTextMatching,
    "wra": WordRegionAlignment,
    "qa": ImageQuestionAnswering,
}


def _head(model: VLPretrainingModel, attribute: str, objective: str, hint: str) -> nn.Module:
    head = getattr(model.heads, attribute, None)
    if head is None:
        raise UserError(f"objective '{objective}' needs the model's heads.{attribute}; {hint}")
    return head


def _model_arguments(name: str, model: VLPretrainingModel) -> dict[str, Any]:
    """The constructor arguments an objective takes from the model: widths, sizes and its head."""
    fusion = model.fusion
    if name == "mlm":
        head = _head(model, "mlm", name, "set heads.mlm: true")
        return {"hidden_size": fusion.text_hidden_size, "vocab_size": head.decoder.out_features, "head": head}
    if name in ("mrc", "mrc_kl"):
        head = _head(model, "region", name, "set heads.region_outputs.obj")
        if "obj" not in head.decoders:
            raise UserError(f"objective '{name}' needs an object-class decoder; set heads.region_outputs.obj")
        return {"hidden_size": fusion.region_hidden_size, "num_classes": head.decoders["obj"].out_features,
                "head": head}
    if name == "mrfr":
        head = _head(model, "region", name, "set heads.region_outputs.feat")
        if "feat" not in head.decoders:
            raise UserError("objective 'mrfr' needs a feature decoder; set heads.region_outputs.feat")
        return {"hidden_size": fusion.region_hidden_size, "feature_dim": head.decoders["feat"].out_features,
                "head": head}
    if name == "itm":
        return {"hidden_size": fusion.hidden_size, "head": _head(model, "itm", name, "set heads.itm: true")}
    if name == "wra":
        return {"text_hidden_size": fusion.text_hidden_size, "region_hidden_size": fusion.region_hidden_size}
    if name == "qa":
        head = _head(model, "answer", name, "set heads.num_answers")
        return {"hidden_size": fusion.hidden_size, "num_answers": head.classifier.out_features, "head": head}
    raise UserError(f"objective '{name}' is not one of {', '.join(OBJECTIVE_REGISTRY)}")


def build_objective(name: str, model: VLPretrainingModel, options: Mapping[str, Any] | None = None) -> nn.Module:
    """The objective ``name`` on ``model``'s heads; ``options`` are its remaining constructor arguments.

    Options per objective: mrfr ``loss`` (l2 | smooth_l1); itm ``hard_negatives`` (mined per caption, 0 = off);
    wra ``beta``, ``iterations``, ``inner_iterations``, ``exclude_cls``. An unknown option is a UserError.
    """
    if name not in OBJECTIVE_REGISTRY:
        raise UserError(f"objective '{name}' is not one of {', '.join(OBJECTIVE_REGISTRY)}")
    cls = OBJECTIVE_REGISTRY[name]
    arguments = _model_arguments(name, model)
    options = dict(options or {})
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *arguments)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"objective '{name}' has no option {', '.join(unknown)} (options: {', '.join(allowed)})")
    return cls(**arguments, **options)


__all__ = [
    "OBJECTIVE_REGISTRY",
    "ImageQuestionAnswering",
    "ImageTextMatching",
    "MaskedLanguageModeling",
    "MaskedRegionClassification",
    "MaskedRegionClassificationKL",
    "MaskedRegionFeatureRegression",
    "WordRegionAlignment",
    "build_objective",
    "mine_hard_negatives",
]
