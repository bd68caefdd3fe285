"""Shared pytest fixtures.

``world``: a small generated world (``vl/world/dataset.py``), made once per test run, returned as a
``vl.world.dataset.WorldPaths``. Its files, for ``split`` in ``("train", "val", "test")``:

- ``world.root``: the directory; ``world.manifest``: ``world.json`` (seed, sizes, counts, vocab, file list);
- ``world.images_dir(split)`` / ``world.image_path(split, image_id)``: ``images/{split}2014/COCO_{split}2014_*.jpg``;
- ``world.instances(split)``, ``world.captions(split)``: COCO instances (with ``attributes``) / captions JSON;
- ``world.scenes(split)``: the ground-truth scene graphs (``vl.world.dataset.load_scenes``);
- ``world.karpathy``: ``dataset_coco.json`` over all images;
- ``world.vqa_questions(split)``, ``world.vqa_annotations(split)``: VQA v2 JSON;
- ``world.shards(split)`` (tar paths) and ``world.shard_pattern(split)`` (brace notation);
- ``world.corpus`` (all splits) and ``world.corpus_split(split)``: plain text.

Sizes: ``WORLD_CONFIG`` below (48 train / 16 val / 16 test images of 112 px, 6 questions each, 16 images per
shard, so 3 train shards). Treat the directory as read-only: it is shared by every test of the run.

``one_thread`` (module scope): torch runs on one intra-op thread while the module's tests run. Tiny models are
fastest so, and two OpenMP threads on a busy 2-core machine spin badly. Modules opt in with
``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import pytest
import torch

from vl.world.dataset import WorldConfig, WorldPaths, generate_world

WORLD_CONFIG = WorldConfig(seed=1234, train=48, val=16, test=16, size=112, shard_size=16, questions_per_image=6)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldPaths:
    root = tmp_path_factory.mktemp("world") / "world"
    return generate_world(root, WORLD_CONFIG, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
