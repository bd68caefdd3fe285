"""The region detector: model, attribute head, flips, torchvision weights, and the train/detect/extract commands."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vl.cli.regions import main as vl_regions
from region_features.coco import read_instances
from region_features.detector import TORCHVISION_R50_FPN, BoxSelection, DetectorConfig, RegionDetector, select_boxes
from region_features.pipeline import DetectorLabels
from region_features.store import FeatureStore
from region_features.runs import load_detector
from region_features.train_data import DetectionTrainData
from vl.errors import UserError

TINY = {
    "backbone": "test_resnet",
    "out_indices": [1, 2, 3],
    "fpn_channels": 16,
    "anchor_sizes": [12, 24, 48, 96],
    "aspect_ratios": [1.0],
    "min_size": 64,
    "max_size": 112,
    "representation_size": 32,
    "attr_class_embed_dim": 8,
    "attr_hidden_size": 16,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "box_score_thresh": 0.0,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_detector(**changes) -> RegionDetector:
    torch.manual_seed(0)
    return RegionDetector(DetectorConfig(**{**TINY, "num_classes": 3, "num_attributes": 4, **changes}))


def synthetic_batch(num_images: int = 2, size: int = 64) -> tuple[list[torch.Tensor], list[dict]]:
    """Images with one bright square each, whose class and attributes follow from its position."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(num_images):
        image = torch.rand(3, size, size, generator=generator) * 0.2
        x, y = 8 + 10 * i, 12
        image[:, y : y + 24, x : x + 24] = 0.9
        images.append(image)
        attributes = torch.zeros(1, 4)
        attributes[0, i % 4] = 1.0
        targets.append({"boxes": torch.tensor([[x, y, x + 24.0, y + 24.0]]), "labels": torch.tensor([1 + i % 3]),
                        "attributes": attributes})
    return images, targets


@pytest.mark.parametrize(("box_head_convs", "box_head_fc_norm"), [(0, False), (1, False), (1, True)])
def test_forward_backward_and_inference_contract(box_head_convs, box_head_fc_norm):
    model = tiny_detector(box_head_convs=box_head_convs, box_head_fc_norm=box_head_fc_norm).train()
    images, targets = synthetic_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_attributes", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.roi_heads.attr_head.fc.weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}
    assert model.feature_dim == 32 and model.num_classes == 3 and model.num_attributes == 4


def test_boxes_are_decoded_in_float32_under_bf16_autocast():
    model = tiny_detector().eval()
    images, _ = synthetic_batch()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model.detect_resized(images)
        regions = model.extract_regions(images, BoxSelection(num_boxes=5))
    for boxes in (detections[0]["boxes"], regions[0]["boxes"]):
        assert boxes.dtype == torch.float32
        # bf16 would round coordinates in [32, 64) to multiples of 0.25
        assert ((boxes * 4) % 1 != 0).any()


def test_box_head_fc_norm_keeps_every_feature_unit_alive_and_old_keys_loading():
    """BatchNorm sits between the FC layer and its ReLU: in training every unit is centred over the RoIs, so each is
    positive for some of them even when its bias is pushed far negative (the dead ReLUs that lost colour)."""
    plain, normed = tiny_detector(box_head_convs=1), tiny_detector(box_head_convs=1, box_head_fc_norm=True)
    for head in (plain.roi_heads.box_head, normed.roi_heads.box_head):
        head[2].bias.data.fill_(-100.0)  # index 2 is the FC layer after [conv, flatten]
    pooled = torch.randn(64, 16, 7, 7)
    assert (plain.roi_heads.box_head(pooled) == 0).all()
    alive = normed.roi_heads.box_head.train()(pooled).amax(0) > 0
    assert alive.all()
    # the FC and conv weights keep their names, so a run trained without the norm still loads into that layout
    plain_keys = set(plain.roi_heads.box_head.state_dict())
    assert plain_keys < set(normed.roi_heads.box_head.state_dict())


def test_feature_dim_is_backbone_width_by_default():
    model = tiny_detector(representation_size=None, attribute_head=False)
    assert model.feature_dim == model.backbone.width == 192  # test_resnet stage 3 (out_indices end at 3)
    assert model.roi_heads.attr_head is None


def test_attribute_head_learns_class_conditioned_attributes():
    model = tiny_detector().train()
    images, targets = synthetic_batch(num_images=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        losses = model(images, targets)
        first = losses["loss_attributes"].item() if first is None else first
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert losses["loss_attributes"].item() < 0.4 * first  # 0.56 = predicting the base rate (1 of 4)
    model.eval()
    model.backbone.train()  # batch statistics, as in training (running BN stats lag after 25 steps)
    with torch.inference_mode():
        image_list, features = model.backbone_features(images)
        region_feats = model.roi_heads.region_features(features, [t["boxes"] for t in targets], image_list.image_sizes)
        logits = model.roi_heads.attr_head(region_feats, torch.cat([t["labels"] for t in targets]))
    assert logits.argmax(-1).tolist() == [int(t["attributes"][0].argmax()) for t in targets]


def test_select_boxes_threshold_min_max_and_fixed():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float32)
    per_class = boxes[:, None, :].expand(4, 3, 4).clone()  # (N, C+1, 4)
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.7, 0.0, 0.3], [0.95, 0.05, 0.0]])
    chosen, chosen_scores = select_boxes(per_class, scores, (64, 64), BoxSelection(min_boxes=1, max_boxes=10))
    # box 1 is suppressed by box 0 (IoU 0.68 > 0.3); boxes 0 and 2 score >= 0.2
    assert chosen.tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert chosen_scores.tolist() == pytest.approx([0.9, 0.3])
    chosen, _ = select_boxes(per_class, scores, (64, 64), BoxSelection(min_boxes=3, max_boxes=10))
    assert len(chosen) == 3  # min_boxes is met from below-threshold boxes
    chosen, chosen_scores = select_boxes(per_class, scores, (64, 64), BoxSelection(num_boxes=6))
    assert len(chosen) == 6 and chosen[-1].tolist() == [0, 0, 64, 64] and chosen_scores[-1] == 0


def _write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> None:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_flip_mirrors_boxes_and_swaps_left_right_attributes(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    _write_coco(
        tmp_path / "inst.json",
        [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
        [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0,
          "attributes": ["left", "red"]},
         {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 0, 5, 5], "area": 25, "iscrowd": 0,
          "attributes": ["rightmost"]}],
        [{"id": 7, "name": "thing"}],
    )
    instances = read_instances(tmp_path / "inst.json")
    names = instances.attribute_names()
    assert names == ["left", "red", "rightmost"]
    from region_features.coco import flip_permutation

    labels = DetectorLabels([{"id": 7, "name": "thing"}], names, flip_permutation(names))
    dataset = DetectionTrainData(instances, tmp_path, labels)
    plain, flipped = dataset[(0, False)], dataset[(0, True)]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert flipped["boxes"].tolist() == [[28, 3, 38, 8], [15, 0, 20, 5]]
    assert plain["attributes"].tolist() == [[1, 1, 0], [0, 0, 1]]
    # "left" has no "right" twin in this vocabulary, so it stays; "rightmost" has no "leftmost" either
    assert flipped["attributes"].tolist() == [[1, 1, 0], [0, 0, 1]]
    names = ["left", "red", "right"]
    labels = DetectorLabels([{"id": 7, "name": "thing"}], names, flip_permutation(names))
    ann = json.loads((tmp_path / "inst.json").read_text())
    ann["annotations"][1]["attributes"] = ["right"]
    (tmp_path / "inst.json").write_text(json.dumps(ann))
    dataset = DetectionTrainData(read_instances(tmp_path / "inst.json"), tmp_path, labels)
    assert dataset[(0, True)]["attributes"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert dataset[(0, True)]["labels"].tolist() == [1, 1]


@pytest.fixture(scope="module")
def torchvision_reference(tmp_path_factory):
    """A randomly initialised torchvision fasterrcnn_resnet50_fpn (small inputs) and its saved state dict."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=96, max_size=160,
                                        box_score_thresh=0.0).eval()
    path = tmp_path_factory.mktemp("torchvision") / "fasterrcnn.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_torchvision_state_dict_parity(torchvision_reference):
    reference, path = torchvision_reference
    cfg = DetectorConfig(backbone=TORCHVISION_R50_FPN, weights_path=str(path), num_classes=90, min_size=96,
                         max_size=160, box_score_thresh=0.0, anchor_sizes=(32, 64, 128, 256, 512))
    ours = RegionDetector(cfg).eval()
    assert ours.feature_dim == 1024
    images = [torch.rand(3, 80, 120), torch.rand(3, 100, 70)]
    with torch.inference_mode():
        expected, got = reference(images), ours(images)
    for want, have in zip(expected, got):
        assert len(have["boxes"]) == 100
        torch.testing.assert_close(have["boxes"], want["boxes"])
        torch.testing.assert_close(have["scores"], want["scores"])
        assert torch.equal(have["labels"], want["labels"])
    # A different class count keeps the backbone and RPN, with a fresh predictor
    ten = RegionDetector(dataclasses.replace(cfg, num_classes=10, num_attributes=3))
    torch.testing.assert_close(ten.rpn.head.conv[0][0].weight, reference.rpn.head.conv[0][0].weight)
    assert ten.roi_heads.box_predictor.cls_score.out_features == 11


def test_timm_backbone_weights_load_from_a_local_file(tmp_path):
    import timm

    classifier = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "test_resnet.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, path)
    model = tiny_detector(weights_path=str(path), frozen_bn=True)
    torch.testing.assert_close(model.backbone.body.conv1[0].weight, classifier.conv1[0].weight)
    assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"


def test_bad_state_dicts_are_one_line_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    wrong = tmp_path / "wrong.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(3, 3)}, wrong)
    base = {"backbone": TORCHVISION_R50_FPN, "num_classes": 90, "anchor_sizes": (32, 64, 128, 256, 512)}
    for path, phrase in ((garbage, "not a readable state dict"), (wrong, "has shape"),
                         (tmp_path / "missing.pth", "no such file")):
        with pytest.raises(UserError) as caught:
            RegionDetector(DetectorConfig(**base, weights_path=str(path)))
        message = str(caught.value)
        assert str(path) in message and phrase in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def trained_run(world, tmp_path_factory):
    """A two-step run on the world, then resumed to four steps."""
    root = tmp_path_factory.mktemp("detector")
    config = root / "tiny.yaml"
    train_cfg = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "save_every": 2, "log_every": 1}
    config.write_text(yaml.safe_dump({"detector": TINY, "train": train_cfg}))
    run = root / "run"
    args = ["train", "--instances", str(world.instances("train")), "--images", str(world.images_dir("train")),
            "--out", str(run), "--config", str(config)]
    assert vl_regions(args) == 0
    first = latest_files(run)
    assert vl_regions([*args, "--val-instances", str(world.instances("val")), "--val-images",
                       str(world.images_dir("val")), "--set", "train.steps=4"]) == 0
    return {"run": run, "config": config, "args": args, "first": first}


def latest_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_train_writes_checkpoints_and_resumes_exactly(trained_run, world, tmp_path):
    run = trained_run["run"]
    assert "step-2" in trained_run["first"]
    assert latest_files(run) == ["step-2", "step-4"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_attributes"} <= set(rows[0])
    assert [row["step"] for row in rows if "mAP" in row] == [4]  # evaluated at the end of the resumed run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["detector"]["num_classes"] == 7 and saved["detector"]["num_attributes"] == 10
    labels = json.loads((run / "labels.json").read_text())
    assert [c["name"] for c in labels["categories"]][:2] == ["circle", "square"] and "red" in labels["attributes"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"mAP", "mAP@0.5", "attr_accuracy", "attr_chance"} <= set(metrics) and metrics["step"] == 4
    # four uninterrupted steps give the same weights as two steps plus a resumed two
    straight = tmp_path / "straight"
    assert vl_regions([*trained_run["args"][:-4], "--out", str(straight), "--config", str(trained_run["config"]),
                       "--set", "train.steps=4"]) == 0
    from safetensors.torch import load_file

    resumed, fresh = load_file(run / "model.safetensors"), load_file(straight / "model.safetensors")
    for name, tensor in fresh.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_train_refuses_a_different_architecture_in_the_same_run(trained_run, capsys):
    code = vl_regions([*trained_run["args"], "--set", "detector.fpn_channels=8"])
    assert code == 2 and "different detector config" in capsys.readouterr().err


def test_detect_writes_coco_results(trained_run, world, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "dets.json"
    assert vl_regions(["detect", "--detector", str(trained_run["run"]), "--images", str(world.images_dir("val")),
                       "--out", str(out), "--workers", "0"]) == 0
    results = json.loads(out.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    gt = COCO(str(world.instances("val")))
    detections = gt.loadRes(str(out))  # ids by the trailing-number rule match the annotations
    assert set(detections.getImgIds()) <= set(gt.getImgIds())


def test_evaluate_prints_map_and_attribute_accuracy(trained_run, world, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert vl_regions(["evaluate", "--detector", str(trained_run["run"]), "--instances", str(world.instances("val")),
                       "--images", str(world.images_dir("val")), "--out", str(out), "--workers", "0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert {"mAP", "mAP@0.5", "attr_accuracy", "attr_top1", "attr_chance"} <= set(printed)
    assert 0.0 <= printed["attr_accuracy"] <= 1.0 and printed["images"] == 16
    code = vl_regions(["evaluate", "--detector", str(trained_run["run"]), "--instances", str(world.instances("val")),
                       "--images", str(tmp_path / "nowhere")])
    assert code == 2 and "--images" in capsys.readouterr().err


def _extract(run: Path, out: Path, *extra: str) -> FeatureStore:
    assert vl_regions(["extract", "--detector", str(run), "--out", str(out), "--workers", "0", *extra]) == 0
    return FeatureStore(out)


def test_extract_store_shapes_dtypes_and_meta(trained_run, world, tmp_path):
    store = _extract(trained_run["run"], tmp_path / "store", "--images", str(world.images_dir("val")),
                     "--min-boxes", "3", "--max-boxes", "6", "--batch-size", "5")
    ids = sorted(image.image_id for image in read_instances(world.instances("val")).images)
    assert sorted(store.ids()) == ids
    record = store[ids[0]]
    k = len(record["boxes"])
    assert 3 <= k <= 6
    assert record["features"].shape == (k, 32) and record["features"].dtype == np.float16
    assert record["boxes"].dtype == np.float32 and record["object_probs"].shape == (k, 7)
    assert record["object_probs"].dtype == np.float16 and record["object_ids"].dtype == np.int64
    np.testing.assert_allclose(record["object_probs"].astype(np.float32).sum(-1), 1.0, atol=1e-2)
    assert record["attr_ids"].max() < 10 and record["attr_conf"].dtype == np.float32
    assert record["attr_probs"].shape == (k, 10) and record["attr_probs"].dtype == np.float16  # every attribute
    assert (record["boxes"][:, 2] <= record["image_w"]).all() and (record["boxes"][:, 3] <= record["image_h"]).all()
    assert store.meta["class_names"][0] == "circle" and len(store.meta["attribute_names"]) == 10


def test_extract_resumes_and_is_deterministic(trained_run, world, tmp_path):
    images = sorted(Path(world.images_dir("val")).iterdir())
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in images[:7]:
        os.symlink(path, subset / path.name)
    run = trained_run["run"]
    flags = ("--num-boxes", "4", "--batch-size", "4", "--precision", "fp32")
    partial = _extract(run, tmp_path / "resumed", "--images", str(subset), *flags)
    assert len(partial) == 7
    resumed = _extract(run, tmp_path / "resumed", "--images", str(world.images_dir("val")), *flags)
    fresh = _extract(run, tmp_path / "fresh", "--images", str(world.images_dir("val")), *flags)
    again = _extract(run, tmp_path / "again", "--images", str(world.images_dir("val")), *flags)
    assert sorted(resumed.ids()) == sorted(fresh.ids()) and len(fresh) == len(images)
    for image_id in fresh.ids():
        a, b, c = resumed[image_id], fresh[image_id], again[image_id]
        for key in ("boxes", "features", "object_ids", "attr_ids"):
            np.testing.assert_array_equal(b[key], c[key])  # deterministic
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
        np.testing.assert_allclose(a["features"].astype(np.float32), b["features"].astype(np.float32), atol=1e-2)


def test_extract_given_boxes_are_kept_exactly(trained_run, world, tmp_path):
    store = _extract(trained_run["run"], tmp_path / "given", "--images", str(world.images_dir("val")),
                     "--given-boxes", str(world.instances("val")))
    instances = read_instances(world.instances("val"))
    for image in instances.images:
        record = store[image.image_id]
        expected = np.array([box.bbox for box in image.boxes], dtype=np.float32)
        np.testing.assert_array_equal(record["boxes"], expected)
        assert record["features"].shape == (len(image.boxes), 32)


def test_extract_from_shards_with_workers(trained_run, world, tmp_path):
    """Shards decoded by 2 worker processes give every image, with the features of the same images read from a
    folder in the main process."""
    assert vl_regions(["extract", "--detector", str(trained_run["run"]), "--out", str(tmp_path / "shards"),
                       "--shards", world.shard_pattern("val"), "--workers", "2", "--num-boxes", "2"]) == 0
    store = FeatureStore(tmp_path / "shards")
    assert sorted(store.ids()) == sorted(image.image_id for image in read_instances(world.instances("val")).images)
    in_process = _extract(trained_run["run"], tmp_path / "w0", "--images", str(world.images_dir("val")),
                          "--num-boxes", "2")
    for some_id in store.ids():
        np.testing.assert_array_equal(in_process[some_id]["features"], store[some_id]["features"])


def test_shard_keys_in_subfolders_give_the_ids_pretraining_reads(trained_run, world, tmp_path):
    """Without a JSON image_id a sample's id is its webdataset key, subfolders included, in vl-regions extract
    --shards (here with worker processes) as in vl pretrain's reader: every caption finds its features."""
    import io
    import tarfile

    from vl.data.shards import FaultCounter, read_shard_records

    shard = tmp_path / "nested-000000.tar"
    sources = sorted(Path(world.images_dir("val")).iterdir())[:3]
    with tarfile.open(shard, "w") as tar:
        for index, source in enumerate(sources):
            for name, data in ((f"part{index % 2}/sample{index}.jpg", source.read_bytes()),
                               (f"part{index % 2}/sample{index}.txt", b"a red circle")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    store = _extract(trained_run["run"], tmp_path / "nested", "--shards", str(shard), "--num-boxes", "2",
                     "--workers", "2")
    captions = list(read_shard_records(str(shard), "txt", FaultCounter(10, "test")))
    assert len(captions) == 3 and all(record.image_id in store for record in captions)
    assert sorted(store.ids()) == sorted(["part0/sample0", "part1/sample1", "part0/sample2"])


def test_extract_survives_bad_images(trained_run, world, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    source = sorted(Path(world.images_dir("val")).iterdir())[0]
    (images / source.name).write_bytes(source.read_bytes())
    (images / "broken_7.jpg").write_bytes(source.read_bytes()[:200])
    (images / "garbage_8.png").write_bytes(b"not an image at all")
    Image.new("L", (1, 1), 128).save(images / "tiny_9.png")
    store = _extract(trained_run["run"], tmp_path / "store", "--images", str(images), "--min-boxes", "10")
    err = capsys.readouterr().err
    assert "garbage_8.png" in err and "broken_7.jpg" in err
    assert 9 in store and len(store[9]["boxes"]) >= 10  # a 1x1 image still yields min_boxes boxes
    assert 8 not in store and len(store) >= 2


def test_load_detector_from_torchvision_config(torchvision_reference, tmp_path):
    _, path = torchvision_reference
    config = tmp_path / "tv.yaml"
    config.write_text(yaml.safe_dump({"detector": {"backbone": TORCHVISION_R50_FPN, "weights_path": str(path),
                                                   "num_classes": 90, "anchor_sizes": [32, 64, 128, 256, 512]}}))
    model, labels = load_detector(config)
    assert labels.categories[0] == {"id": 1, "name": "person"} and model.feature_dim == 1024
    with pytest.raises(UserError, match="no config.yaml"):
        load_detector(tmp_path)


def test_extract_refuses_annotations_with_shards(tmp_path, capsys):
    """--annotations maps file names to ids; with --shards it would be silently ignored, so it is refused."""
    code = vl_regions(["extract", "--detector", str(tmp_path / "detector"), "--shards", str(tmp_path / "shards"),
                       "--annotations", str(tmp_path / "instances.json"), "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and "drop --annotations" in err and err.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_folded_norms_and_parallel_pooling_describe_the_same_regions():
    from region_features.fold import fold_batch_norms

    model = tiny_detector().eval()
    generator = torch.Generator().manual_seed(1)
    for norm in (m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.weight.data.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
    images, _ = synthetic_batch(3)
    selection = BoxSelection(num_boxes=5)
    with torch.inference_mode():
        expected = model.extract_regions(images, selection)  # one thread: the stock pooling path
    folded = copy.deepcopy(model).fold_batch_norms()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules())
    assert fold_batch_norms(copy.deepcopy(folded.backbone)) == 0  # nothing left to fold
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # RoIAlign per image on two threads
    try:
        with torch.inference_mode():
            actual = folded.extract_regions(images, selection)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the workers pool under the caller's autocast
                under_bf16 = folded.extract_regions(images, selection)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.isfinite(region["region_feats"]).all() for region in under_bf16)
    for want, got in zip(expected, actual):
        assert torch.allclose(want["boxes"], got["boxes"], atol=1e-3)
        assert torch.allclose(want["region_feats"], got["region_feats"], atol=1e-4, rtol=1e-3)
        assert torch.equal(want["object_ids"], got["object_ids"])


def test_a_fold_that_changes_the_output_is_not_kept():
    from region_features.fold import fold_backbone

    class NormAfterActivation(torch.nn.Module):  # registered conv then norm, but the norm runs after the ReLU
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return {"0": self.norm(torch.relu(self.conv(x)))}

    module = NormAfterActivation().eval()
    module.norm.running_mean.fill_(0.5)
    module.norm.bias.data.fill_(-1.0)
    kept, folded = fold_backbone(module)
    assert kept is module and folded == 0 and isinstance(module.norm, torch.nn.BatchNorm2d)


def test_pooling_each_image_on_its_own_thread_equals_pooling_the_batch():
    """ParallelRoIAlign and the C4 RoI max pool split a batch by image across threads. A smaller image's maps are
    padded to the batch's size, so each call must infer the maps' scales from the whole batch's image sizes (given
    the small image's alone, MultiScaleRoIAlign inferred scales twice too large and kept them for every batch)."""
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    from region_features.c4 import RoIMaxPool
    from region_features.detector_heads import ParallelRoIAlign

    generator = torch.Generator().manual_seed(0)
    maps = OrderedDict([("0", torch.rand(2, 4, 32, 40, generator=generator)),
                        ("1", torch.rand(2, 4, 16, 20, generator=generator))])
    shapes = [(80, 100), (128, 160)]  # the first image is padded to the second's size
    boxes = [torch.tensor([[4.0, 6.0, 60.0, 50.0]]), torch.tensor([[8.0, 8.0, 90.0, 70.0], [0.0, 0.0, 30.0, 20.0]])]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            aligned = ParallelRoIAlign(["0", "1"], 7, 2)(maps, boxes, shapes)
            pooled = RoIMaxPool("1", 7)(maps, boxes, shapes)
        torch.set_num_threads(1)
        with torch.inference_mode():
            torch.testing.assert_close(aligned, MultiScaleRoIAlign(["0", "1"], 7, 2)(maps, boxes, shapes))
            torch.testing.assert_close(pooled, RoIMaxPool("1", 7)(maps, boxes, shapes))
    finally:
        torch.set_num_threads(threads)
