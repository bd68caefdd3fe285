"""The installed environment: torchvision's compiled ops must run with the installed torch."""

import torch
import torchvision
from torchvision.ops import nms, roi_align


def test_nms_runs_and_suppresses_overlaps():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_roi_align_runs_and_averages_a_constant_region():
    features = torch.zeros(1, 2, 16, 16)
    features[:, 0, :8, :8] = 3.0  # channel 0 is 3 in the top-left quadrant
    features[:, 1] = 1.0
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]])  # (batch index, x1, y1, x2, y2)
    pooled = roi_align(features, rois, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert pooled.shape == (1, 2, 2, 2)
    torch.testing.assert_close(pooled[0, 0], torch.full((2, 2), 3.0))
    torch.testing.assert_close(pooled[0, 1], torch.ones(2, 2))


def test_versions_are_a_matching_pair():
    torch_major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    vision_major_minor = tuple(int(p) for p in torchvision.__version__.split("+")[0].split(".")[:2])
    assert vision_major_minor >= (0, 29)
    assert torch_major_minor >= (2, 14)
