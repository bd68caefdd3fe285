"""Readers for the standard dataset formats (docs/cli.md) and the image-id rule.

Every reader validates the structure it relies on and raises ``UserError`` with one line that names the file and
the bad field (``data/q.json: questions[3].question_id must be an integer, got '7'``). Keys a format does not
define are ignored, so the real files (COCO 2014, Karpathy's ``dataset_coco.json``, VQA v2) read as they are.

- ``read_coco_instances(path) -> CocoInstances``: images, boxes (``[x, y, w, h]`` pixels), categories, and the
  optional Visual-Genome-style ``attributes`` list per box.
- ``read_coco_captions(path) -> CocoCaptions``.
- ``read_karpathy(path, split=None) -> list[KarpathyImage]``: image id = ``cocoid`` when present, else ``imgid``.
- ``read_vqa_questions(path) -> list[VqaQuestion]``, ``read_vqa_annotations(path) -> list[VqaAnnotation]``,
  ``read_vqa_results(path) -> dict[question_id, answer]``.
- ``image_ids_for_dir(directory, annotations=None)``: every image file's id by the image-id rule
  (``region_features.ids``).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from region_features.ids import image_id_for
from vl.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
VQA_ANSWER_TYPES = ("yes/no", "number", "other")


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers


def _load_json(path: str | os.PathLike, what: str) -> tuple[Path, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} file not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} path is not a file: {path}")
    try:
        with path.open("r", encoding="utf-8") as handle:
            return path, json.load(handle)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file ({what} must be JSON)") from None


class _Fields:
    """Typed access to one JSON object; failures name the file and the field path (``images[3].id``)."""

    def __init__(self, path: Path, obj: Any, where: str) -> None:
        self.path = path
        self.where = where
        if not isinstance(obj, dict):
            self.fail(f"{where} must be an object, got {_show(obj)}")
        self.obj = obj

    def fail(self, message: str) -> NoReturn:
        raise UserError(f"{self.path}: {message}")

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.obj:
            if required:
                self.fail(f"{self.where}.{key} is missing")
            return None
        return self.obj[key]

    def get_int(self, key: str, required: bool = True, default: int | None = None) -> int | None:
        value = self._get(key, required)
        if value is None and not required:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            # JSON writers sometimes store integral ids as floats (42.0); accept those, nothing else.
            if isinstance(value, float) and value.is_integer():
                return int(value)
            self.fail(f"{self.where}.{key} must be an integer, got {_show(value)}")
        return value

    def get_number(self, key: str, required: bool = True, default: float | None = None) -> float | None:
        value = self._get(key, required)
        if value is None and not required:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"{self.where}.{key} must be a number, got {_show(value)}")
        return float(value)

    def get_str(self, key: str, required: bool = True, default: str | None = None) -> str | None:
        value = self._get(key, required)
        if value is None and not required:
            return default
        if not isinstance(value, str):
            self.fail(f"{self.where}.{key} must be a string, got {_show(value)}")
        return value

    def get_list(self, key: str, required: bool = True) -> list[Any]:
        value = self._get(key, required)
        if value is None and not required:
            return []
        if not isinstance(value, list):
            self.fail(f"{self.where}.{key} must be a list, got {_show(value)}")
        return value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _top(path: Path, data: Any, key: str, what: str) -> list[Any]:
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} file holds a JSON object with a '{key}' list, got a {type(data).__name__}")
    if key not in data:
        raise UserError(f"{path}: '{key}' is missing (not a {what} file?)")
    if not isinstance(data[key], list):
        raise UserError(f"{path}: '{key}' must be a list, got {_show(data[key])}")
    return data[key]


# ----------------------------------------------------------------------------------------------------------------
# COCO


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoObject:
    """One box: ``bbox`` is ``(x, y, w, h)`` in pixels from the top-left corner; ``attributes`` are names."""

    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: int
    attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CocoInstances:
    """A COCO instances file: ``categories`` maps category id to name, in id order."""

    path: Path
    images: tuple[CocoImage, ...]
    annotations: tuple[CocoObject, ...]
    categories: dict[int, str] = field(hash=False)

    def image_by_id(self) -> dict[int, CocoImage]:
        return {image.id: image for image in self.images}

    def annotations_by_image(self) -> dict[int, list[CocoObject]]:
        """Every image id (also those without boxes) to its boxes, in file order."""
        by_image: dict[int, list[CocoObject]] = {image.id: [] for image in self.images}
        for ann in self.annotations:
            by_image[ann.image_id].append(ann)
        return by_image

    def attribute_names(self) -> list[str]:
        """Every attribute name used, sorted."""
        return sorted({name for ann in self.annotations for name in ann.attributes})


def _read_images(path: Path, data: Any, what: str) -> tuple[CocoImage, ...]:
    images = []
    seen: set[int] = set()
    for i, item in enumerate(_top(path, data, "images", what)):
        fields = _Fields(path, item, f"images[{i}]")
        image = CocoImage(id=fields.get_int("id"), file_name=fields.get_str("file_name"),
                          width=fields.get_int("width"), height=fields.get_int("height"))
        if image.id in seen:
            fields.fail(f"images[{i}].id {image.id} appears twice")
        if image.width <= 0 or image.height <= 0:
            fields.fail(f"images[{i}] has a non-positive size {image.width}x{image.height}")
        seen.add(image.id)
        images.append(image)
    return tuple(images)


def read_coco_instances(path: str | os.PathLike) -> CocoInstances:
    """Read a COCO instances (detection) file. Boxes must have positive width and height and name a known image
    and category; ``attributes`` (optional) must be a list of strings."""
    path, data = _load_json(path, "COCO instances")
    images = _read_images(path, data, "COCO instances")
    image_ids = {image.id for image in images}
    categories: dict[int, str] = {}
    for i, item in enumerate(_top(path, data, "categories", "COCO instances")):
        fields = _Fields(path, item, f"categories[{i}]")
        category_id = fields.get_int("id")
        if category_id in categories:
            fields.fail(f"categories[{i}].id {category_id} appears twice")
        categories[category_id] = fields.get_str("name")
    categories = dict(sorted(categories.items()))
    annotations = []
    seen: set[int] = set()
    for i, item in enumerate(_top(path, data, "annotations", "COCO instances")):
        where = f"annotations[{i}]"
        fields = _Fields(path, item, where)
        ann_id = fields.get_int("id")
        if ann_id in seen:
            fields.fail(f"{where}.id {ann_id} appears twice")
        seen.add(ann_id)
        image_id = fields.get_int("image_id")
        if image_id not in image_ids:
            fields.fail(f"{where}.image_id {image_id} is not in 'images'")
        category_id = fields.get_int("category_id")
        if category_id not in categories:
            fields.fail(f"{where}.category_id {category_id} is not in 'categories'")
        bbox = fields.get_list("bbox")
        if len(bbox) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox):
            fields.fail(f"{where}.bbox must be 4 numbers [x, y, w, h], got {_show(bbox)}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            fields.fail(f"{where}.bbox has a non-positive width or height: {bbox}")
        attributes = fields.get_list("attributes", required=False)
        if any(not isinstance(name, str) for name in attributes):
            fields.fail(f"{where}.attributes must be a list of strings, got {_show(attributes)}")
        area = fields.get_number("area", required=False, default=float(bbox[2] * bbox[3]))
        annotations.append(CocoObject(id=ann_id, image_id=image_id, category_id=category_id,
                                      bbox=tuple(float(v) for v in bbox), area=area,
                                      iscrowd=fields.get_int("iscrowd", required=False, default=0),
                                      attributes=tuple(attributes)))
    return CocoInstances(path=path, images=images, annotations=tuple(annotations), categories=categories)


@dataclass(frozen=True)
class CocoCaption:
    id: int
    image_id: int
    caption: str


@dataclass(frozen=True)
class CocoCaptions:
    path: Path
    images: tuple[CocoImage, ...]
    captions: tuple[CocoCaption, ...]

    def by_image(self) -> dict[int, list[str]]:
        """Every image id to its captions, in file order."""
        by_image: dict[int, list[str]] = {image.id: [] for image in self.images}
        for caption in self.captions:
            by_image[caption.image_id].append(caption.caption)
        return by_image


def read_coco_captions(path: str | os.PathLike) -> CocoCaptions:
    """Read a COCO captions file; every caption must name a known image."""
    path, data = _load_json(path, "COCO captions")
    images = _read_images(path, data, "COCO captions")
    image_ids = {image.id for image in images}
    captions = []
    for i, item in enumerate(_top(path, data, "annotations", "COCO captions")):
        fields = _Fields(path, item, f"annotations[{i}]")
        caption = CocoCaption(id=fields.get_int("id"), image_id=fields.get_int("image_id"),
                              caption=fields.get_str("caption"))
        if caption.image_id not in image_ids:
            fields.fail(f"annotations[{i}].image_id {caption.image_id} is not in 'images'")
        captions.append(caption)
    return CocoCaptions(path=path, images=images, captions=tuple(captions))


# ----------------------------------------------------------------------------------------------------------------
# Karpathy split


@dataclass(frozen=True)
class KarpathySentence:
    sentid: int
    raw: str
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a Karpathy split file; ``image_id`` is ``cocoid`` when present, else ``imgid``; ``path`` is
    ``filepath/filename`` (just ``filename`` when the file has no ``filepath``, as in Flickr30k's)."""

    image_id: int
    filename: str
    filepath: str
    split: str
    sentences: tuple[KarpathySentence, ...]

    @property
    def path(self) -> str:
        return f"{self.filepath}/{self.filename}" if self.filepath else self.filename


def karpathy_tokens(raw: str) -> list[str]:
    """Tokens the way Karpathy's files hold them: lower-case words and numbers, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", raw.lower())


def read_karpathy(path: str | os.PathLike, split: str | Iterable[str] | None = None) -> list[KarpathyImage]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``...), keeping the images of
    ``split`` (a name or several; None keeps all). ``"train"`` means only ``train``: pass ``("train", "restval")``
    to add the rest of val, as most papers do. Sentences without ``tokens`` get ``karpathy_tokens(raw)``."""
    if split is None:
        wanted = None
    else:
        wanted = {split} if isinstance(split, str) else set(split)
        unknown = sorted(wanted - set(KARPATHY_SPLITS))
        if unknown:
            raise UserError(f"unknown Karpathy split {unknown[0]!r} (expected one of {', '.join(KARPATHY_SPLITS)})")
    path, data = _load_json(path, "Karpathy split")
    images = []
    image_ids: set[int] = set()
    sentids: set[int] = set()
    for i, item in enumerate(_top(path, data, "images", "Karpathy split")):
        where = f"images[{i}]"
        fields = _Fields(path, item, where)
        image_split = fields.get_str("split")
        if image_split not in KARPATHY_SPLITS:
            fields.fail(f"{where}.split must be one of {', '.join(KARPATHY_SPLITS)}, got {_show(image_split)}")
        cocoid = fields.get_int("cocoid", required=False)
        image_id = cocoid if cocoid is not None else fields.get_int("imgid")
        if image_id in image_ids:
            fields.fail(f"{where} image id {image_id} appears twice")
        image_ids.add(image_id)
        sentences = []
        for j, sent in enumerate(fields.get_list("sentences")):
            sent_fields = _Fields(path, sent, f"{where}.sentences[{j}]")
            raw = sent_fields.get_str("raw")
            sentid = sent_fields.get_int("sentid")
            if sentid in sentids:
                sent_fields.fail(f"{where}.sentences[{j}].sentid {sentid} appears twice")
            sentids.add(sentid)
            tokens = sent_fields.get_list("tokens", required=False) if "tokens" in sent else karpathy_tokens(raw)
            if any(not isinstance(token, str) for token in tokens):
                sent_fields.fail(f"{where}.sentences[{j}].tokens must be a list of strings")
            sentences.append(KarpathySentence(sentid=sentid, raw=raw, tokens=tuple(tokens)))
        if wanted is None or image_split in wanted:
            images.append(KarpathyImage(image_id=image_id, filename=fields.get_str("filename"),
                                        filepath=fields.get_str("filepath", required=False, default=""),
                                        split=image_split, sentences=tuple(sentences)))
    return images


# ----------------------------------------------------------------------------------------------------------------
# VQA v2


@dataclass(frozen=True)
class VqaQuestion:
    question_id: int
    image_id: int
    question: str


@dataclass(frozen=True)
class VqaAnswer:
    answer: str
    answer_confidence: str
    answer_id: int


@dataclass(frozen=True)
class VqaAnnotation:
    """A question's ground truth: the (normally 10) annotator answers, the most common one, the answer type
    (``yes/no``, ``number`` or ``other`` in VQA v2) and the question type (its first words, e.g. ``how many``)."""

    question_id: int
    image_id: int
    answers: tuple[VqaAnswer, ...]
    multiple_choice_answer: str
    answer_type: str
    question_type: str

    @property
    def answer_strings(self) -> tuple[str, ...]:
        return tuple(answer.answer for answer in self.answers)


def read_vqa_questions(path: str | os.PathLike) -> list[VqaQuestion]:
    """Read a VQA v2 questions file (``v2_OpenEnded_mscoco_*_questions.json``); question ids must be unique."""
    path, data = _load_json(path, "VQA questions")
    questions = []
    seen: set[int] = set()
    for i, item in enumerate(_top(path, data, "questions", "VQA questions")):
        fields = _Fields(path, item, f"questions[{i}]")
        question = VqaQuestion(question_id=fields.get_int("question_id"), image_id=fields.get_int("image_id"),
                               question=fields.get_str("question"))
        if question.question_id in seen:
            fields.fail(f"questions[{i}].question_id {question.question_id} appears twice")
        seen.add(question.question_id)
        questions.append(question)
    return questions


def read_vqa_annotations(path: str | os.PathLike) -> list[VqaAnnotation]:
    """Read a VQA v2 annotations file (``v2_mscoco_*_annotations.json``). Each annotation needs at least one
    answer; ``answer_confidence`` defaults to ``"yes"`` and ``answer_id`` to the answer's position (from 1)."""
    path, data = _load_json(path, "VQA annotations")
    annotations = []
    seen: set[int] = set()
    for i, item in enumerate(_top(path, data, "annotations", "VQA annotations")):
        where = f"annotations[{i}]"
        fields = _Fields(path, item, where)
        question_id = fields.get_int("question_id")
        if question_id in seen:
            fields.fail(f"{where}.question_id {question_id} appears twice")
        seen.add(question_id)
        raw_answers = fields.get_list("answers")
        if not raw_answers:
            fields.fail(f"{where}.answers is empty")
        answers = []
        for j, raw in enumerate(raw_answers):
            answer_fields = _Fields(path, raw, f"{where}.answers[{j}]")
            answers.append(VqaAnswer(answer=answer_fields.get_str("answer"),
                                     answer_confidence=answer_fields.get_str("answer_confidence", False, "yes"),
                                     answer_id=answer_fields.get_int("answer_id", False, j + 1)))
        annotations.append(VqaAnnotation(question_id=question_id, image_id=fields.get_int("image_id"),
                                         answers=tuple(answers),
                                         multiple_choice_answer=fields.get_str("multiple_choice_answer"),
                                         answer_type=fields.get_str("answer_type"),
                                         question_type=fields.get_str("question_type")))
    return annotations


def read_vqa_results(path: str | os.PathLike) -> dict[int, str]:
    """Read VQA results, ``[{"question_id", "answer"}]`` as the evaluation server takes them, into
    ``{question_id: answer}``; a question answered twice is an error."""
    path, data = _load_json(path, "VQA results")
    if not isinstance(data, list):
        raise UserError(f"{path}: VQA results must be a JSON list of {{question_id, answer}}, got a "
                        f"{type(data).__name__}")
    results: dict[int, str] = {}
    for i, item in enumerate(data):
        fields = _Fields(path, item, f"[{i}]")
        question_id = fields.get_int("question_id")
        if question_id in results:
            fields.fail(f"[{i}].question_id {question_id} is answered twice")
        results[question_id] = fields.get_str("answer")
    return results


def check_questions_match(questions: list[VqaQuestion], annotations: list[VqaAnnotation],
                          questions_path: str | os.PathLike, annotations_path: str | os.PathLike) -> None:
    """Raise UserError unless both files hold the same question ids with the same image ids."""
    by_id = {q.question_id: q.image_id for q in questions}
    for ann in annotations:
        if ann.question_id not in by_id:
            raise UserError(f"{annotations_path}: question_id {ann.question_id} is not in {questions_path}")
        if by_id[ann.question_id] != ann.image_id:
            raise UserError(f"{annotations_path}: question_id {ann.question_id} has image_id {ann.image_id}, but "
                            f"{by_id[ann.question_id]} in {questions_path}")
    if len(by_id) != len(annotations):
        missing = sorted(set(by_id) - {ann.question_id for ann in annotations})
        raise UserError(f"{annotations_path}: no annotation for question_id {missing[0]} of {questions_path} "
                        f"({len(missing)} missing)")


# ----------------------------------------------------------------------------------------------------------------
# Image ids


def _annotation_file_ids(path: str | os.PathLike) -> dict[str, int]:
    """``file_name -> id`` from any COCO-style JSON with an ``images`` list (instances, captions...)."""
    path, data = _load_json(path, "--annotations")
    mapping = {}
    for image in _read_images(path, data, "COCO-style"):
        mapping[image.file_name] = image.id
    return mapping


def image_ids_for_dir(directory: str | os.PathLike, annotations: str | os.PathLike | None = None,
                      recursive: bool = False) -> dict[Path, int | str]:
    """Every image file under ``directory`` (extensions ``IMAGE_EXTENSIONS``) to its image id, sorted by path.

    The id comes from the first rule that applies (docs/cli.md): the COCO-style ``annotations`` JSON mapping the file's
    ``file_name`` (its path relative to ``directory``, or its bare name) to ``id``; the trailing number of the file
    name; the file stem. Two files with the same id are an error naming both."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--images directory not found: {directory}")
    by_name = _annotation_file_ids(annotations) if annotations is not None else {}
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in directory.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"--images {directory} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    ids: dict[Path, int | str] = {}
    owner: dict[int | str, Path] = {}
    for file in files:
        image_id = image_id_for(file, directory, by_name)
        if image_id in owner:
            raise UserError(f"--images {directory}: {owner[image_id].name} and {file.name} both have image id "
                            f"{image_id!r}")
        owner[image_id] = file
        ids[file] = image_id
    return ids


def group_by(items: Iterable[Any], key: str) -> dict[Any, list[Any]]:
    """Group dataclass records by one attribute, keeping file order (e.g. questions by ``image_id``)."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for item in items:
        groups[getattr(item, key)].append(item)
    return dict(groups)
