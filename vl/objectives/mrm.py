"""Masked region modelling (UNITER, LXMERT): MRC, MRC-kl and MRFR on regions whose features were zeroed.

The three objectives read ``output.region_hidden`` at the masked regions only and apply one decoder of a
``RegionHead`` (LXMERT's ``obj_predict_head``): "obj" for MRC and MRC-kl, "feat" for MRFR. They may share one
head (``VLPretrainingModel.region_head``) or each build its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl.encoders.heads import RegionHead
from vl.errors import UserError
from vl.fusion.base import VLOutput
from vl.objectives.common import empty_loss, require_keys


class RegionObjective(nn.Module):
    """A masked-region objective on one decoder (``decoder``, of width ``width``) of a ``RegionHead``."""

    name = ""
    decoder = ""
    needs_masking = "regions"
    needs_negatives = False
    batch_keys: tuple[str, ...] = ()

    def __init__(self, hidden_size: int, width: int, head: RegionHead | None = None, activation: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        if head is None:
            head = RegionHead(hidden_size, {self.decoder: width}, activation, layer_norm_eps)
        if self.decoder not in head.decoders:
            raise UserError(f"objective '{self.name}': the region head has no '{self.decoder}' decoder "
                            f"(has: {', '.join(head.decoders)}); set its size in the heads config")
        if head.decoders[self.decoder].out_features != width:
            raise UserError(f"objective '{self.name}': the region head's '{self.decoder}' decoder has width "
                            f"{head.decoders[self.decoder].out_features}, expected {width}")
        self.head = head

    def predict(self, region_hidden: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Decoder output at the selected regions: (B, R, H_v) and bool (B, R) -> (N, width)."""
        return self.head(region_hidden[selected], [self.decoder])[self.decoder]


class MaskedRegionClassification(RegionObjective):
    """MRC: cross-entropy to the detector's argmax class at masked regions: ``{"mrc": loss}``.

    Batch keys: ``mrm_class_targets (B, R)`` long, the detector argmax at masked regions and -100 elsewhere.
    """

    name = "mrc"
    decoder = "obj"
    batch_keys = ("mrm_class_targets",)

    def __init__(self, hidden_size: int, num_classes: int, head: RegionHead | None = None, activation: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__(hidden_size, num_classes, head, activation, layer_norm_eps)

    def forward(self, output: VLOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        require_keys(self.name, batch, self.batch_keys)
        targets = batch["mrm_class_targets"]
        selected = targets != -100  # (B, R)
        logits = self.predict(output.region_hidden, selected)  # (N, C)
        if logits.shape[0] == 0:
            return {self.name: empty_loss(logits)}
        return {self.name: F.cross_entropy(logits.float(), targets[selected])}


class MaskedRegionClassificationKL(RegionObjective):
    """MRC-kl: KL(detector distribution || softmax(prediction)) at masked regions: ``{"mrc_kl": loss}``.

    Batch keys: ``mrm_mask (B, R)`` bool and ``mrm_class_probs (B, R, C)``, the detector's class distribution.
    The KL divergence is summed over classes and averaged over masked regions.
    """

    name = "mrc_kl"
    decoder = "obj"
    batch_keys = ("mrm_mask", "mrm_class_probs")

    def __init__(self, hidden_size: int, num_classes: int, head: RegionHead | None = None, activation: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__(hidden_size, num_classes, head, activation, layer_norm_eps)

    def forward(self, output: VLOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        require_keys(self.name, batch, self.batch_keys)
        selected = batch["mrm_mask"].bool()  # (B, R)
        logits = self.predict(output.region_hidden, selected)  # (N, C)
        if logits.shape[0] == 0:
            return {self.name: empty_loss(logits)}
        target_probs = batch["mrm_class_probs"][selected].float()  # (N, C)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        return {self.name: F.kl_div(log_probs, target_probs, reduction="batchmean")}


class MaskedRegionFeatureRegression(RegionObjective):
    """MRFR: regression of the original feature at masked regions: ``{"mrfr": loss}``.

    Batch keys: ``mrm_mask (B, R)`` bool and ``mrm_feat_targets (B, R, D)``, the features before zeroing.
    ``loss``: "l2" (mean squared error, UNITER) or "smooth_l1" (LXMERT), averaged over masked regions and
    feature dimensions.
    """

    name = "mrfr"
    decoder = "feat"
    batch_keys = ("mrm_mask", "mrm_feat_targets")

    def __init__(self, hidden_size: int, feature_dim: int, head: RegionHead | None = None, loss: str = "l2",
                 activation: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__(hidden_size, feature_dim, head, activation, layer_norm_eps)
        if loss not in ("l2", "smooth_l1"):
            raise UserError(f"objective 'mrfr': loss must be l2 or smooth_l1, got {loss!r}")
        self.loss = loss

    def forward(self, output: VLOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        require_keys(self.name, batch, self.batch_keys)
        selected = batch["mrm_mask"].bool()  # (B, R)
        prediction = self.predict(output.region_hidden, selected)  # (N, D)
        if prediction.shape[0] == 0:
            return {self.name: empty_loss(prediction)}
        target = batch["mrm_feat_targets"][selected].float()  # (N, D)
        if self.loss == "l2":
            return {self.name: F.mse_loss(prediction.float(), target)}
        return {self.name: F.smooth_l1_loss(prediction.float(), target)}
