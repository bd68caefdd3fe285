"""The bottom-up-attention C4 detector (``detector.architecture: c4``): Caffe conventions, training and extraction
through ``vl-regions``, and its weights."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from region_features.c4 import C4Backbone, CaffeBottleneck
from region_features.coco import read_instances
from region_features.detector import BoxSelection, RegionDetector
from region_features.runs import read_detector_config
from region_features.store import FeatureStore
from vl.cli.regions import main as vl_regions
from vl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BUTD = ROOT / "configs" / "detector-butd-r101.yaml"
# ResNet-101's layout at one block a stage and 1/8 of the width: a 256-d region feature
TINY = {"c4_blocks": (1, 1, 1, 1), "c4_stem_width": 8, "min_size": 128, "max_size": 213, "train_min_sizes": (128,),
        "anchor_sizes": (16, 32, 64), "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 50,
        "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32,
        "rpn_channels": 32}


def tiny_c4(**changes) -> RegionDetector:
    cfg = read_detector_config(BUTD)
    return RegionDetector(dataclasses.replace(cfg, num_classes=5, num_attributes=3, **{**TINY, **changes}))


def test_caffe_preprocessing_matches_hand_computed_values():
    """BGR, 0-255, the Caffe pixel means subtracted, no std scaling."""
    model = tiny_c4()
    image = torch.rand(3, 4, 5)
    expected = image.flip(0) * 255 - torch.tensor([102.9801, 115.9465, 122.7717]).view(3, 1, 1)
    torch.testing.assert_close(model.transform.normalize(image), expected, atol=2e-3, rtol=0)
    rgb = dataclasses.replace(model.cfg, channel_order="rgb")
    assert not torch.allclose(RegionDetector(rgb).transform.normalize(image), expected, atol=1.0)


def test_the_stride_is_in_the_first_1x1_and_the_stem_pools_as_caffe_does():
    caffe = CaffeBottleneck(16, 8, 32, 2, stride_in_1x1=True)
    torchvision_style = CaffeBottleneck(16, 8, 32, 2, stride_in_1x1=False)
    assert caffe.conv1.stride == (2, 2) and caffe.conv2.stride == (1, 1)
    assert torchvision_style.conv1.stride == (1, 1) and torchvision_style.conv2.stride == (2, 2)
    assert all(conv.bias is None for conv in (caffe.conv1, caffe.conv2, caffe.conv3))
    # 97 x 129: the stem conv gives 49 x 65; Caffe's pool (no padding, rounding up) 24 x 32, where torchvision's
    # (padding 1, rounding down) gives 25 x 33; res3 and res4 halve each side (rounding up): 12 x 16, 6 x 8
    backbone = C4Backbone((1, 1, 1, 1), 8).eval()
    with torch.no_grad():
        res4 = backbone(torch.rand(1, 3, 97, 129))["res4"]
    assert res4.shape == (1, 128, 6, 8)


def test_forward_backward_inference_and_region_features():
    model = tiny_c4()
    assert model.feature_dim == 256 and model.backbone.out_channels == 128
    images = [torch.rand(3, 100, 130), torch.rand(3, 90, 120)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2]),
                "attributes": torch.tensor([[1.0, 0.0, 1.0]])} for _ in images]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
                           "loss_attributes"}
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    # frozen batch norms (no parameters), trainable convolutions in the trunk, the RPN and res5
    assert not list(model.roi_heads.box_head.layer4[0].bn1.parameters())
    for conv in (model.backbone.layer1[0].conv1, model.rpn.head.conv[0][0], model.roi_heads.box_head.layer4[0].conv1):
        assert conv.weight.grad is not None and bool(conv.weight.grad.abs().sum() > 0)
    model.eval()
    with torch.no_grad():
        regions = model.extract_regions([torch.rand(3, 96, 128)], BoxSelection(num_boxes=5))[0]
        again = model.extract_regions([torch.rand(3, 96, 128)], BoxSelection(num_boxes=5))[0]
    assert regions["region_feats"].shape == (5, 256) and regions["attr_probs"].shape == (5, 3)
    assert all(torch.isfinite(value.float()).all() for value in regions.values())
    assert again["region_feats"].shape == (5, 256)


def test_config_errors_name_the_field():
    cfg = read_detector_config(BUTD)
    with pytest.raises(ValueError, match="the c4 box head is res5"):
        dataclasses.replace(cfg, box_head_convs=2)
    with pytest.raises(ValueError, match="c4_blocks needs 4 positive block counts"):
        dataclasses.replace(cfg, c4_blocks=(3, 4, 23))
    with pytest.raises(ValueError, match="channel_order must be rgb or bgr"):
        dataclasses.replace(cfg, channel_order="rbg")


def test_weights_path_loads_a_c4_detector_and_names_a_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    model = tiny_c4().eval()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(tmp_path / "c4.safetensors"))
    loaded = tiny_c4(weights_path=str(tmp_path / "c4.safetensors")).eval()
    image = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        want = model.extract_regions(image, BoxSelection(num_boxes=4))[0]
        got = loaded.extract_regions(image, BoxSelection(num_boxes=4))[0]
    torch.testing.assert_close(got["region_feats"], want["region_feats"])
    del state["roi_heads.box_head.layer4.0.conv2.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match="missing 1 tensors for c4 detector.*layer4.0.conv2.weight"):
        tiny_c4(weights_path=str(tmp_path / "partial.safetensors"))


def test_vl_regions_trains_and_extracts_with_the_c4_detector(world, tmp_path):
    config = tmp_path / "c4.yaml"
    detector = {**yaml.safe_load(BUTD.read_text())["detector"], **{k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in TINY.items()}}
    config.write_text(yaml.safe_dump({"detector": detector, "train": {
        "steps": 3, "batch_size": 2, "warmup_steps": 1, "save_every": 3, "log_every": 1, "optimizer": "sgd",
        "lr": 0.01, "momentum": 0.9}}))
    run = tmp_path / "run"
    assert vl_regions(["train", "--instances", str(world.instances("train")), "--images",
                       str(world.images_dir("train")), "--out", str(run), "--config", str(config)]) == 0
    assert vl_regions(["extract", "--detector", str(run), "--images", str(world.images_dir("val")),
                       "--out", str(tmp_path / "store"), "--num-boxes", "4", "--workers", "0"]) == 0
    store = FeatureStore(tmp_path / "store")
    images = read_instances(world.instances("val")).images
    assert sorted(store.ids()) == sorted(image.image_id for image in images)
    record = store[images[0].image_id]
    assert record["features"].shape == (4, 256) and np.isfinite(record["features"].astype(np.float32)).all()
    assert vl_regions(["extract", "--detector", str(run), "--images", str(world.images_dir("val")),
                       "--out", str(tmp_path / "given"), "--given-boxes", str(world.instances("val")),
                       "--workers", "0"]) == 0
    given = FeatureStore(tmp_path / "given")[images[0].image_id]
    np.testing.assert_array_equal(given["boxes"], np.array([box.bbox for box in images[0].boxes], dtype=np.float32))
    assert given["features"].shape == (len(images[0].boxes), 256)


def test_folded_channels_last_inference_gives_the_same_regions():
    """vl-regions extract folds the batch norms of the trunk and of res5 and runs channels-last: same regions."""
    from region_features.fold import FrozenBatchNorm2d

    model = tiny_c4().eval()
    for module in model.modules():  # batch statistics that are not the identity
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.uniform_(0.5, 1.5)
    image = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        want = model.extract_regions(image, BoxSelection(num_boxes=4))[0]
        fast = copy.deepcopy(model).fold_batch_norms().use_channels_last()
        assert not any(isinstance(module, FrozenBatchNorm2d) for module in fast.modules())
        got = fast.extract_regions(image, BoxSelection(num_boxes=4), given_boxes=[want["boxes"]])[0]
    torch.testing.assert_close(got["region_feats"], want["region_feats"], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got["object_probs"], want["object_probs"], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dilation, side", [(1, 7), (2, 14)])
def test_res5_halves_the_pool_or_runs_dilated_over_all_of_it(dilation, side):
    """detectron2's C4 res5 strides its first block; the published VG model's keeps the 14x14 pool, dilated."""
    from region_features.c4 import Res5Head

    head = Res5Head(2, 8, dilation=dilation).eval()
    assert all(block.conv2.dilation == (dilation, dilation) for block in head.layer4)
    with torch.no_grad():
        assert head.layer4(torch.rand(3, 128, 14, 14)).shape == (3, 256, side, side)
        assert head(torch.rand(3, 128, 14, 14)).shape == (3, 256)


def test_the_rpn_width_and_caffe_roi_max_pooling():
    from region_features.c4 import RoIMaxPool

    model = tiny_c4()
    assert model.rpn.head.conv[0][0].out_channels == 32 and model.rpn.head.cls_logits.in_channels == 32
    assert model.rpn.head.cls_logits.out_channels == 9  # 3 sizes x 3 aspect ratios on the one map
    feature = torch.zeros(1, 2, 8, 8)
    feature[0, 0, 2, 3], feature[0, 1, 6, 6] = 5.0, 7.0  # one peak inside the box, one outside
    pooled = RoIMaxPool("res4", 1)({"res4": feature}, [torch.tensor([[32.0, 16.0, 64.0, 48.0]])], [(128, 128)])
    assert pooled.shape == (1, 2, 1, 1) and pooled.flatten().tolist() == [5.0, 0.0]  # the map is at stride 16
    with pytest.raises(ValueError, match="max pooling is for the c4 architecture"):
        dataclasses.replace(read_detector_config(ROOT / "configs" / "detector-resnet50.yaml"), roi_pool="max")
