"""The standard-format readers: what they return, the one-line errors naming file and field, and image ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from region_features.ids import image_id_from_filename
from vl.data.formats import (
    check_questions_match,
    group_by,
    image_ids_for_dir,
    read_coco_captions,
    read_coco_instances,
    read_karpathy,
    read_vqa_annotations,
    read_vqa_questions,
    read_vqa_results,
)
from vl.errors import UserError


def write(tmp_path: Path, name: str, obj) -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def instances(**changes):
    data = {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 64, "height": 48, "license": 1}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 3, "bbox": [1, 2, 10, 20.5], "area": 150.0,
                         "iscrowd": 0, "attributes": ["red", "small"], "segmentation": []}],
        "categories": [{"id": 3, "name": "star", "supercategory": "shape"}, {"id": 1, "name": "circle"}],
    }
    data.update(changes)
    return data


def expect_error(reader, path: Path, *fragments: str) -> None:
    with pytest.raises(UserError) as info:
        reader(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_coco_instances_read(tmp_path):
    coco = read_coco_instances(write(tmp_path, "i.json", instances()))
    assert coco.categories == {1: "circle", 3: "star"}
    (image,) = coco.images
    assert (image.id, image.file_name, image.width, image.height) == (42, "COCO_val2014_000000000042.jpg", 64, 48)
    (box,) = coco.annotations_by_image()[42]
    assert box.bbox == (1.0, 2.0, 10.0, 20.5) and box.attributes == ("red", "small") and box.category_id == 3
    assert coco.attribute_names() == ["red", "small"]
    without = instances()
    del without["annotations"][0]["attributes"], without["annotations"][0]["area"]
    box = read_coco_instances(write(tmp_path, "j.json", without)).annotations[0]
    assert box.attributes == () and box.area == 205.0


@pytest.mark.parametrize(("changes", "fragments"), [
    ({"annotations": [{"id": 1, "image_id": 42, "category_id": 3, "bbox": [1, 2, 3]}]}, ["annotations[0].bbox"]),
    ({"annotations": [{"id": 1, "image_id": 42, "category_id": 3, "bbox": [1, 2, 0, 3]}]}, ["non-positive"]),
    ({"annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 3, 4]}]}, ["image_id 7"]),
    ({"annotations": [{"id": 1, "image_id": 42, "category_id": 9, "bbox": [1, 2, 3, 4]}]}, ["category_id 9"]),
    ({"annotations": [{"id": 1, "image_id": 42, "category_id": 3, "bbox": [1, 2, 3, 4], "attributes": "red"}]},
     ["annotations[0].attributes"]),
    ({"annotations": [{"id": "1", "image_id": 42, "category_id": 3, "bbox": [1, 2, 3, 4]}]},
     ["annotations[0].id must be an integer"]),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 4}]}, ["images[0].height is missing"]),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}] * 2}, ["images[1].id 1 appears twice"]),
    ({"categories": {"id": 1}}, ["'categories' must be a list"]),
])
def test_coco_instances_errors_name_file_and_field(tmp_path, changes, fragments):
    expect_error(read_coco_instances, write(tmp_path, "bad.json", instances(**changes)), *fragments)


def test_unreadable_files(tmp_path):
    expect_error(read_coco_instances, tmp_path / "missing.json", "not found")
    expect_error(read_coco_instances, write(tmp_path, "broken.json", "{not json"), "not valid JSON")
    expect_error(read_coco_instances, write(tmp_path, "list.json", [1, 2]), "got a list")
    expect_error(read_coco_instances, write(tmp_path, "other.json", {"questions": []}), "'images' is missing")
    expect_error(read_vqa_questions, write(tmp_path, "i.json", instances()), "'questions' is missing")


def test_coco_captions(tmp_path):
    data = {"images": instances()["images"],
            "annotations": [{"id": 5, "image_id": 42, "caption": "A red star."},
                            {"id": 6, "image_id": 42, "caption": "A star."}]}
    captions = read_coco_captions(write(tmp_path, "c.json", data))
    assert captions.by_image() == {42: ["A red star.", "A star."]}
    data["annotations"][1]["caption"] = None
    expect_error(read_coco_captions, write(tmp_path, "bad.json", data), "annotations[1].caption must be a string")


def karpathy():
    return {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 0, "cocoid": 42,
         "split": "test", "sentids": [0], "sentences": [{"raw": "A Red star.", "tokens": ["a", "red", "star"],
                                                         "sentid": 0, "imgid": 0}]},
        {"filename": "1000092795.jpg", "imgid": 1, "split": "restval",
         "sentences": [{"raw": "Two young guys, outside.", "sentid": 1}]},
        {"filename": "x.jpg", "imgid": 2, "split": "train", "sentences": []},
    ], "dataset": "coco"}


def test_karpathy_ids_splits_and_tokens(tmp_path):
    path = write(tmp_path, "k.json", karpathy())
    everything = read_karpathy(path)
    assert [image.image_id for image in everything] == [42, 1, 2]  # cocoid when present, else imgid
    assert everything[0].path == "val2014/COCO_val2014_000000000042.jpg" and everything[1].path == "1000092795.jpg"
    assert everything[1].sentences[0].tokens == ("two", "young", "guys", "outside")
    assert [image.image_id for image in read_karpathy(path, "train")] == [2]
    assert [image.image_id for image in read_karpathy(path, ("train", "restval"))] == [1, 2]
    assert [image.image_id for image in read_karpathy(path, "test")] == [42]
    with pytest.raises(UserError, match="unknown Karpathy split 'dev'"):
        read_karpathy(path, "dev")


def test_karpathy_errors(tmp_path):
    data = karpathy()
    data["images"][1]["split"] = "holdout"
    expect_error(read_karpathy, write(tmp_path, "a.json", data), "images[1].split")
    data = karpathy()
    data["images"][1]["sentences"][0]["sentid"] = 0
    expect_error(read_karpathy, write(tmp_path, "b.json", data), "sentid 0 appears twice")
    data = karpathy()
    del data["images"][2]["imgid"]
    expect_error(read_karpathy, write(tmp_path, "c.json", data), "images[2].imgid is missing")


def vqa_files(tmp_path: Path):
    questions = {"task_type": "Open-Ended", "questions": [
        {"image_id": 42, "question": "What color is the star?", "question_id": 42000},
        {"image_id": 42, "question": "How many stars?", "question_id": 42001}]}
    annotations = {"annotations": [
        {"question_id": 42000, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 42001, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "1", "answers": [{"answer": "1"}] * 10}]}
    return questions, annotations


def test_vqa_questions_and_annotations(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    q_path, a_path = write(tmp_path, "q.json", questions), write(tmp_path, "a.json", annotations)
    read_q, read_a = read_vqa_questions(q_path), read_vqa_annotations(a_path)
    assert [(q.question_id, q.image_id, q.question) for q in read_q] == [
        (42000, 42, "What color is the star?"), (42001, 42, "How many stars?")]
    assert read_a[0].answer_strings == ("red",) * 10 and read_a[0].question_type == "what color is the"
    assert [a.answer_id for a in read_a[1].answers] == list(range(1, 11))  # defaults
    assert read_a[1].answers[0].answer_confidence == "yes"
    assert group_by(read_q, "image_id") == {42: read_q}
    check_questions_match(read_q, read_a, q_path, a_path)
    with pytest.raises(UserError, match="no annotation for question_id 42001"):
        check_questions_match(read_q, read_a[:1], q_path, a_path)


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda a: a["annotations"][0].update(answers=[]), "annotations[0].answers is empty"),
    (lambda a: a["annotations"][0]["answers"][3].update(answer=3), "annotations[0].answers[3].answer must be"),
    (lambda a: a["annotations"][1].pop("answer_type"), "annotations[1].answer_type is missing"),
    (lambda a: a["annotations"][1].update(question_id=42000), "question_id 42000 appears twice"),
])
def test_vqa_annotation_errors(tmp_path, edit, fragment):
    _, annotations = vqa_files(tmp_path)
    edit(annotations)
    expect_error(read_vqa_annotations, write(tmp_path, "a.json", annotations), fragment)


def test_vqa_question_and_result_errors(tmp_path):
    questions, _ = vqa_files(tmp_path)
    questions["questions"][1]["question_id"] = "42001"
    expect_error(read_vqa_questions, write(tmp_path, "q.json", questions), "questions[1].question_id")
    results = write(tmp_path, "r.json", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}])
    assert read_vqa_results(results) == {1: "yes", 2: "2"}
    expect_error(read_vqa_results, write(tmp_path, "r2.json", {"1": "yes"}), "JSON list")
    expect_error(read_vqa_results, write(tmp_path, "r3.json", [{"question_id": 1, "answer": "a"}] * 2),
                 "answered twice")


@pytest.mark.parametrize(("name", "image_id"), [
    ("COCO_val2014_000000000042.jpg", 42),
    ("COCO_train2014_000000581929.png", 581929),
    ("img_7.webp", 7),
    ("00012.jpeg", 12),
    ("1000092795.jpg", 1000092795),
    ("cat.jpg", "cat"),
    ("a1b.png", "a1b"),
    ("photos/dog_03.jpg", 3),
])
def test_image_id_from_filename(name, image_id):
    assert image_id_from_filename(name) == image_id
    assert image_id_from_filename(Path(name)) == image_id


def test_image_ids_for_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("COCO_val2014_000000000005.jpg", "cat.png", "dog_9.JPG"):
        (images / name).write_bytes(b"")
    (images / "notes.txt").write_text("not an image")
    assert image_ids_for_dir(images) == {images / "COCO_val2014_000000000005.jpg": 5, images / "cat.png": "cat",
                                         images / "dog_9.JPG": 9}
    annotations = write(tmp_path, "a.json", {"images": [{"id": 77, "file_name": "cat.png", "width": 1,
                                                         "height": 1}]})
    assert image_ids_for_dir(images, annotations=annotations)[images / "cat.png"] == 77
    (images / "other_5.png").write_bytes(b"")
    with pytest.raises(UserError, match="COCO_val2014_000000000005.jpg and other_5.png both have image id 5"):
        image_ids_for_dir(images)
    with pytest.raises(UserError, match="not found"):
        image_ids_for_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        image_ids_for_dir(tmp_path / "empty")
