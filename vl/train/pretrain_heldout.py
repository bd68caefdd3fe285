"""Held-out evaluation of VL pretraining: fixed batches from held-out shards, each objective's loss, and the ITM
accuracy on matched and mismatched pairs (``bench/pretrain_learning.py`` reads it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from region_features.ids import expand_shards
from vl.config import from_dict, read_yaml
from vl.data.shards import ShardStream, StreamConfig
from vl.data.tags import region_tagger
from vl.data.vl_batches import SUM_TASK, PretrainBatchMaker, TaskMixer
from vl.data.vl_masking import VLBatchPlan, unmask_batch
from vl.errors import UserError
from vl.objectives import build_objective
from vl.objectives.itm import pair_batch
from vl.text.tokenizer import Tokenizer
from vl.train.pretrain_config import VLPretrainConfig
from vl.train.pretrainer import VLPretrainer, batch_plans, task_objectives


def heldout_batches(maker: PretrainBatchMaker, sources: Sequence[str], batch_size: int, max_batches: int,
                    seed: int, prepared: bool = True) -> list[dict[str, Any]]:
    """Fixed evaluation batches from held-out sources: prepared for every objective (negatives and masking), or
    with ``prepared=False`` plain (every pair matched, nothing masked)."""
    plan = _union_plan(maker.plans.values()) if prepared else VLBatchPlan()
    eval_maker = PretrainBatchMaker(maker.tokenizer, maker.store, maker.cfg, TaskMixer({SUM_TASK: 1.0}, seed, True),
                                    {SUM_TASK: plan}, maker.geometry, maker.with_class_probs, maker.tagger,
                                    maker.num_answers)
    stream = ShardStream(list(sources), StreamConfig(batch_size=batch_size, shuffle_buffer=0, shuffle_shards=False,
                                                     epochs=1, caption_source=maker.cfg.caption_source,
                                                     max_consecutive_faults=0, drop_last=False),
                         eval_maker, seed=seed, check_record=eval_maker.check_record)
    batches = []
    for batch in stream:
        batches.append({key: value for key, value in batch.items() if not key.startswith("_")})
        if len(batches) >= max_batches:
            break
    if not batches:
        raise UserError(f"the held-out data {sources[0]} gives no batches")
    return batches


def _union_plan(plans) -> VLBatchPlan:
    plans = list(plans)
    return VLBatchPlan(mask_text=any(p.mask_text for p in plans), mask_regions=any(p.mask_regions for p in plans),
                       itm_negatives=any(p.itm_negatives for p in plans))


@torch.no_grad()
def evaluate_heldout(module: VLPretrainer, batches: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean loss of every objective on ``batches`` (``val_<name>``) and ITM accuracy (``val_itm_acc``)."""
    device = next(module.parameters()).device
    sums: dict[str, float] = {}
    correct, total = 0, 0
    names = [name for names in module.tasks.values() for name in names]
    for batch in batches:
        batch = {key: (value.to(device) if isinstance(value, torch.Tensor) else value) for key, value in batch.items()}
        output = module.fusion(batch)
        for name in dict.fromkeys(names):
            for key, value in module.objectives[name](output, batch).items():
                sums[f"val_{key}"] = sums.get(f"val_{key}", 0.0) + float(value)
        if module.heads.itm is not None and "itm_labels" in batch:
            logits = module.heads.itm(output.pooled)  # (B, 2)
            correct += int((logits.argmax(dim=-1) == batch["itm_labels"]).sum())
            total += int(batch["itm_labels"].numel())
    values = {key: value / len(batches) for key, value in sums.items()}
    if total:
        values["val_itm_acc"] = correct / total
    return values


def itm_accuracy(module: VLPretrainer, batches: Sequence[dict[str, Any]]) -> float:
    """ITM accuracy on held-out (matched, mismatched) pairs: each caption with its image and with another's.

    batches: plain batches (``heldout_batches(..., prepared=False)``): every pair matched, nothing masked. The
    mismatched partner of caption i is the image half a batch away (pairs of the same image are left out). Returns
    the balanced accuracy: the mean of the accuracies on matched and on mismatched pairs.
    """
    module.eval()
    hits = {1: 0, 0: 0}
    counts = {1: 0, 0: 0}
    with torch.no_grad():
        for batch in batches:
            plain = {key: value for key, value in unmask_batch(batch).items()
                     if isinstance(value, torch.Tensor) and key != "itm_labels"}
            size = plain["input_ids"].shape[0]
            if size < 2:
                continue
            rows = torch.arange(size)
            partners = torch.roll(rows, size // 2)
            different = plain["image_ids"] != plain["image_ids"][partners]
            for pairs, label in ((pair_batch(plain, rows, rows), 1),
                                 (pair_batch(plain, rows[different], partners[different]), 0)):
                if pairs["input_ids"].shape[0] == 0:
                    continue
                logits = module.heads.itm(module.fusion(pairs).pooled)  # (N, 2)
                hits[label] += int((logits.argmax(dim=-1) == label).sum())
                counts[label] += logits.shape[0]
    rates = [hits[label] / counts[label] for label in (0, 1) if counts[label]]
    return sum(rates) / max(len(rates), 1)


def load_pretrainer(run_dir: str | os.PathLike) -> tuple[VLPretrainer, VLPretrainConfig, Tokenizer]:
    """A trained run's module (final weights), its resolved config and its tokenizer."""
    from vl.checkpoints.vl_run import load_vl_run

    run_dir = Path(run_dir)
    cfg = from_dict(VLPretrainConfig, read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    model = load_vl_run(run_dir)
    objectives = {name: build_objective(name, model, spec.options) for name, spec in cfg.objectives.items()}
    return VLPretrainer(model, objectives, task_objectives(cfg)), cfg, Tokenizer.from_dir(run_dir)


def heldout_itm_accuracy(run_dir: str | os.PathLike, features: str | os.PathLike, pattern: str,
                         batch_size: int = 32, max_batches: int = 1000) -> float:
    """ITM accuracy of a trained run on held-out pairs of ``pattern``'s captions (see ``itm_accuracy``)."""
    from region_features.store import FeatureStore

    module, cfg, tokenizer = load_pretrainer(run_dir)
    plans = batch_plans(module.tasks, module.objectives)
    store = FeatureStore(features)
    maker = PretrainBatchMaker(tokenizer, store, cfg.data, TaskMixer({SUM_TASK: 1.0}, 0, True),
                               plans, module.fusion.cfg.region.geometry,
                               any(name in ("mrc", "mrc_kl") for name in cfg.objectives),
                               region_tagger(store, tokenizer, module.fusion.cfg))
    return itm_accuracy(module, heldout_batches(maker, expand_shards(pattern), batch_size, max_batches, 0,
                                                prepared=False))
