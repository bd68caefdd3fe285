"""The generated world: every file reads with our readers (and pycocotools for COCO), and its invariants hold."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vl.cli import build_parser, run
from vl.cli import world as world_cli
from region_features.ids import image_id_from_filename
from vl.data.formats import (
    check_questions_match,
    image_ids_for_dir,
    read_coco_captions,
    read_coco_instances,
    read_karpathy,
    read_vqa_annotations,
    read_vqa_questions,
)
from vl.world.dataset import (
    COLORS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    WorldConfig,
    generate_world,
    load_scenes,
    load_world,
    render_clean,
)
from vl.errors import UserError

PLURALS = {("crosses" if shape == "cross" else shape + "s"): shape for shape in SHAPES}
SHAPE_WORDS = {shape: shape for shape in SHAPES} | PLURALS
GENERIC_WORDS = {"object", "objects", "shape", "shapes"}


def scenes_by_id(world) -> dict[int, Scene]:
    return {scene.image_id: scene for split in SPLITS for scene in load_scenes(world.scenes(split))}


# ----------------------------------------------------------------------------------------------------------------
# Files and readers


def test_manifest_lists_every_file_and_the_counts(world):
    manifest = json.loads(world.manifest.read_text())
    assert load_world(world.root) == world
    on_disk = sorted(p.relative_to(world.root).as_posix() for p in world.root.rglob("*")
                     if p.is_file() and p.name != "world.json")
    assert manifest["files"] == on_disk
    assert not [name for name in on_disk if name.endswith(".tmp") or "/." in name]  # no temporary leftovers
    assert manifest["vocab"] == {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES)}
    assert len(SHAPES) >= 6 and len(COLORS) >= 8
    for split in SPLITS:
        assert manifest["splits"][split]["images"] == manifest["config"][split]
        assert len(list(world.images_dir(split).glob("*.jpg"))) == manifest["config"][split]


def test_every_file_reads_with_our_readers(world):
    manifest = json.loads(world.manifest.read_text())
    karpathy = read_karpathy(world.karpathy)
    assert len(karpathy) == sum(manifest["config"][split] for split in SPLITS)
    for split in SPLITS:
        count = manifest["config"][split]
        instances = read_coco_instances(world.instances(split))
        captions = read_coco_captions(world.captions(split))
        questions = read_vqa_questions(world.vqa_questions(split))
        annotations = read_vqa_annotations(world.vqa_annotations(split))
        scenes = load_scenes(world.scenes(split))
        assert len(instances.images) == len(captions.images) == len(scenes) == count
        assert list(instances.categories.values()) == list(SHAPES)
        assert len(instances.annotations) == sum(len(scene.objects) for scene in scenes)
        assert all(len(caps) == 5 and len(set(caps)) == 5 for caps in captions.by_image().values())
        assert len(questions) == len(annotations) == manifest["splits"][split]["questions"]
        assert len(questions) >= 5 * count  # 6 per image asked; a scene may rarely support fewer
        check_questions_match(questions, annotations, world.vqa_questions(split), world.vqa_annotations(split))
        assert len(read_karpathy(world.karpathy, split)) == count


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_coco_files_load_with_pycocotools_and_score_perfect_boxes_perfectly(world):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(world.instances("val")))
        captions = COCO(str(world.captions("val")))
        assert sorted(cat["name"] for cat in gt.loadCats(gt.getCatIds())) == sorted(SHAPES)
        assert len(gt.getImgIds()) == len(captions.getImgIds()) == 16
        assert len(captions.getAnnIds()) == 5 * 16
        image_id = gt.getImgIds()[0]
        assert gt.loadImgs(image_id)[0]["file_name"] == f"COCO_val2014_{image_id:012d}.jpg"
        detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                      for a in gt.loadAnns(gt.getAnnIds())]
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP@[.5:.95] of the ground truth itself
    mask = gt.annToMask(gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))[0])  # the polygon segmentation rasterises
    assert mask.sum() > 0


def test_boxes_lie_inside_images_and_agree_with_the_scenes(world):
    scenes = scenes_by_id(world)
    for split in SPLITS:
        instances = read_coco_instances(world.instances(split))
        images = instances.image_by_id()
        for image_id, boxes in instances.annotations_by_image().items():
            image = images[image_id]
            scene = scenes[image_id]
            assert 2 <= len(boxes) <= 6
            assert [(instances.categories[b.category_id], *b.attributes) for b in boxes] == [
                (obj.shape, obj.color, obj.size) for obj in scene.objects]
            for box, obj in zip(boxes, scene.objects):
                x, y, w, h = box.bbox
                assert x >= 0 and y >= 0 and x + w <= image.width and y + h <= image.height
                assert box.bbox == obj.bbox and box.iscrowd == 0
                assert 0.3 * w * h < box.area <= w * h


def test_boxes_are_tight_around_the_drawn_pixels(world):
    for scene in load_scenes(world.scenes("train"))[:12]:
        for obj in scene.objects:
            alone = Scene(scene.image_id, scene.split, scene.file_name, scene.width, scene.height, (obj,))
            drawn = np.asarray(render_clean(alone)).max(axis=2) > 0
            rows, cols = np.nonzero(drawn)
            x0, y0 = cols.min(), rows.min()
            assert obj.bbox == (x0, y0, cols.max() + 1 - x0, rows.max() + 1 - y0)


def test_objects_in_the_jpegs_have_their_colours_and_sizes(world):
    """The written image (texture, noise, JPEG) still shows each object's colour at its centre, and large objects
    are clearly bigger than small ones."""
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    names = list(COLORS)
    checked = 0
    for scene in load_scenes(world.scenes("train")):
        pixels = np.asarray(Image.open(world.image_path("train", scene.image_id)).convert("RGB"), dtype=np.float64)
        assert pixels.shape == (scene.height, scene.width, 3)
        for obj in scene.objects:
            if obj.shape in ("star", "cross", "triangle") or obj.size == "small":
                continue  # thin or tiny shapes: their centre pixels mix with the edges after JPEG
            cx, cy = int(obj.center[0]), int(obj.center[1])
            patch = np.median(pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3), axis=0)
            assert names[int(np.argmin(((palette - patch) ** 2).sum(axis=1)))] == obj.color
            checked += 1
    assert checked >= 20
    all_objects = [obj for scene in scenes_by_id(world).values() for obj in scene.objects]
    largest_small = max(obj.radius for obj in all_objects if obj.size == "small")
    smallest_large = min(obj.radius for obj in all_objects if obj.size == "large")
    assert smallest_large > 1.3 * largest_small


def test_splits_are_disjoint_and_the_karpathy_split_follows_them(world):
    ids = {split: {image.id for image in read_coco_instances(world.instances(split)).images} for split in SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    question_ids = [q.question_id for split in SPLITS for q in read_vqa_questions(world.vqa_questions(split))]
    assert len(question_ids) == len(set(question_ids))
    sentids = set()
    for split in SPLITS:
        captions = read_coco_captions(world.captions(split)).by_image()
        karpathy = read_karpathy(world.karpathy, split)
        assert {image.image_id for image in karpathy} == ids[split]
        for image in karpathy:
            assert image.path == f"{split}2014/{image.filename}"
            assert image_id_from_filename(image.filename) == image.image_id
            assert [s.raw for s in image.sentences] == captions[image.image_id]
            assert all(s.tokens == tuple(re.findall(r"[a-z0-9]+", s.raw.lower())) for s in image.sentences)
            sentids.update(s.sentid for s in image.sentences)
        assert image_ids_for_dir(world.images_dir(split)) == {
            world.image_path(split, image_id): image_id for image_id in ids[split]}
        with_annotations = image_ids_for_dir(world.images_dir(split), annotations=world.instances(split))
        assert set(with_annotations.values()) == ids[split]
    assert len(sentids) == 5 * sum(len(v) for v in ids.values())


def test_captions_only_mention_what_is_in_the_scene(world):
    scenes = scenes_by_id(world)
    for split in SPLITS:
        for image_id, captions in read_coco_captions(world.captions(split)).by_image().items():
            scene = scenes[image_id]
            shapes = {obj.shape for obj in scene.objects}
            colors = {obj.color for obj in scene.objects}
            for caption in captions:
                words = re.findall(r"[a-z]+", caption.lower())
                assert {SHAPE_WORDS[w] for w in words if w in SHAPE_WORDS} <= shapes, caption
                assert {w for w in words if w in COLORS} <= colors, caption
            mentioned = {SHAPE_WORDS[w] for c in captions for w in re.findall(r"[a-z]+", c.lower())
                         if w in SHAPE_WORDS}
            assert mentioned == shapes  # together the captions name every shape present


# ----------------------------------------------------------------------------------------------------------------
# VQA


def _parse_reference(text: str) -> dict[str, str]:
    """``large red circle`` -> {"size": "large", "color": "red", "shape": "circle"}; generic nouns name nothing."""
    attrs = {}
    for word in text.split():
        if word in SIZES:
            attrs["size"] = word
        elif word in COLORS:
            attrs["color"] = word
        elif word in SHAPE_WORDS:
            attrs["shape"] = SHAPE_WORDS[word]
        else:
            assert word in GENERIC_WORDS, f"unexpected word {word!r} in {text!r}"
    return attrs


def _select(scene: Scene, attrs: dict[str, str]):
    return [obj for obj in scene.objects if all(getattr(obj, k) == v for k, v in attrs.items())]


def _the_one(scene: Scene, text: str):
    found = _select(scene, _parse_reference(text))
    assert len(found) == 1, f"{text!r} must name exactly one object, names {len(found)}"
    return found[0]


def _holds(a, b, relation: str, side: int) -> bool:
    """Whether ``relation`` holds between centres, asserting the question is not a borderline case."""
    axis = 0 if relation in ("left", "right") else 1
    delta = a.center[axis] - b.center[axis]
    assert abs(delta) > 0.05 * side, "spatial questions are asked only about clearly separated objects"
    return delta < 0 if relation in ("left", "above") else delta > 0


def expected_answer(question: str, scene: Scene) -> str:
    """Recompute a question's answer from the scene graph, independently of the generator."""
    side = scene.width
    patterns = [
        (r"What color is the (.+)\?", lambda m: _the_one(scene, m[1]).color),
        (r"What is the color of the (.+)\?", lambda m: _the_one(scene, m[1]).color),
        (r"What shape is the (.+)\?", lambda m: _the_one(scene, m[1]).shape),
        (r"What size is the (.+)\?", lambda m: _the_one(scene, m[1]).size),
        (r"How many (.+) (?:are there|are in the image|can you see)\?",
         lambda m: str(len(_select(scene, _parse_reference(m[1]))))),
        (r"Is there an? (.+)\?", lambda m: "yes" if _select(scene, _parse_reference(m[1])) else "no"),
        (r"Are there any (.+)\?", lambda m: "yes" if _select(scene, _parse_reference(m[1])) else "no"),
        (r"Is the (.+) to the left or to the right of the (.+)\?",
         lambda m: "left" if _holds(_the_one(scene, m[1]), _the_one(scene, m[2]), "left", side) else "right"),
        (r"Is the (.+) above or below the (.+)\?",
         lambda m: "above" if _holds(_the_one(scene, m[1]), _the_one(scene, m[2]), "above", side) else "below"),
        (r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?",
         lambda m: "yes" if _holds(_the_one(scene, m[1]), _the_one(scene, m[3]),
                                   {"to the left of": "left", "to the right of": "right"}.get(m[2], m[2]),
                                   side) else "no"),
        (r"Is the (.+) (large|small)\?", lambda m: "yes" if _the_one(scene, m[1]).size == m[2] else "no"),
    ]
    for pattern, answer in patterns:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(match)
    raise AssertionError(f"unrecognised question {question!r}")


def test_answers_agree_with_the_scenes_and_questions_are_unambiguous(world):
    scenes = scenes_by_id(world)
    families = Counter()
    for split in SPLITS:
        questions = {q.question_id: q for q in read_vqa_questions(world.vqa_questions(split))}
        for ann in read_vqa_annotations(world.vqa_annotations(split)):
            question = questions[ann.question_id]
            assert expected_answer(question.question, scenes[question.image_id]) == ann.multiple_choice_answer, (
                question.question)
            families[ann.question_type] += 1
    # colour, shape, size, counting, existence and spatial questions are all there
    for question_type in ("what color is the", "what shape is the", "what size is the", "how many", "is there a",
                          "is the"):
        assert families[question_type] > 0, question_type


def test_annotations_have_ten_answers_with_a_little_disagreement(world):
    noisy = Counter()
    for split in SPLITS:
        questions = {q.question_id: q for q in read_vqa_questions(world.vqa_questions(split))}
        for ann in read_vqa_annotations(world.vqa_annotations(split)):
            assert [a.answer_id for a in ann.answers] == list(range(1, 11))
            assert {a.answer_confidence for a in ann.answers} <= {"yes", "maybe", "no"}
            wrong = sum(a.answer != ann.multiple_choice_answer for a in ann.answers)
            assert wrong <= 2
            noisy[wrong] += 1
            assert ann.answer_type in ("yes/no", "number", "other")
            assert questions[ann.question_id].question.lower().startswith(ann.question_type)
            if ann.answer_type == "number":
                assert ann.multiple_choice_answer.isdigit()
            if ann.answer_type == "yes/no":
                assert ann.multiple_choice_answer in ("yes", "no")
    assert noisy[0] > noisy[1] > noisy[2] > 0


def test_yes_no_answers_are_balanced(world):
    for split in SPLITS:
        questions = {q.question_id: q.question for q in read_vqa_questions(world.vqa_questions(split))}
        answers = [ann for ann in read_vqa_annotations(world.vqa_annotations(split)) if ann.answer_type == "yes/no"]
        yes = sum(ann.multiple_choice_answer == "yes" for ann in answers)
        assert 0.45 <= yes / len(answers) <= 0.55, (split, yes, len(answers))
        existence = [ann.multiple_choice_answer for ann in answers
                     if questions[ann.question_id].startswith(("Is there", "Are there any"))]
        assert len(existence) >= 6
        assert abs(existence.count("yes") - existence.count("no")) <= 1


def test_every_question_names_an_existing_image(world):
    for split in SPLITS:
        images = read_coco_instances(world.instances(split)).image_by_id()
        for question in read_vqa_questions(world.vqa_questions(split)):
            assert question.image_id in images
            assert world.image_path(split, question.image_id).is_file()
            assert world.images_dir(split) / images[question.image_id].file_name == world.image_path(
                split, question.image_id)


# ----------------------------------------------------------------------------------------------------------------
# Shards and text


def test_shards_read_with_webdataset(world):
    import webdataset as wds

    for split in ("train", "test"):
        captions = read_coco_captions(world.captions(split)).by_image()
        assert len(world.shards(split)) == -(-len(captions) // 16)
        dataset = wds.WebDataset(world.shard_pattern(split), shardshuffle=False, empty_check=False).decode("pil")
        seen = []
        for sample in dataset:
            meta = sample["json"]
            assert sample["txt"] == meta["caption"] == captions[meta["image_id"]][0]
            assert meta["captions"] == captions[meta["image_id"]]
            assert sample["jpg"].size == (meta["width"], meta["height"]) == (112, 112)
            assert sample["__key__"] == meta["key"]
            seen.append(meta["image_id"])
        assert sorted(seen) == sorted(captions)
    first = world.shards("train")[0]
    assert first.name == "train-000000.tar"
    with (world.images_dir("train") / read_coco_instances(world.instances("train")).images[0].file_name).open(
            "rb") as handle:
        on_disk = handle.read()
    import tarfile

    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        assert tar.extractfile(names[0]).read() == on_disk  # the shard holds the same JPEG bytes


def test_corpus_holds_one_document_per_image(world):
    text = world.corpus.read_text()
    documents = text.strip("\n").split("\n\n")
    assert len(documents) == 80
    for document in documents:
        lines = document.split("\n")
        assert len(lines) >= 8 and all(line.strip() and line[0].isupper() and line[-1] in ".?" for line in lines)
        assert any(line.endswith("?") for line in lines)  # the image's questions
    per_split = [world.corpus_split(split).read_text().strip("\n") for split in SPLITS]
    assert "\n\n".join(per_split) == text.strip("\n")


# ----------------------------------------------------------------------------------------------------------------
# Determinism and the command line


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    cfg = WorldConfig(seed=5, train=4, val=2, test=2, size=64, shard_size=3)
    generate_world(tmp_path / "a", cfg, progress=False)
    generate_world(tmp_path / "b", cfg, progress=False)
    generate_world(tmp_path / "c", WorldConfig(seed=6, train=4, val=2, test=2, size=64, shard_size=3), progress=False)
    first, second, other = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert first == second
    # 8 images, 6 JSON files and a corpus per split, 2 + 1 + 1 shards, Karpathy, refs, corpus, manifest
    assert len(first) == 8 + 3 * 7 + 4 + 4
    assert first["annotations/instances_train2014.json"] != other["annotations/instances_train2014.json"]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = run(build_parser("vl", [world_cli], "test"), argv)
    return code, capsys.readouterr().err.strip()


def test_cli_writes_a_world_and_replaces_it_only_with_force(tmp_path, capsys):
    out = tmp_path / "w"
    args = ["generate-world", "--out", str(out), "--seed", "3", "--train", "3", "--val", "1", "--test", "1",
            "--size", "64", "--quiet"]
    assert _cli(args, capsys)[0] == 0
    assert json.loads((out / "world.json").read_text())["config"]["train"] == 3
    code, err = _cli(args, capsys)
    assert code == 2 and err.count("\n") == 0 and "--force" in err
    assert _cli(args[:-1] + ["--train", "2", "--quiet", "--force"], capsys)[0] == 0
    assert len(list((out / "images" / "train2014").glob("*.jpg"))) == 2  # the old world's files are gone


@pytest.mark.parametrize(("flags", "named"), [
    (["--train", "0"], "--train"),
    (["--val", "-1"], "--val"),
    (["--size", "16"], "--size"),
    (["--seed", "-2"], "--seed"),
    (["--shard-size", "0"], "--shard-size"),
    (["--questions-per-image", "0"], "--questions-per-image"),
])
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys, flags, named):
    args = ["generate-world", "--out", str(tmp_path / "w"), "--train", "2", "--val", "1", "--test", "1", "--quiet"]
    code, err = _cli(args + flags, capsys)
    assert code == 2 and err.count("\n") == 0 and named in err and err.startswith("vl generate-world: error:")
    assert not (tmp_path / "w").exists()


def test_cli_refuses_an_out_that_is_a_file_or_holds_other_things(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    for out in ("file", "busy"):
        code, err = _cli(["generate-world", "--out", str(tmp_path / out), "--train", "1", "--val", "1", "--test", "1",
                          "--force", "--quiet"], capsys)
        assert code == 2 and "--out" in err and err.count("\n") == 0
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_cli_replaces_an_interrupted_world_only_with_force(tmp_path, capsys):
    out = tmp_path / "w"
    (out / "images" / "train2014").mkdir(parents=True)
    (out / "images" / "train2014" / "COCO_train2014_000000000007.jpg").write_bytes(b"partial")
    (out / "shards").mkdir()
    (out / "shards" / ".train-000000.abc123.tmp").write_bytes(b"partial")
    args = ["generate-world", "--out", str(out), "--train", "1", "--val", "1", "--test", "1", "--size", "64",
            "--quiet"]
    code, err = _cli(args, capsys)
    assert code == 2 and "incomplete world" in err and "--force" in err
    assert _cli(args + ["--force"], capsys)[0] == 0
    assert not (out / "images" / "train2014" / "COCO_train2014_000000000007.jpg").exists()
    assert not list(out.rglob("*.tmp"))


def test_world_paths_refuse_unknown_splits(world):
    with pytest.raises(UserError, match="unknown split 'dev'"):
        world.instances("dev")
    with pytest.raises(UserError, match="no generated world"):
        load_world(world.root / "images")


def test_question_families_name_what_each_question_asks(world):
    questions = json.loads(world.vqa_questions("train").read_text())["questions"]
    families = json.loads(world.question_families("train").read_text())["families"]
    assert sorted(families) == sorted(str(q["question_id"]) for q in questions)
    assert set(families.values()) <= {"color", "shape", "size", "size_yes_no", "count", "exist", "spatial_yes_no",
                                      "spatial_choice"}
    by_id = {str(q["question_id"]): q["question"] for q in questions}
    for question_id, family in families.items():
        text = by_id[question_id]
        if family == "count":
            assert text.startswith("How many")
        if family == "spatial_choice":
            assert " or " in text
        if family == "color":
            assert "color" in text


def test_referring_expressions_are_in_the_refcoco_layout_and_each_picks_out_its_object(world):
    """refer/refs.json: one ref per nameable object, RefCOCO's fields, its COCO instance; every expression, read
    back against the scene's ground truth, fits that object and no other in the image."""
    import json
    import re

    refs = json.loads(world.refs.read_text())
    assert refs and {"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids",
                     "sentences"} <= set(refs[0])
    assert [ref["ref_id"] for ref in refs] == list(range(len(refs)))
    sent_ids = [s["sent_id"] for ref in refs for s in ref["sentences"]]
    assert sent_ids == list(range(len(sent_ids)))
    side = json.loads(world.manifest.read_text())["size"]  # the clear-relation margin is a tenth of it
    relations = {"to the left of": lambda a, b: a[0] < b[0] - 0.1 * side, "to the right of":
                 lambda a, b: a[0] > b[0] + 0.1 * side, "above": lambda a, b: a[1] < b[1] - 0.1 * side,
                 "below": lambda a, b: a[1] > b[1] + 0.1 * side}
    pattern = re.compile(r"^the (.+?)(?: (to the left of|to the right of|above|below) the (.+))?$")

    def fits(obj, words):
        *attributes, shape = words.split()
        return shape == obj["shape"] and all(word in (obj["color"], obj["size"]) for word in attributes)

    checked = 0
    for split in ("train", "val"):
        scenes = {scene["image_id"]: scene for scene in json.loads(world.scenes(split).read_text())["scenes"]}
        instances = json.loads(world.instances(split).read_text())
        annotations = {ann["id"]: ann for ann in instances["annotations"]}
        for ref in (ref for ref in refs if ref["split"] == split):
            ann = annotations[ref["ann_id"]]
            assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
            objects = scenes[ref["image_id"]]["objects"]
            target = next(obj for obj in objects if obj["bbox"] == ann["bbox"])
            for sentence in ref["sentences"]:
                assert sentence["tokens"] == sentence["sent"].split()
                phrase, relation, anchor = pattern.match(sentence["raw"]).groups()
                if relation is None:
                    chosen = [obj for obj in objects if fits(obj, phrase)]
                else:
                    anchors = [obj for obj in objects if fits(obj, anchor)]
                    assert len(anchors) == 1, sentence
                    chosen = [obj for obj in objects if obj is not anchors[0] and fits(obj, phrase)
                              and relations[relation](obj["center"], anchors[0]["center"])]
                assert chosen == [target], sentence
                checked += 1
    assert checked > 100
