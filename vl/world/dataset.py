"""The generated visual world written in the standard dataset formats (docs/cli.md).

No real dataset can be downloaded here, so every test, benchmark and the demo learn from this world. It is small,
learnable, deterministic by seed and written in exactly the formats real datasets come in. ``generate_world`` writes:

    OUT/world.json                                         manifest, written last: its presence means complete
    OUT/images/{split}2014/COCO_{split}2014_{id:012d}.jpg  RGB images; the trailing number is the image id
    OUT/annotations/instances_{split}2014.json             COCO instances; "attributes": [color, size] per box
    OUT/annotations/captions_{split}2014.json              COCO captions, 5 per image
    OUT/scenes/scenes_{split}2014.json                     CLEVR-style scene graphs (the ground truth)
    OUT/dataset_coco.json                                  Karpathy split over all images (cocoid = image id)
    OUT/refer/refs.json                                    referring expressions, RefCOCO layout (vl.world.refer)
    OUT/vqa/v2_OpenEnded_mscoco_{split}2014_questions.json VQA v2 questions
    OUT/vqa/v2_mscoco_{split}2014_annotations.json         VQA v2 annotations, 10 answers each
    OUT/vqa/question_families_{split}2014.json             {"families": {question_id: family}}: what each question
                                                           asks (color, shape, size, size_yes_no, count, exist,
                                                           spatial_yes_no, spatial_choice), which VQA's question
                                                           types (their first words) do not tell apart
    OUT/shards/{split}-{000000..N}.tar                     img2dataset-style webdataset shards
    OUT/text/corpus.txt                                    plain text of all splits: one sentence per line, a blank
                                                           line between documents (one per image: its captions,
                                                           a description and its questions)
    OUT/text/corpus_{split}.txt                            the same, per split

``WorldPaths(OUT)`` names every one of these files. The scenes themselves (vocabulary, rendering) live in
``vl/world/scene.py`` and their language (captions, questions) in ``vl/world/language.py``; the names
other code needs are re-exported here. The whole output is byte-identical for the same arguments.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from vl.progress import progress_bar

from vl.atomic import atomic_output, publish
from vl.config import atomic_write_text
from vl.data.formats import karpathy_tokens
from vl.world.language import YesNoBalancer, describe_scene, make_captions, make_questions
from vl.world.refer import scene_refs
from vl.world.scene import (
    COLORS,
    GENERATOR_VERSION,
    MAX_OBJECTS,
    MIN_OBJECTS,
    MAX_SIZE_PX,
    MIN_SIZE_PX,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SceneObject,
    image_file_name,
    image_rng,
    iter_scenes,
    load_scenes,
    measure_speed,
    render_clean,
    render_scene,
)
from vl.errors import UserError

__all__ = [
    "COLORS", "GENERATOR_VERSION", "MAX_OBJECTS", "MIN_OBJECTS", "SHAPES", "SIZES", "SPLITS", "Scene", "SceneObject",
    "WorldConfig", "WorldPaths", "assign_image_ids", "generate_world", "image_file_name", "image_rng", "load_scenes",
    "load_world", "measure_speed", "render_clean", "render_scene",
]


@dataclass(frozen=True)
class WorldConfig:
    """What ``generate_world`` makes: image counts per split, image side in pixels, questions per image, images per
    shard and the seed. Validation errors name the ``vl generate-world`` flag."""

    seed: int = 0
    train: int = 100
    val: int = 20
    test: int = 20
    size: int = 224  # image side (square images)
    shard_size: int = 1000  # images per webdataset shard
    questions_per_image: int = 6

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {self.seed!r}")
        for split in SPLITS:
            count = getattr(self, split)
            if not isinstance(count, int) or count < 1:
                raise UserError(f"--{split} must be a positive number of images, got {count!r}")
        if not isinstance(self.size, int) or not MIN_SIZE_PX <= self.size <= MAX_SIZE_PX:
            raise UserError(f"--size must be an integer from {MIN_SIZE_PX} to {MAX_SIZE_PX} pixels, got {self.size!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise UserError(f"--shard-size must be a positive number of images, got {self.shard_size!r}")
        if not isinstance(self.questions_per_image, int) or not 1 <= self.questions_per_image <= 20:
            raise UserError(f"--questions-per-image must be from 1 to 20, got {self.questions_per_image!r}")

    def count(self, split: str) -> int:
        return getattr(self, split)


@dataclass(frozen=True)
class WorldPaths:
    """Where every file of a generated world lives, given its root directory. ``split`` is one of ``SPLITS``.

    - ``images_dir(split)``: ``images/{split}2014/``; ``image_path(split, image_id)``: one image there;
    - ``instances(split)``, ``captions(split)``: COCO instances / captions JSON;
    - ``scenes(split)``: the scene graphs (ground truth of every object);
    - ``vqa_questions(split)``, ``vqa_annotations(split)``: VQA v2 questions / annotations JSON;
      ``question_families(split)``: what each question asks (``{"families": {question_id: family}}``);
    - ``shards(split)``: the shard tar files, sorted; ``shard_pattern(split)``: them in brace notation;
    - ``karpathy``: ``dataset_coco.json``; ``refs``: ``refer/refs.json``, referring expressions of every split in
      the RefCOCO layout (``vl.world.refer``); ``corpus``: ``text/corpus.txt`` (all splits);
      ``corpus_split(split)``: ``text/corpus_{split}.txt``; ``manifest``: ``world.json``.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / "world.json"

    @property
    def karpathy(self) -> Path:
        return self.root / "dataset_coco.json"

    @property
    def corpus(self) -> Path:
        return self.root / "text" / "corpus.txt"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def corpus_split(self, split: str) -> Path:
        return self.root / "text" / f"corpus_{_check_split(split)}.txt"

    def images_dir(self, split: str) -> Path:
        return self.root / "images" / f"{_check_split(split)}2014"

    def image_path(self, split: str, image_id: int) -> Path:
        return self.images_dir(split) / image_file_name(split, image_id)

    def instances(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{_check_split(split)}2014.json"

    @property
    def refs(self) -> Path:
        return self.root / "refer" / "refs.json"

    def captions(self, split: str) -> Path:
        return self.root / "annotations" / f"captions_{_check_split(split)}2014.json"

    def scenes(self, split: str) -> Path:
        return self.root / "scenes" / f"scenes_{_check_split(split)}2014.json"

    def vqa_questions(self, split: str) -> Path:
        return self.root / "vqa" / f"v2_OpenEnded_mscoco_{_check_split(split)}2014_questions.json"

    def vqa_annotations(self, split: str) -> Path:
        return self.root / "vqa" / f"v2_mscoco_{_check_split(split)}2014_annotations.json"

    def question_families(self, split: str) -> Path:
        return self.root / "vqa" / f"question_families_{_check_split(split)}2014.json"

    def shards(self, split: str) -> list[Path]:
        return sorted(self.shards_dir.glob(f"{_check_split(split)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))

    def shard_pattern(self, split: str) -> str:
        """The split's shards in brace notation, e.g. ``OUT/shards/train-{000000..000002}.tar``."""
        count = len(self.shards(split))
        if count == 0:
            raise UserError(f"no {split} shards under {self.shards_dir}")
        if count == 1:
            return str(self.shards_dir / f"{split}-000000.tar")
        return str(self.shards_dir / f"{split}-{{000000..{count - 1:06d}}}.tar")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return split


def load_world(root: str | os.PathLike) -> WorldPaths:
    """The paths of a complete world at ``root`` (one whose ``world.json`` exists)."""
    paths = WorldPaths(Path(root))
    if not paths.manifest.is_file():
        raise UserError(f"{root} holds no generated world (no world.json; run `vl generate-world --out {root}`)")
    return paths


def assign_image_ids(seed: int, counts: dict[str, int]) -> dict[str, list[int]]:
    """Sparse image ids, unique across splits, increasing in (train, val, test) order; like COCO's they are not
    0..N-1, so code that confuses an index with an id fails."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    next_id = int(rng.integers(1, 1000))
    ids: dict[str, list[int]] = {}
    for split in SPLITS:
        split_ids = []
        for _ in range(counts[split]):
            split_ids.append(next_id)
            next_id += int(rng.integers(1, 8))
        ids[split] = split_ids
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Writing the world


def _json_text(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


class _ShardWriter:
    """img2dataset-style shards: ``{split}-{shard:06d}.tar`` holding ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` where KEY
    is the shard number (5 digits) and the sample's position in it. Each tar is written under a temporary name and
    renamed when full; member metadata is fixed (mtime 0, root owner) so the bytes depend only on the content."""

    def __init__(self, directory: Path, split: str, shard_size: int) -> None:
        self.directory = directory
        self.split = split
        self.shard_size = shard_size
        self.sample_digits = max(4, len(str(shard_size - 1)))
        self.shard_index = -1
        self.in_shard = 0
        self.tar: tarfile.TarFile | None = None
        self.tmp_path: Path | None = None
        self.written: list[Path] = []

    def _open_next(self) -> None:
        self._close_current()
        self.shard_index += 1
        self.in_shard = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.split}-{self.shard_index:06d}.", suffix=".tmp", dir=self.directory)
        os.close(fd)
        self.tmp_path = Path(tmp)
        self.tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in _close_current)

    def _close_current(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        final = self.directory / f"{self.split}-{self.shard_index:06d}.tar"
        publish(self.tmp_path, final)
        self.written.append(final)
        self.tar = None
        self.tmp_path = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, jpeg: bytes, captions: Sequence[str], scene: Scene) -> None:
        if self.tar is None or self.in_shard >= self.shard_size:
            self._open_next()
        key = f"{self.shard_index:05d}{self.in_shard:0{self.sample_digits}d}"
        meta = {"key": key, "image_id": scene.image_id, "file_name": scene.file_name, "caption": captions[0],
                "captions": list(captions), "width": scene.width, "height": scene.height, "status": "success"}
        self._add(f"{key}.jpg", jpeg)
        self._add(f"{key}.txt", captions[0].encode("utf-8"))
        self._add(f"{key}.json", json.dumps(meta).encode("utf-8"))
        self.in_shard += 1

    def close(self) -> list[Path]:
        self._close_current()
        return self.written

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tmp_path.unlink(missing_ok=True)
            self.tar = None


_INFO = {"description": "vl generated visual world", "version": str(GENERATOR_VERSION), "year": 2014,
         "contributor": "vl", "url": "", "date_created": "2014-01-01"}
_LICENSES = [{"id": 1, "name": "generated", "url": ""}]


# Paths a world (or an interrupted generation of one) consists of, relative to OUT; nothing else is ever deleted.
_WORLD_FILE = re.compile(
    r"(world\.json|dataset_coco\.json|refer/refs\.json"
    r"|images/(train|val|test)2014/COCO_(train|val|test)2014_\d{12}\.jpg"
    r"|annotations/(instances|captions)_(train|val|test)2014\.json|scenes/scenes_(train|val|test)2014\.json"
    r"|vqa/v2_(OpenEnded_mscoco_(train|val|test)2014_questions|mscoco_(train|val|test)2014_annotations)\.json"
    r"|vqa/question_families_(train|val|test)2014\.json"
    r"|shards/(train|val|test)-\d{6}\.tar|text/corpus(_(train|val|test))?\.txt)"
    r"|(.*/)?\.[^/]+\.tmp")
_WORLD_DIRS = ("images/train2014", "images/val2014", "images/test2014", "images", "annotations", "scenes", "vqa",
               "shards", "text", "refer")


def _prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless it holds a world (complete, or left by an interrupted run) and ``force``
    is set; then delete that world's files, and only those."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    entries = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    foreign = [e for e in entries if e not in _WORLD_DIRS and not _WORLD_FILE.fullmatch(e)]
    if foreign:
        raise UserError(f"--out {out} is not empty and holds files that are not a world's (e.g. {foreign[0]}); "
                        f"choose a new or empty directory")
    if not force:
        state = "already holds a world" if (out / "world.json").is_file() else "holds an incomplete world"
        raise UserError(f"--out {out} {state}; pass --force to replace it")
    (out / "world.json").unlink(missing_ok=True)  # first: a half-deleted world must not look complete
    for entry in sorted(entries, key=lambda e: -e.count("/")):
        if entry == "world.json":
            continue
        path = out / entry
        if path.is_dir():
            path.rmdir()  # empty by now: its files came first (deeper paths first)
        else:
            path.unlink()


def generate_world(out: str | os.PathLike, cfg: WorldConfig, force: bool = False, progress: bool = True) -> WorldPaths:
    """Generate the world described by ``cfg`` into ``out`` and return its paths. ``out`` must be new or empty, or
    hold a previous world and ``force`` be set. Every file is written through a temporary name and a rename, and
    ``world.json`` is written last. Shows a progress bar on stderr when ``progress`` is true."""
    out = Path(out)
    _prepare_out_dir(out, force)
    paths = WorldPaths(out)
    counts = {split: cfg.count(split) for split in SPLITS}
    image_ids = assign_image_ids(cfg.seed, counts)
    files: list[str] = []
    categories = [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]
    category_ids = {shape: i + 1 for i, shape in enumerate(SHAPES)}
    karpathy_images: list[dict[str, Any]] = []
    corpus_docs: list[str] = []
    ann_id = caption_id = 0
    refs: list[dict[str, Any]] = []
    ref_id = ref_sent_id = 0
    stats: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    bar = progress_bar(total=sum(counts.values()), desc="generate-world", unit="img",
                       show=None if progress else False)

    def record(path: Path) -> None:
        files.append(path.relative_to(out).as_posix())

    try:
        for split in SPLITS:
            coco_images, instances, captions_anns, scene_dicts = [], [], [], []
            questions, vqa_anns, split_docs, families = [], [], [], {}
            balancer = YesNoBalancer()
            shard_writer = _ShardWriter(paths.shards_dir, split, cfg.shard_size)
            try:
                for index, (scene, jpeg) in enumerate(iter_scenes(cfg.seed, split, image_ids[split], cfg.size)):
                    image_path = paths.images_dir(split) / scene.file_name
                    _atomic_write_bytes(image_path, jpeg)
                    record(image_path)
                    text_rng = image_rng(cfg.seed, split, index, stream=1)
                    image_captions = make_captions(scene, text_rng)
                    image_questions = make_questions(scene, text_rng, cfg.questions_per_image, balancer)
                    coco_images.append({"id": scene.image_id, "file_name": scene.file_name, "width": scene.width,
                                        "height": scene.height, "license": 1, "date_captured": "2014-01-01 00:00:00",
                                        "coco_url": "", "flickr_url": ""})
                    first_ann = ann_id + 1
                    for obj in scene.objects:
                        ann_id += 1
                        instances.append({"id": ann_id, "image_id": scene.image_id,
                                          "category_id": category_ids[obj.shape], "bbox": list(obj.bbox),
                                          "area": obj.area, "iscrowd": 0, "segmentation": [list(obj.polygon)],
                                          "attributes": [obj.color, obj.size]})
                    scene_refs_, ref_id, ref_sent_id = scene_refs(
                        scene, range(first_ann, ann_id + 1), category_ids, split,
                        image_rng(cfg.seed, split, index, stream=2), ref_id, ref_sent_id)
                    refs.extend(scene_refs_)
                    sentences = []
                    for caption in image_captions:
                        caption_id += 1
                        captions_anns.append({"id": caption_id, "image_id": scene.image_id, "caption": caption})
                        sentences.append({"raw": caption, "tokens": karpathy_tokens(caption), "sentid": caption_id - 1,
                                          "imgid": len(karpathy_images)})
                    karpathy_images.append({"filepath": f"{split}2014", "filename": scene.file_name,
                                            "imgid": len(karpathy_images), "split": split, "cocoid": scene.image_id,
                                            "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
                    for k, question in enumerate(image_questions):
                        question_id = scene.image_id * 1000 + k
                        questions.append({"image_id": scene.image_id, "question": question.text,
                                          "question_id": question_id})
                        families[str(question_id)] = question.family
                        vqa_anns.append({"question_id": question_id, "image_id": scene.image_id,
                                         "question_type": question.question_type,
                                         "answer_type": question.answer_type,
                                         "multiple_choice_answer": question.answer,
                                         "answers": [{"answer": a, "answer_confidence": c, "answer_id": i + 1}
                                                     for i, (a, c) in enumerate(question.annotator_answers)]})
                    # The image's questions too: a vocabulary trained on the corpus then covers the downstream
                    # text, as a general text corpus does for real VQA questions.
                    document = [*image_captions, *describe_scene(scene, text_rng), *(q.text for q in image_questions)]
                    split_docs.append("\n".join(document))
                    scene_dicts.append(scene.to_dict())
                    shard_writer.write(jpeg, image_captions, scene)
                    bar.update(1)
                shard_paths = shard_writer.close()
            except BaseException:
                shard_writer.abort()
                raise
            for shard in shard_paths:
                record(shard)
            subtype = f"{split}2014"
            writes = [
                (paths.instances(split), {"info": _INFO, "licenses": _LICENSES, "images": coco_images,
                                          "annotations": instances, "categories": categories}),
                (paths.captions(split), {"info": _INFO, "licenses": _LICENSES, "images": coco_images,
                                         "annotations": captions_anns}),
                (paths.scenes(split), {"info": {"split": split, "version": GENERATOR_VERSION},
                                       "scenes": scene_dicts}),
                (paths.vqa_questions(split), {"info": _INFO, "task_type": "Open-Ended", "data_type": "mscoco",
                                              "license": _LICENSES[0], "data_subtype": subtype,
                                              "questions": questions}),
                (paths.vqa_annotations(split), {"info": _INFO, "license": _LICENSES[0], "data_subtype": subtype,
                                                "annotations": vqa_anns, "data_type": "mscoco"}),
                (paths.question_families(split), {"families": families}),
            ]
            for path, obj in writes:
                atomic_write_text(path, _json_text(obj))
                record(path)
            atomic_write_text(paths.corpus_split(split), "\n\n".join(split_docs) + "\n")
            record(paths.corpus_split(split))
            corpus_docs.extend(split_docs)
            yes = sum(1 for a in vqa_anns if a["multiple_choice_answer"] == "yes")
            no = sum(1 for a in vqa_anns if a["multiple_choice_answer"] == "no")
            stats[split] = {"images": len(coco_images), "objects": len(instances), "captions": len(captions_anns),
                            "refs": sum(ref["split"] == split for ref in refs),
                            "questions": len(questions), "yes": yes, "no": no, "shards": len(shard_paths),
                            "first_image_id": image_ids[split][0], "last_image_id": image_ids[split][-1]}
    finally:
        bar.close()
    atomic_write_text(paths.karpathy, _json_text({"images": karpathy_images, "dataset": "coco"}))
    record(paths.karpathy)
    atomic_write_text(paths.refs, _json_text(refs))
    record(paths.refs)
    atomic_write_text(paths.corpus, "\n\n".join(corpus_docs) + "\n")
    record(paths.corpus)
    elapsed = time.perf_counter() - start
    manifest = {
        "format": "vl-world", "version": GENERATOR_VERSION, "seed": cfg.seed, "size": cfg.size,
        "config": {"seed": cfg.seed, "train": cfg.train, "val": cfg.val, "test": cfg.test, "size": cfg.size,
                   "shard_size": cfg.shard_size, "questions_per_image": cfg.questions_per_image},
        "splits": stats,
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES)},
        "files": sorted(files),
    }
    atomic_write_text(paths.manifest, json.dumps(manifest, indent=1))
    if progress:
        total = sum(counts.values())
        print(f"generate-world: {total} images in {elapsed:.1f}s ({total / elapsed:.0f} images/s)", file=sys.stderr)
    return paths
