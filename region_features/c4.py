"""The bottom-up-attention detector's ResNet (Anderson et al. 2018), in the Caffe conventions of its published
weights, split as a C4 Faster R-CNN splits it.

- ``C4Backbone``: the stem and res2-res4. The RPN and the RoI pooling both read res4 (stride 16).
- ``Res5Head``: res5 on each pooled RoI (halving the 14x14 pool, or dilated over all of it as in the published
  Visual Genome model), then the mean over space, which is the 2048-d region feature that the class, box and
  attribute predictors read.

Caffe conventions (MSRA's ResNet, as the bottom-up-attention weights were trained): a bottleneck's stride sits in
its first 1x1 convolution (``stride_in_1x1``; torchvision and timm put it in the 3x3), convolutions have no bias,
and the stem's max pool has no padding and rounds its output size up (Caffe's pooling). Batch norms are frozen
with published weights (``frozen_bn``) and trainable otherwise. The BGR, 0-255, mean-only input normalisation is the
detector config's (``channel_order: bgr`` with ``image_mean`` and ``image_std``), done by the detector's transform.

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``..``layer3``; the head's ``layer4``), so
batch-norm folding finds each convolution and its norm as consecutive children.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool
from torchvision.ops.misc import FrozenBatchNorm2d

from region_features.detector_heads import pool_per_image


def norm_layer(frozen: bool) -> Callable[[int], nn.Module]:
    return FrozenBatchNorm2d if frozen else nn.BatchNorm2d


class CaffeBottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a projection shortcut when the shape changes; the stride in the first 1x1 (Caffe) or
    in the 3x3 (torchvision)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int, *,
                 stride_in_1x1: bool = True, dilation: int = 1,
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        first, middle = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, stride=first, bias=False)
        self.bn1 = norm(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride=middle, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = norm(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            norm(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        # in place, as torchvision's bottleneck: on res5's RoI batches these element-wise passes cost as much as
        # the convolutions, and a fresh (N, 2048, 14, 14) tensor for each is most of that
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


def res_stage(blocks: int, in_channels: int, mid_channels: int, stride: int, *, stride_in_1x1: bool,
              norm: Callable[[int], nn.Module], dilation: int = 1) -> nn.Sequential:
    """One ResNet stage of ``blocks`` bottlenecks (output 4 * ``mid_channels``); the first one strides."""
    out_channels = 4 * mid_channels
    layers = []
    for index in range(blocks):
        layers.append(CaffeBottleneck(in_channels if index == 0 else out_channels, mid_channels, out_channels,
                                      stride if index == 0 else 1, stride_in_1x1=stride_in_1x1, dilation=dilation,
                                      norm=norm))
    return nn.Sequential(*layers)


class C4Backbone(nn.Module):
    """Stem + res2, res3, res4 of a ResNet with ``blocks`` bottlenecks per stage (ResNet-101: 3, 4, 23, 3; the
    last count is the head's) and ``stem_width`` stem channels (64).

    forward(images (B, 3, H, W)) -> OrderedDict(res4=(B, 16 * stem_width, ceil(H / 16), ceil(W / 16))).
    """

    featmap_names = ["res4"]

    def __init__(self, blocks: tuple[int, int, int, int], stem_width: int = 64, *, stride_in_1x1: bool = True,
                 frozen_bn: bool = False) -> None:
        super().__init__()
        norm = norm_layer(frozen_bn)
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(stem_width)
        self.layer1 = res_stage(blocks[0], stem_width, stem_width, 1, stride_in_1x1=stride_in_1x1, norm=norm)
        self.layer2 = res_stage(blocks[1], 4 * stem_width, 2 * stem_width, 2, stride_in_1x1=stride_in_1x1, norm=norm)
        self.layer3 = res_stage(blocks[2], 8 * stem_width, 4 * stem_width, 2, stride_in_1x1=stride_in_1x1, norm=norm)
        self.out_channels = 16 * stem_width  # res4: 1024 for ResNet-101
        self.width = 32 * stem_width  # res5, the head's output: 2048

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)  # Caffe's pooling
        return OrderedDict(res4=self.layer3(self.layer2(self.layer1(x))))


class Res5Head(nn.Module):
    """The RoI head's res5 stage on pooled res4 RoIs, then the mean over space.

    ``dilation`` 1: the first block strides 2, halving the pool (detectron2's C4); 2: no stride, and every 3x3
    convolution dilated by 2 over the whole pool (the published Visual Genome model's res5).

    forward(pooled (N, 16 * stem_width, S, S)) -> (N, 32 * stem_width) region features.
    """

    def __init__(self, blocks: int, stem_width: int = 64, *, stride_in_1x1: bool = True, dilation: int = 1,
                 frozen_bn: bool = False) -> None:
        super().__init__()
        self.layer4 = res_stage(blocks, 16 * stem_width, 8 * stem_width, 2 if dilation == 1 else 1,
                                stride_in_1x1=stride_in_1x1, norm=norm_layer(frozen_bn), dilation=dilation)

    def forward(self, pooled: Tensor) -> Tensor:
        if self.layer4[0].conv1.weight.is_contiguous(memory_format=torch.channels_last):  # use_channels_last
            pooled = pooled.contiguous(memory_format=torch.channels_last)
        return self.layer4(pooled).mean(dim=(2, 3))


class RoIMaxPool(nn.Module):
    """Caffe's ROIPooling on one feature map (torchvision's ``roi_pool``), with ``MultiScaleRoIAlign``'s contract:
    forward(features {name: (B, C, h, w)}, boxes per image (K_i, 4) pixels, image_shapes) -> (sum K_i, C, S, S).
    The map's scale is inferred as MultiScaleRoIAlign infers it, a power of 2 from its size against the images'."""

    def __init__(self, featmap_name: str, output_size: int) -> None:
        super().__init__()
        self.featmap_name = featmap_name
        self.output_size = output_size

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        feature = features[self.featmap_name]
        largest = max(shape[0] for shape in image_shapes)
        scale = 2.0 ** round(math.log2(feature.shape[-2] / largest))

        def pool(maps: dict[str, Tensor], image_boxes: list[Tensor], _shapes) -> Tensor:
            return roi_pool(maps[self.featmap_name], image_boxes, self.output_size, scale)

        # torchvision's CPU kernel has no bf16: max pooling in float32 is exact, then back to the map's dtype
        maps, boxes = {self.featmap_name: feature.float()}, [b.float() for b in boxes]
        pooled = pool_per_image(pool, maps, boxes, image_shapes)
        return (pool(maps, boxes, image_shapes) if pooled is None else pooled).to(feature.dtype)
