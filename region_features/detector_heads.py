"""The RPN and RoI heads of ``region_features.detector.RegionDetector`` beyond torchvision's: the class-conditioned
attribute head, the RoI heads that add its loss, the RPN head and box predictor with float32 outputs, and RoIAlign
pooling the images of a batch in parallel at CPU inference."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign


class AttributeHead(nn.Module):
    """Multi-label attribute logits from a region feature and its object class (bottom-up attention's attribute
    branch): ``classifier(relu(fc([region_feats, class_embedding(class_ids)])))``.

    forward(region_feats (N, D), class_ids (N,) in 0..num_classes) -> logits (N, num_attributes).
    """

    def __init__(self, feature_dim: int, num_classes: int, num_attributes: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes + 1, embed_dim)  # index 0 = background
        self.fc = nn.Linear(feature_dim + embed_dim, hidden)
        self.classifier = nn.Linear(hidden, num_attributes)
        # BCE weight of each attribute's positives (training only); set from the data's attribute frequencies
        self.register_buffer("pos_weight", torch.ones(num_attributes))

    def forward(self, region_feats: Tensor, class_ids: Tensor) -> Tensor:
        hidden = torch.cat([region_feats, self.class_embedding(class_ids).to(region_feats.dtype)], dim=-1)
        return self.classifier(F.relu(self.fc(hidden)))


class RegionRoIHeads(RoIHeads):
    """torchvision's box RoI heads plus the class-conditioned attribute head and its BCE loss.

    Inference in ``forward`` is torchvision's (per-class NMS detections). Training adds ``loss_attributes``: on the
    sampled foreground RoIs, BCE between the attribute head (conditioned on the ground-truth class) and the
    attributes of the matched ground-truth box, averaged over RoIs and attributes. (Summed over attributes it
    outweighs the class loss early on and slows the learning of object classes several-fold.)
    """

    def __init__(
        self, *args, attr_head: AttributeHead | None = None, attr_loss_backbone: bool = True, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.attr_head = attr_head
        self.attr_loss_backbone = attr_loss_backbone

    def region_features(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]):
        """Box-head representations of ``boxes`` (per image (N_i, 4), pixels of the resized image) -> (sum N_i, D)."""
        return self.box_head(self.box_roi_pool(features, boxes, image_sizes))

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: D102 (torchvision's contract)
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        region_feats = self.box_head(pooled)
        class_logits, box_regression = self.box_predictor(region_feats)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.attr_head is not None:
            if not self.attr_loss_backbone:  # the box head learns attributes from backbone features it cannot change
                region_feats = self.box_head(pooled.detach())
            losses["loss_attributes"] = self.attribute_loss(region_feats, labels, matched_idxs, targets)
        return [], losses

    def attribute_loss(self, region_feats: Tensor, labels: list[Tensor], matched_idxs: list[Tensor], targets) -> Tensor:
        num_attributes = self.attr_head.classifier.out_features
        attr_targets = []
        for image_matches, target in zip(matched_idxs, targets):
            gt_attributes = target.get("attributes")
            if gt_attributes is None or gt_attributes.shape[0] == 0:
                gt_attributes = region_feats.new_zeros((1, num_attributes))
                image_matches = torch.zeros_like(image_matches)
            attr_targets.append(gt_attributes[image_matches])
        class_ids = torch.cat(labels)
        foreground = class_ids > 0
        if not bool(foreground.any()):
            return region_feats.sum() * 0.0
        logits = self.attr_head(region_feats[foreground], class_ids[foreground])
        attr_targets = torch.cat(attr_targets)[foreground].to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, attr_targets, pos_weight=self.attr_head.pos_weight)


class Float32RPNHead(RPNHead):
    """torchvision's RPN head with float32 outputs, also under bf16 autocast: anchors are decoded into proposals at
    full precision (bf16 would round a coordinate near 1000 px to a multiple of 8). ``hidden_channels``: the width
    of its 3x3 convolution when not the input's (bottom-up attention's RPN: 512 on res4's 1024)."""

    def __init__(self, in_channels: int, num_anchors: int, hidden_channels: int | None = None) -> None:
        super().__init__(in_channels, num_anchors)
        if hidden_channels and hidden_channels != in_channels:
            from torchvision.ops.misc import Conv2dNormActivation

            self.conv = nn.Sequential(Conv2dNormActivation(in_channels, hidden_channels, kernel_size=3,
                                                           norm_layer=None))
            self.cls_logits = nn.Conv2d(hidden_channels, num_anchors, kernel_size=1)
            self.bbox_pred = nn.Conv2d(hidden_channels, num_anchors * 4, kernel_size=1)
            for layer in self.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.normal_(layer.weight, std=0.01)
                    nn.init.constant_(layer.bias, 0)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32Predictor(FastRCNNPredictor):
    """torchvision's box predictor with float32 outputs, also under bf16 autocast (see ``Float32RPNHead``)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


_POOL: dict[int, object] = {}  # worker count -> ThreadPoolExecutor


def pool_per_image(pool: Callable[..., Tensor], x: dict[str, Tensor], boxes: list[Tensor],
                   image_shapes: list[tuple[int, int]]) -> Tensor | None:
    """``pool(x, boxes, image_shapes)`` with each image of the batch on its own thread, at CPU inference: torchvision's
    CPU RoI kernels run on one thread, so with N threads they leave N - 1 idle. Each call gets one image's maps and
    boxes but the whole batch's ``image_shapes``, from which the maps' scales are inferred (a smaller image alone
    rounds its padded map to the wrong scale, and MultiScaleRoIAlign keeps the scales of its first call). Returns
    (sum K_i, C, S, S) in the images' order, or None where this does not apply (one thread or image, not CPU,
    autograd): call ``pool`` itself."""
    workers = min(torch.get_num_threads(), len(boxes))
    first = next(iter(x.values()))
    if workers < 2 or first.device.type != "cpu" or (torch.is_grad_enabled() and first.requires_grad):
        return None
    from concurrent.futures import ThreadPoolExecutor

    executor = _POOL.setdefault(workers, ThreadPoolExecutor(workers, thread_name_prefix="roi_pool"))
    # autocast and inference mode are per thread: each worker runs under the caller's
    autocast = dict(dtype=torch.get_autocast_dtype("cpu"), enabled=torch.is_autocast_enabled("cpu"))
    inference = torch.is_inference_mode_enabled()

    def one(i: int) -> Tensor:
        with torch.autocast("cpu", **autocast), torch.inference_mode(inference), torch.no_grad():
            return pool({name: level[i:i + 1] for name, level in x.items()}, [boxes[i]], image_shapes)

    jobs = [executor.submit(one, i) for i in range(len(boxes))]
    return torch.cat([job.result() for job in jobs])


class ParallelRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` that, at CPU inference, pools each image of the batch on its own thread
    (``pool_per_image``); per image, the results are identical (the level of each box is per box, the scales per
    feature map and batch). Training and GPU inputs take the parent's path.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        pooled = pool_per_image(super().forward, x, boxes, image_shapes)
        return super().forward(x, boxes, image_shapes) if pooled is None else pooled
