"""A bottom-up-attention-style Faster R-CNN: a ``timm`` backbone with torchvision's FPN, RPN and RoI heads, plus an
attribute head conditioned on the object class; or (``architecture: c4``) bottom-up attention's own ResNet-101 C4
layout, with the RPN and RoI pooling on res4 and res5 as the box head (``region_features.c4``).

Contract (torchvision's, see ``torchvision.models.detection.faster_rcnn``):
- input: a list of float images (3, H, W) in [0, 1], any sizes;
- training: ``model(images, targets)`` with per image ``boxes`` (N, 4) float x1y1x2y2 pixels, ``labels`` (N,) int64 in
  1..num_classes (0 is background) and, when the attribute head is on, ``attributes`` (N, A) float multi-hot; returns
  a dict of named losses (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg`` and
  ``loss_attributes``);
- inference: returns per image ``boxes`` (M, 4), ``scores`` (M,), ``labels`` (M,), exactly as torchvision's
  ``FasterRCNN`` does.

Region features. Bottom-up attention (Anderson et al. 2018) takes the 2048-d mean-pooled res5 output of each box as
its feature, and the classifiers read that same vector. Here the box head is torchvision's two-layer MLP on the 7x7
RoIAlign of the FPN, or ``box_head_convs`` conv layers and one FC layer (with BatchNorm before its ReLU when
``box_head_fc_norm``), and its output representation is the region feature: the vector the class, box and attribute
predictors read. Its width (``RegionDetector.feature_dim``) is ``representation_size`` when set, else the backbone's
last-stage width: 2048 for resnet50/101, 512 for resnet18. With the torchvision backbone it is torchvision's 1024.

``extract_regions`` runs the bottom-up-attention recipe on images that are already resized: per proposal the best
foreground class and its regressed box, class-agnostic NMS, 10-100 boxes by score threshold (or a fixed K), then a
second RoI pass over exactly the chosen (or given) boxes for features, class distribution and attributes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, clip_boxes_to_image, nms
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from region_features.c4 import C4Backbone, Res5Head, RoIMaxPool
from region_features.detector_heads import (
    AttributeHead,
    Float32Predictor,
    Float32RPNHead,
    ParallelRoIAlign,
    RegionRoIHeads,
)
from vl.errors import UserError

TORCHVISION_R50_FPN = "torchvision-fasterrcnn_resnet50_fpn"


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's architecture and its inference settings. Derived sizes live on ``RegionDetector``."""

    # "fpn": a timm or torchvision backbone under an FPN; "c4": bottom-up attention's ResNet, RPN and RoI pooling on
    # res4 and res5 as the box head (region_features.c4)
    architecture: Literal["fpn", "c4"] = "fpn"
    backbone: str = "resnet18"  # fpn: a timm model name (features_only), or "torchvision-fasterrcnn_resnet50_fpn"
    c4_blocks: tuple[int, int, int, int] = (3, 4, 23, 3)  # c4: bottlenecks in res2..res5 (ResNet-101)
    c4_stem_width: int = 64  # c4: stem channels; res4 has 16x, the region feature 32x (2048)
    stride_in_1x1: bool = True  # c4: Caffe's bottleneck, the stride in its first 1x1 convolution
    channel_order: Literal["rgb", "bgr"] = "rgb"  # the channel order the backbone reads (Caffe weights: bgr)
    # c4: 1, res5's first block halves the RoI pool (detectron2); 2, no stride and dilated 3x3s (the published VG model)
    c4_res5_dilation: int = 1
    rpn_channels: int | None = None  # the RPN's 3x3 convolution width; None = its input's (torchvision)
    roi_pool: Literal["align", "max"] = "align"  # RoIAlign, or Caffe's RoI max pooling (c4 only)
    backbone_args: dict[str, Any] = field(default_factory=dict)  # timm model arguments, e.g. {channels: [32, 64]}
    weights_path: str | None = None  # local weights: a torchvision Faster R-CNN state dict, or timm backbone weights
    pretrained: bool = False  # timm's downloadable weights: never (no network); use weights_path instead
    out_indices: tuple[int, ...] = (1, 2, 3, 4)  # timm feature levels fed to the FPN (strides 4..32 for resnets)
    fpn_channels: int = 64  # FPN width (torchvision backbone: always 256)
    frozen_bn: bool = False  # timm backbone: freeze its BatchNorm statistics and affine (with pretrained weights)
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)  # one anchor size per FPN level, the extra pool level last
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor height/width ratios, the same at every level
    min_size: int = 800  # test-time shorter image side after resizing
    max_size: int = 1333  # cap on the longer side after resizing
    train_min_sizes: tuple[int, ...] = ()  # multi-scale training: shorter side drawn from these; empty = (min_size,)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_classes: int = 0  # object classes without background; set from the training data
    attribute_head: bool = True  # train/predict attributes when the data has them
    num_attributes: int = 0  # attribute vocabulary size; set from the training data (0 = no attribute head)
    attr_class_embed_dim: int = 64  # width of the object-class embedding the attribute head is conditioned on
    attr_hidden_size: int = 256  # attribute head hidden width
    attr_loss_backbone: bool = True  # false: the attribute loss trains the box and attribute heads, not the backbone
    representation_size: int | None = None  # box head output = region feature width; None = backbone width
    box_head_convs: int = 0  # 0: torchvision's two-layer MLP box head; n: n conv3x3+BN layers, then one FC layer
    box_head_fc_norm: bool = False  # conv box head: BatchNorm before the FC layer's ReLU, so no feature unit dies
    roi_output_size: int = 7  # RoIAlign output resolution
    roi_sampling_ratio: int = 2  # RoIAlign sampling points per bin side
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512  # sampled RoIs per image for the box head loss
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05  # detection mode: minimum class score
    box_nms_thresh: float = 0.5  # detection mode: per-class NMS IoU
    box_detections_per_img: int = 100  # detection mode: at most this many detections per image

    def __post_init__(self) -> None:
        if self.pretrained:
            raise ValueError("detector.pretrained must be false: weights cannot be downloaded; set weights_path")
        if self.num_classes < 0 or self.num_attributes < 0:
            raise ValueError("detector.num_classes and detector.num_attributes must be >= 0")
        if self.min_size <= 0 or self.max_size <= 0 or any(s <= 0 for s in self.train_min_sizes):
            raise ValueError("detector image sizes must be positive")
        if self.architecture not in ("fpn", "c4"):
            raise ValueError(f"detector.architecture must be fpn or c4, got {self.architecture!r}")
        if self.roi_pool not in ("align", "max"):
            raise ValueError(f"detector.roi_pool must be align or max, got {self.roi_pool!r}")
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"detector.channel_order must be rgb or bgr, got {self.channel_order!r}")
        if self.architecture == "c4":
            if len(self.c4_blocks) != 4 or min(self.c4_blocks) < 1 or self.c4_stem_width < 1:
                raise ValueError("detector.c4_blocks needs 4 positive block counts (res2..res5) and c4_stem_width "
                                 f"a positive width, got {list(self.c4_blocks)} and {self.c4_stem_width}")
            if self.box_head_convs or self.box_head_fc_norm or self.representation_size:
                raise ValueError("detector.box_head_convs, box_head_fc_norm and representation_size are the fpn "
                                 "box head's: the c4 box head is res5")
            if not self.anchor_sizes:
                raise ValueError("detector.anchor_sizes needs at least one size")
            if self.c4_res5_dilation not in (1, 2):
                raise ValueError(f"detector.c4_res5_dilation must be 1 or 2, got {self.c4_res5_dilation}")
            return
        if self.roi_pool != "align":
            raise ValueError("detector.roi_pool: max pooling is for the c4 architecture's one map; the FPN uses align")
        levels = 5 if self.is_torchvision else len(self.out_indices) + 1
        if len(self.anchor_sizes) != levels:
            raise ValueError(
                f"detector.anchor_sizes needs {levels} sizes (one per FPN level plus the pool level), "
                f"got {len(self.anchor_sizes)}"
            )

    @property
    def is_torchvision(self) -> bool:
        return self.architecture == "fpn" and self.backbone == TORCHVISION_R50_FPN

    @property
    def has_attributes(self) -> bool:
        return self.attribute_head and self.num_attributes > 0


@dataclass(frozen=True)
class BoxSelection:
    """Which boxes ``extract_regions`` keeps per image (bottom-up attention: 10-100 boxes with score >= 0.2)."""

    min_boxes: int = 10
    max_boxes: int = 100
    score_threshold: float = 0.2
    num_boxes: int | None = None  # a fixed K per image; overrides min/max/threshold
    nms_threshold: float = 0.3  # class-agnostic NMS IoU between kept boxes

    def __post_init__(self) -> None:
        if self.num_boxes is not None and self.num_boxes < 1:
            raise UserError(f"--num-boxes must be >= 1, got {self.num_boxes}")
        if self.min_boxes < 1 or self.max_boxes < self.min_boxes:
            raise UserError(f"need 1 <= --min-boxes <= --max-boxes, got {self.min_boxes} and {self.max_boxes}")


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` model under torchvision's FPN (with the extra max-pool level).

    forward(images (B, 3, H, W)) -> OrderedDict of FPN maps "0".."L-1" and "pool", each (B, out_channels, h, w).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: tuple[int, ...],
        fpn_channels: int,
        frozen_bn: bool = False,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm
        from timm.layers import freeze_batch_norm_2d

        try:
            self.body = timm.create_model(
                model_name, pretrained=False, features_only=True, out_indices=out_indices, **(model_args or {})
            )
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise UserError(f"detector.backbone: {str(err).splitlines()[0]}") from None
        except TypeError as err:  # an argument the model does not take
            raise UserError(f"detector.backbone_args do not fit {model_name}: {err}") from None
        except (IndexError, AssertionError, ValueError) as err:
            raise UserError(f"detector.out_indices {list(out_indices)} do not fit {model_name}: {err}") from None
        if frozen_bn:
            self.body = freeze_batch_norm_2d(self.body)
        channels = list(self.body.feature_info.channels())
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.width = channels[-1]  # the last stage's channels: the "backbone width"
        self.featmap_names = [str(i) for i in range(len(channels))]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        levels = self.body(images)
        return self.fpn(OrderedDict((name, level) for name, level in zip(self.featmap_names, levels)))


def _torchvision_r50_fpn_backbone() -> BackboneWithFPN:
    """torchvision's ``fasterrcnn_resnet50_fpn`` backbone (frozen BN, conv1 and layer1 frozen), same module names."""
    from torchvision.models import resnet50

    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    for name, parameter in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            parameter.requires_grad_(False)
    return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    backbone = BackboneWithFPN(body, return_layers, [256, 512, 1024, 2048], 256, extra_blocks=LastLevelMaxPool())
    backbone.width = 2048
    backbone.featmap_names = ["0", "1", "2", "3"]
    return backbone


class _MultiScaleTransform(GeneralizedRCNNTransform):
    """torchvision's transform, with the training-time shorter side drawn from ``train_min_sizes``, and the channels
    reversed before normalising when the backbone reads BGR (``bgr``)."""

    def __init__(self, train_min_sizes: tuple[int, ...], *args, bgr: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_min_sizes = list(train_min_sizes)
        self.bgr = bgr

    def normalize(self, image: Tensor) -> Tensor:
        return super().normalize(image.flip(-3) if self.bgr else image)

    def torch_choice(self, k: list[int]) -> int:
        return super().torch_choice(self.train_min_sizes or k)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """The (height, width, scale) torchvision's transform resizes an image to: shorter side ``min_size``, longer side
    at most ``max_size``, each side at least one pixel."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, int(math.floor(height * scale))), max(1, int(math.floor(width * scale))), scale


class RegionDetector(GeneralizedRCNN):
    """Faster R-CNN with FPN over a timm (or torchvision resnet50) backbone, with an attribute head.

    Submodule names follow torchvision (``backbone.body``, ``backbone.fpn``, ``rpn.head``, ``roi_heads.box_head``,
    ``roi_heads.box_predictor``), so a torchvision ``fasterrcnn_resnet50_fpn`` state dict loads as is.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        if cfg.num_classes < 1:
            raise UserError("detector.num_classes must be >= 1 (it is set from the training categories)")
        initial_state = _read_state_dict(Path(cfg.weights_path)) if cfg.weights_path is not None else None
        if cfg.architecture == "c4":
            backbone = C4Backbone(cfg.c4_blocks, cfg.c4_stem_width, stride_in_1x1=cfg.stride_in_1x1,
                                  frozen_bn=cfg.frozen_bn)
            representation_size = backbone.width
        elif cfg.is_torchvision:
            if cfg.box_head_convs or cfg.box_head_fc_norm:
                raise UserError("detector.box_head_convs and box_head_fc_norm need a timm backbone: the torchvision "
                                "backbone keeps its MLP head")
            backbone = _torchvision_r50_fpn_backbone()
            representation_size = cfg.representation_size or 1024
        else:
            backbone = TimmFPNBackbone(
                cfg.backbone, cfg.out_indices, cfg.fpn_channels, cfg.frozen_bn, cfg.backbone_args
            )
            representation_size = cfg.representation_size or backbone.width
        if cfg.architecture == "c4":  # every anchor size on the one res4 map
            anchor_generator = AnchorGenerator(sizes=(tuple(cfg.anchor_sizes),),
                                               aspect_ratios=(tuple(cfg.aspect_ratios),))
        else:  # one size per FPN level
            anchor_generator = AnchorGenerator(sizes=tuple((size,) for size in cfg.anchor_sizes),
                                               aspect_ratios=(tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes))
        rpn = RegionProposalNetwork(
            anchor_generator,
            Float32RPNHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], cfg.rpn_channels),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=cfg.rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n=dict(training=cfg.rpn_pre_nms_top_n_train, testing=cfg.rpn_pre_nms_top_n_test),
            post_nms_top_n=dict(training=cfg.rpn_post_nms_top_n_train, testing=cfg.rpn_post_nms_top_n_test),
            nms_thresh=cfg.rpn_nms_thresh,
        )
        if cfg.roi_pool == "max":
            box_roi_pool = RoIMaxPool(backbone.featmap_names[0], cfg.roi_output_size)
        else:
            box_roi_pool = ParallelRoIAlign(
                backbone.featmap_names, output_size=cfg.roi_output_size, sampling_ratio=cfg.roi_sampling_ratio
            )
        if cfg.architecture == "c4":
            box_head = Res5Head(cfg.c4_blocks[3], cfg.c4_stem_width, stride_in_1x1=cfg.stride_in_1x1,
                                dilation=cfg.c4_res5_dilation, frozen_bn=cfg.frozen_bn)
        elif cfg.box_head_convs:
            box_head = FastRCNNConvFCHead(
                (backbone.out_channels, cfg.roi_output_size, cfg.roi_output_size),
                [backbone.out_channels] * cfg.box_head_convs,
                [representation_size],
                norm_layer=nn.BatchNorm2d,
            )
            if cfg.box_head_fc_norm:  # [convs, flatten, fc, relu] -> [convs, flatten, fc, bn, relu]
                box_head.insert(len(box_head) - 1, nn.BatchNorm1d(representation_size))
        else:
            box_head = TwoMLPHead(backbone.out_channels * cfg.roi_output_size**2, representation_size)
        box_predictor = Float32Predictor(representation_size, cfg.num_classes + 1)
        attr_head = None
        if cfg.has_attributes:
            attr_head = AttributeHead(
                representation_size, cfg.num_classes, cfg.num_attributes, cfg.attr_class_embed_dim, cfg.attr_hidden_size
            )
        roi_heads = RegionRoIHeads(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=cfg.box_batch_size_per_image,
            positive_fraction=cfg.box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=cfg.box_score_thresh,
            nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.box_detections_per_img,
            attr_head=attr_head,
            attr_loss_backbone=cfg.attr_loss_backbone,
        )
        transform = _MultiScaleTransform(
            cfg.train_min_sizes, cfg.min_size, cfg.max_size, list(cfg.image_mean), list(cfg.image_std),
            bgr=cfg.channel_order == "bgr",
        )
        super().__init__(backbone, rpn, roi_heads, transform)
        self.cfg = cfg
        self._channels_last = False
        if initial_state is not None:
            load_initial_weights(self, cfg.weights_path, initial_state)

    @property
    def feature_dim(self) -> int:
        """Width of the region features (the box head's representation)."""
        return self.roi_heads.box_predictor.cls_score.in_features

    @property
    def num_classes(self) -> int:
        return self.roi_heads.box_predictor.cls_score.out_features - 1

    @property
    def num_attributes(self) -> int:
        head = self.roi_heads.attr_head
        return 0 if head is None else head.classifier.out_features

    def use_channels_last(self) -> RegionDetector:
        """Store conv weights and feed the backbone channels-last batches (oneDNN convolutions and pooling on CPU
        run about 1.5x faster so, in training and inference). Idempotent; returns the model."""
        self.to(memory_format=torch.channels_last)
        if not self._channels_last:
            self.backbone.register_forward_pre_hook(_to_channels_last)
            self._channels_last = True
        return self

    def fold_batch_norms(self) -> RegionDetector:
        """For inference only: fold the backbone's eval-mode batch norms into its convolutions
        (``region_features.fold``; kept unfolded when the folded copy does not match). Returns the model."""
        from region_features.fold import fold_backbone, fold_batch_norms

        self.eval()
        self.backbone, _ = fold_backbone(self.backbone)
        if self.cfg.architecture == "c4":  # res5, the box head: each norm follows its convolution
            fold_batch_norms(self.roi_heads.box_head)
        return self

    def resized_shape(self, height: int, width: int) -> tuple[int, int, float]:
        """(height, width, scale) this model's inference resizes an image of (height, width) to."""
        return resized_shape(height, width, self.cfg.min_size, self.cfg.max_size)

    def backbone_features(self, images: list[Tensor]) -> tuple[ImageList, OrderedDict[str, Tensor]]:
        """Normalise, pad into one batch and run the backbone. ``images``: (3, h, w) float in [0, 1] or uint8,
        already at model scale (see ``resized_shape``)."""
        normalised = []
        for image in images:
            image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            normalised.append(self.transform.normalize(image))
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in normalised]
        batch = self.transform.batch_images(normalised, size_divisible=self.transform.size_divisible)
        image_list = ImageList(batch, sizes)
        features = self.backbone(image_list.tensors)
        return image_list, features

    def detect_resized(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """torchvision-style detections (``boxes`` (M, 4), ``scores``, ``labels``) for already-resized images; boxes
        are in the pixels of the given images. Call in eval mode."""
        image_list, features = self.backbone_features(images)
        proposals, _ = self.rpn(image_list, features)
        detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        return detections

    def extract_regions(
        self,
        images: list[Tensor],
        selection: BoxSelection,
        given_boxes: list[Tensor] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Regions of already-resized images, the bottom-up-attention way. Call in eval mode.

        images: (3, h, w) float in [0, 1] or uint8. given_boxes: per image (K_i, 4) x1y1x2y2 in those pixels; when
        given, exactly these boxes are described and no boxes are chosen.
        Returns per image: ``boxes`` (K, 4) float32 pixels of the given image, ``region_feats`` (K, D) float32,
        ``object_probs`` (K, C) foreground class distribution (background dropped, renormalised), ``object_ids``
        (K,) int64 in 0..C-1, ``object_conf`` (K,) the detection score P(class) with background included,
        ``attr_ids`` (K,) int64 (-1 without an attribute head), ``attr_conf`` (K,) its sigmoid probability,
        ``attr_probs`` (K, A) every attribute's sigmoid probability, ``selection_scores`` (K,) the score each box
        was chosen by (0 for whole-image fill boxes; 1 for given boxes).
        """
        image_list, features = self.backbone_features(images)
        if given_boxes is None:
            proposals, _ = self.rpn(image_list, features)
        # RoIAlign reads contiguous maps: made so once here, not by each of its calls below
        features = OrderedDict((name, level.contiguous()) for name, level in features.items())
        if given_boxes is None:
            region_feats = self.roi_heads.region_features(features, proposals, image_list.image_sizes)
            class_logits, box_regression = self.roi_heads.box_predictor(region_feats)
            decoded = self.roi_heads.box_coder.decode(box_regression, proposals)  # (sum N, C+1, 4)
            scores = F.softmax(class_logits, -1)
            counts = [len(p) for p in proposals]
            selected = [
                select_boxes(image_boxes, image_scores, size, selection)
                for image_boxes, image_scores, size in zip(
                    decoded.split(counts), scores.split(counts), image_list.image_sizes
                )
            ]
            chosen = [boxes for boxes, _ in selected]
            selection_scores = [box_scores for _, box_scores in selected]
        else:
            chosen = [boxes.float().reshape(-1, 4) for boxes in given_boxes]
            selection_scores = [boxes.new_ones(len(boxes)) for boxes in chosen]
        regions = self.describe_boxes(features, chosen, image_list.image_sizes)
        for region, box_scores in zip(regions, selection_scores):
            region["selection_scores"] = box_scores
        return regions

    def describe_boxes(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Features, class distribution and attributes of exactly ``boxes`` (per image (K_i, 4), resized pixels)."""
        region_feats = self.roi_heads.region_features(features, boxes, image_sizes)
        class_logits, _ = self.roi_heads.box_predictor(region_feats)
        region_feats, class_logits = region_feats.float(), class_logits.float()
        probs = F.softmax(class_logits, -1)
        foreground = probs[:, 1:]
        object_conf, object_ids = foreground.max(-1)
        object_probs = foreground / foreground.sum(-1, keepdim=True).clamp_min(1e-12)
        if self.roi_heads.attr_head is not None:
            attr_probs = torch.sigmoid(self.roi_heads.attr_head(region_feats, object_ids + 1).float())
            attr_conf, attr_ids = attr_probs.max(-1)
        else:
            attr_probs = region_feats.new_zeros((len(region_feats), 0))
            attr_conf = region_feats.new_zeros(len(region_feats))
            attr_ids = torch.full((len(region_feats),), -1, dtype=torch.int64)
        counts = [len(b) for b in boxes]
        per_image = {
            "region_feats": region_feats.split(counts),
            "object_probs": object_probs.split(counts),
            "object_ids": object_ids.split(counts),
            "object_conf": object_conf.split(counts),
            "attr_ids": attr_ids.split(counts),
            "attr_conf": attr_conf.split(counts),
            "attr_probs": attr_probs.split(counts),
        }
        return [
            {"boxes": image_boxes.float(), **{key: parts[i] for key, parts in per_image.items()}}
            for i, image_boxes in enumerate(boxes)
        ]


def select_boxes(
    boxes: Tensor, scores: Tensor, image_size: tuple[int, int], selection: BoxSelection
) -> tuple[Tensor, Tensor]:
    """Choose one image's boxes from its proposals' per-class boxes.

    boxes: (N, C+1, 4) decoded per-class boxes; scores: (N, C+1) softmax with background at 0.
    Per proposal the best foreground class gives its box and score; class-agnostic NMS ranks the survivors by score,
    followed by the suppressed boxes (so ``min_boxes``/K can always be met); then K = ``num_boxes``, or the number
    of survivors scoring >= ``score_threshold`` clamped to [min_boxes, max_boxes]. When an image has fewer than K
    candidates at all, the whole-image box fills the rest (score 0). Returns boxes (K, 4) and their scores (K,).
    """
    height, width = image_size
    foreground = scores[:, 1:]
    if len(foreground):
        best_scores, best_classes = foreground.max(-1)
        candidates = boxes[torch.arange(len(boxes)), best_classes + 1]
        candidates = clip_boxes_to_image(candidates, (height, width))
        kept = nms(candidates, best_scores, selection.nms_threshold)
        suppressed_mask = torch.ones(len(candidates), dtype=torch.bool)
        suppressed_mask[kept] = False
        suppressed = torch.nonzero(suppressed_mask).flatten()
        suppressed = suppressed[torch.argsort(best_scores[suppressed], descending=True, stable=True)]
        order = torch.cat([kept, suppressed])
        above = int((best_scores[kept] >= selection.score_threshold).sum())
    else:
        candidates = boxes.new_zeros((0, 4))
        order = torch.zeros(0, dtype=torch.int64)
        above = 0
    if selection.num_boxes is not None:
        count = selection.num_boxes
    else:
        count = min(max(above, selection.min_boxes), selection.max_boxes)
    chosen = candidates[order[:count]]
    chosen_scores = best_scores[order[:count]] if len(foreground) else candidates.new_zeros(0)
    if len(chosen) < count:
        whole = torch.tensor([[0.0, 0.0, float(width), float(height)]], dtype=chosen.dtype)
        chosen = torch.cat([chosen, whole.expand(count - len(chosen), 4)])
        chosen_scores = torch.cat([chosen_scores, chosen_scores.new_zeros(count - len(chosen_scores))])
    return chosen, chosen_scores


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"detector.weights_path: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable state dict ({detail})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return state


def load_initial_weights(
    model: RegionDetector, weights_path: str, state: dict[str, Tensor] | None = None
) -> list[str]:
    """Load ``weights_path`` into ``model``; returns the names left at their initialisation.

    torchvision backbone: a ``fasterrcnn_resnet50_fpn`` state dict (``.pth``/``.pt``/``.safetensors``, optionally
    wrapped in ``{"model": ...}``). When the class count differs from the file's, the box predictor stays freshly
    initialised. timm backbone: the timm classification model's weights, loaded into ``backbone.body``.
    Any missing or mis-shaped tensor raises a one-line UserError naming the file. ``state``: the file's tensors
    when already read.
    """
    path = Path(weights_path)
    state = _read_state_dict(path) if state is None else state
    if model.cfg.architecture == "c4":  # a whole detector of this architecture (a vl-regions train run's weights)
        target, own, skip = model, model.state_dict(), ()
    elif model.cfg.is_torchvision:
        target = model
        own = model.state_dict()
        skip = ("roi_heads.attr_head.",)
        predictor_keys = [k for k in state if k.startswith("roi_heads.box_predictor.")]
        if any(k in own and own[k].shape != state[k].shape for k in predictor_keys):
            state = {k: v for k, v in state.items() if k not in predictor_keys}
            skip += ("roi_heads.box_predictor.",)
    else:
        target = model.backbone.body
        own = target.state_dict()
        state = {k: v for k, v in state.items() if k in own}  # the classifier head is not part of features_only
        skip = ()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    kind = "c4 detector" if model.cfg.architecture == "c4" else model.cfg.backbone
    for key, value in state.items():
        if key not in own:
            raise UserError(f"{path}: unexpected tensor '{key}': not a {kind} state dict")
        if own[key].shape != value.shape:
            raise UserError(
                f"{path}: tensor '{key}' has shape {list(value.shape)}, the model needs {list(own[key].shape)}"
            )
    missing = [k for k in own if k not in state and not k.startswith(skip) and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"{path}: missing {len(missing)} tensors for {kind} (first: '{missing[0]}')")
    target.load_state_dict(state, strict=False)
    return [k for k in own if k not in state]
