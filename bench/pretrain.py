"""Pretraining throughput: our VisualBERT-base / LXMERT-base vs Hugging Face's, and the input pipeline.

For each architecture this times one optimizer step (forward, the pretraining losses, backward, gradient clipping,
AdamW) on a batch of 16 captions of 20 tokens and 36 regions of 2048-d features, in fp32 and, where the CPU runs
bf16 natively (``vl.precision.bf16_native``), under bf16 autocast:

- ours: ``VLPretrainer`` (what ``vl pretrain`` trains) with the objectives of ``configs/pretrain-{arch}-base.yaml``
  (VisualBERT: MLM + ITM; LXMERT: MLM + MRC + MRFR + ITM);
- Hugging Face: ``VisualBertForPreTraining`` / ``LxmertForPreTraining`` built from the same sizes
  (``vl.checkpoints.hf_vl.hf_config``), with the same losses (LXMERT: MLM, matching, object and feature
  prediction; no attribute or QA loss), the same masks and the same optimizer (fused AdamW, clipping at 1.0).

It prints samples/s, the ratios to Hugging Face's fp32 speed, and achieved TFLOP/s as a fraction of the measured
matmul peak of the same precision. Only the FLOPs the objectives need count: those of our implementation, which
runs the MLM and region heads at masked positions only and the last layer's queries, attention output and
feed-forward only at the rows those heads and the pooler read (``torch.utils.flop_counter``; backward included).

The fp32 floor (``fp32_floor``) is what the step cannot do without: the matrix products it runs, each timed alone
on operands that stay in cache (recorded from one step with a dispatch mode, replayed interleaved with the steps),
plus the clipping and optimizer step alone. ``hf_over_ours_floor`` is the most any implementation of our products
could reach against Hugging Face's fp32 step; ``*_beyond_floor_s`` is what each step spends on everything else:
LayerNorm, GELU, softmax, dropout, residual adds, copies, allocation, and products whose operands are not in cache.

``--compile`` adds ``ours_compiled_{fp32,bf16}``: the same step with ``nn.Module.compile()`` on our module (what
``train.compile: true`` does), timed after a warm-up that includes the compilation (``compile_s``).

The input pipeline (shard reading and JSON decoding, the store join, tokenisation, masking, collation) is timed
alone on synthetic shards and a synthetic 36 x 2048-d store, in one process, and compared with what the fastest
training step consumes.

    .venv/bin/python bench/pretrain.py [--steps 3] [--warmup 1] [--threads N] [--archs visualbert lxmert] [--compile]

On a machine other jobs share, use ``--threads 1``: two OpenMP threads competing with other processes for two cores
spin and make every timing meaningless.

Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vl.checkpoints.hf_vl import hf_config
from vl.config import load_config
from vl.fusion.pretraining import HeadsConfig, build_pretraining_model
from vl.objectives import build_objective
from vl.precision import bf16_native, cpu_name, machine_info
from vl.train.loop import TrainConfig
from vl.train.optim import build_optimizer, clipped_step
from vl.train.pretrain_config import VLPretrainConfig
from vl.train.pretrainer import VLPretrainer

ROOT = Path(__file__).resolve().parents[1]
BATCH, TOKENS, REGIONS, FEATURE_DIM = 16, 20, 36, 2048
MASK_PROB = 0.15


def measure_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured matmul TFLOP/s of a size^3 product in ``dtype``: the fastest of ``repeats`` products, so that a
    moment of load from another job on a shared machine does not lower the peak (a fraction above 1 would follow)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size**3 / fastest / 1e12


def make_batch(arch: str, vocab_size: int, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pretraining batch with fixed masks: 15% of tokens (>= 1 per caption) and of regions masked, half of the
    pairs mismatched."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (BATCH, TOKENS), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    token_mask = torch.rand(BATCH, TOKENS, generator=g) < MASK_PROB
    token_mask[:, 0] = token_mask[:, -1] = False
    token_mask[torch.arange(BATCH), torch.randint(1, TOKENS - 1, (BATCH,), generator=g)] = True
    mlm_labels = torch.where(token_mask, input_ids, torch.full_like(input_ids, -100))
    feats = torch.rand(BATCH, REGIONS, FEATURE_DIM, generator=g)
    region_mask = torch.rand(BATCH, REGIONS, generator=g) < MASK_PROB
    region_mask[:, 0] = True
    corners = torch.rand(BATCH, REGIONS, 2, 2, generator=g).sort(dim=2).values  # (B, R, (lo, hi), (x, y))
    boxes = torch.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]], dim=-1)
    probs = torch.softmax(torch.randn(BATCH, REGIONS, num_classes, generator=g), dim=-1)
    batch = {
        "input_ids": input_ids.masked_fill(token_mask, 4),
        "attention_mask": torch.ones(BATCH, TOKENS, dtype=torch.long),
        "token_type_ids": torch.zeros(BATCH, TOKENS, dtype=torch.long),
        "region_feats": feats.masked_fill(region_mask[..., None], 0.0),
        "region_boxes": boxes,
        "region_mask": torch.ones(BATCH, REGIONS, dtype=torch.long),
        "mlm_labels": mlm_labels,
        "itm_labels": (torch.arange(BATCH) % 2).long(),
        "task": "all",
    }
    if arch == "lxmert":
        batch["mrm_mask"] = region_mask
        batch["mrm_feat_targets"] = feats
        batch["mrm_class_targets"] = probs.argmax(-1).masked_fill(~region_mask, -100)
        batch["mrm_class_probs"] = probs
    return batch


def hf_inputs(arch: str, batch: dict[str, torch.Tensor]) -> dict:
    """The same batch in Hugging Face's argument names and conventions."""
    common = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
    if arch == "visualbert":
        visual_labels = torch.full((BATCH, REGIONS), -100, dtype=torch.long)
        return {**common, "visual_embeds": batch["region_feats"],
                "visual_attention_mask": batch["region_mask"],
                "visual_token_type_ids": torch.ones(BATCH, REGIONS, dtype=torch.long),
                "labels": torch.cat([batch["mlm_labels"], visual_labels], dim=1),
                "sentence_image_labels": 1 - batch["itm_labels"]}
    mask = batch["mrm_mask"].float()
    return {**common, "visual_feats": batch["region_feats"], "visual_pos": batch["region_boxes"],
            "visual_attention_mask": batch["region_mask"], "labels": batch["mlm_labels"],
            "obj_labels": {"obj": (batch["mrm_class_probs"].argmax(-1), mask),
                           "feat": (batch["mrm_feat_targets"], mask)},
            "matched_label": batch["itm_labels"]}


def build_ours(arch: str):
    cfg = load_config(VLPretrainConfig, ROOT / "configs" / f"pretrain-{arch}-base.yaml")
    heads = HeadsConfig(mlm=True, itm=True, region_outputs={"obj": 1600, "feat": FEATURE_DIM}
                        if arch == "lxmert" else {})
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model, heads)
    objectives = {name: build_objective(name, model, spec.options) for name, spec in cfg.objectives.items()}
    module = VLPretrainer(model, objectives, {"all": tuple(objectives)})
    return module, cfg.model, heads


def build_hf(arch: str, model_cfg, heads):
    import transformers

    config = hf_config(model_cfg, heads)
    config.pop("architectures"), config.pop("model_type")
    if arch == "visualbert":
        config["visual_embedding_dim"] = model_cfg.region.feature_dim
        return transformers.VisualBertForPreTraining(transformers.VisualBertConfig(**config))
    config["visual_attr_loss"] = False
    config["task_qa"] = False
    return transformers.LxmertForPreTraining(transformers.LxmertConfig(**config))


def hf_loss(arch: str, model, inputs) -> torch.Tensor:
    return model(**inputs).loss


def time_training(step, warmup: int, steps: int) -> float:
    """Median seconds per call of ``step`` after ``warmup`` calls."""
    return time_interleaved({"step": step}, warmup, steps)["step"]


def time_interleaved(steps_by_name: dict, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each step function, calling them in turn (after ``warmup`` calls of each), so that
    a change of load on a shared machine affects all of them alike. A function that returns a float reports its own
    seconds (``products_alone``)."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            reported = step()
            times[name].append(reported if isinstance(reported, float) else time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def make_step(model, loss_fn, precision: str, kernel_clipping: bool):
    """One training step. ``kernel_clipping``: clip as ``vl pretrain`` does (the factor applied inside the fused AdamW
    kernel, ``clipped_step``); else ``clip_grad_norm_`` then ``step()``, as a Hugging Face training loop does."""
    optimizer = build_optimizer(model, TrainConfig(lr=1e-5))
    params = list(model.parameters())
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.float().backward()
        clipped_step(optimizer, params, 1.0, in_kernel=kernel_clipping)
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def recorded_products(step) -> collections.Counter:
    """The matrix products one call of ``step`` runs: (op, operands' shapes, strides and dtypes) -> count."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products: collections.Counter = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "bmm"):
                operands = tuple((tuple(a.shape), tuple(a.stride()), a.dtype) for a in args
                                 if isinstance(a, torch.Tensor))
                products[(name, operands)] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        step()
    return products


def products_alone(products: collections.Counter, repeats: int = 3):
    """A function that runs the recorded products alone and returns their seconds: each product on operands of its
    shapes and strides, which stay in cache, the fastest of ``repeats`` calls times its count. No other work."""
    operands = {key: [torch.empty_strided(shape, stride, dtype=dtype).normal_() for shape, stride, dtype in key[1]]
                for key in products}

    def run() -> float:
        total = 0.0
        for key, count in products.items():
            product, tensors = getattr(torch, key[0]), operands[key]
            product(*tensors)
            fastest = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                product(*tensors)
                fastest = min(fastest, time.perf_counter() - start)
            total += count * fastest
        return total

    return run


def optimizer_alone(model, loss_fn, optimizer, kernel_clipping: bool, repeats: int = 3) -> float:
    """Seconds of the clipping and optimizer step alone (the fastest of ``repeats``), on the gradients of one
    backward."""
    params = list(model.parameters())
    loss_fn().backward()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        clipped_step(optimizer, params, 1.0, in_kernel=kernel_clipping)
        fastest = min(fastest, time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    return fastest


def needed_flops(module, batch) -> float:
    """FLOPs of one forward + backward of our implementation (heads at masked positions only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        losses = module(batch)
        sum(losses.values()).backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_arch(arch: str, warmup: int, steps: int, peaks: dict[str, float], compile_ours: bool = False) -> dict:
    module, model_cfg, heads = build_ours(arch)
    vocab = model_cfg.text.vocab_size
    batch = make_batch(arch, vocab, 1600)
    flops = needed_flops(module, batch)
    result: dict = {"needed_gflop_per_step": round(flops / 1e9, 1),
                    "params_M": round(sum(p.numel() for p in module.parameters()) / 1e6, 1)}
    hf_model = build_hf(arch, model_cfg, heads)
    inputs = hf_inputs(arch, batch)

    def ours_loss(model=module) -> torch.Tensor:
        return sum(model(batch).values())

    def hf_model_loss(model=hf_model) -> torch.Tensor:
        return hf_loss(arch, model, inputs)

    precisions = tuple(peaks)  # fp32, and bf16 where the CPU runs it natively
    for precision in precisions:  # ours and Hugging Face's steps alternate
        ours_step, ours_optimizer = make_step(module, ours_loss, precision, True)
        hf_step, hf_optimizer = make_step(hf_model, hf_model_loss, precision, False)
        timed = {"ours": ours_step, "hf": hf_step}
        if precision == "fp32":  # the floor: the products alone, interleaved with the steps
            timed["ours_products"] = products_alone(recorded_products(ours_step))
            timed["hf_products"] = products_alone(recorded_products(hf_step))
        seconds = time_interleaved(timed, warmup, steps)
        result[f"ours_{precision}"] = {"samples_per_s": round(BATCH / seconds["ours"], 2),
                                       "step_s": round(seconds["ours"], 3),
                                       "tflops": round(flops / seconds["ours"] / 1e12, 4),
                                       "fraction_of_peak": round(flops / seconds["ours"] / 1e12 / peaks[precision], 3)}
        result[f"hf_{precision}"] = {"samples_per_s": round(BATCH / seconds["hf"], 2),
                                     "step_s": round(seconds["hf"], 3),
                                     "useful_tflops": round(flops / seconds["hf"] / 1e12, 4)}
        print(f"{arch} ours {precision}: {result[f'ours_{precision}']}", file=sys.stderr)
        print(f"{arch} hf {precision}: {result[f'hf_{precision}']}", file=sys.stderr)
        if precision == "fp32":
            result["fp32_floor"] = floor = {
                "ours_products_alone_s": round(seconds["ours_products"], 3),
                "ours_optimizer_alone_s": round(optimizer_alone(module, ours_loss, ours_optimizer, True), 3),
                "hf_products_alone_s": round(seconds["hf_products"], 3),
                "hf_optimizer_alone_s": round(optimizer_alone(hf_model, hf_model_loss, hf_optimizer, False), 3)}
            floor["ours_floor_s"] = round(floor["ours_products_alone_s"] + floor["ours_optimizer_alone_s"], 3)
            floor["ours_beyond_floor_s"] = round(seconds["ours"] - floor["ours_floor_s"], 3)
            floor["hf_beyond_floor_s"] = round(
                seconds["hf"] - floor["hf_products_alone_s"] - floor["hf_optimizer_alone_s"], 3)
            floor["hf_over_ours_floor"] = round(seconds["hf"] / floor["ours_floor_s"], 2)
            print(f"{arch} fp32 floor (products and optimizer alone): {floor}", file=sys.stderr)
        del ours_step, ours_optimizer, hf_step, hf_optimizer
        gc.collect()
    del hf_model, hf_model_loss
    gc.collect()
    if compile_ours:
        module.compile()
        for precision in precisions:
            step, optimizer = make_step(module, ours_loss, precision, True)
            start = time.perf_counter()
            step()  # compiles
            compile_s = time.perf_counter() - start
            seconds = time_training(step, warmup, steps)
            result[f"ours_compiled_{precision}"] = {
                "samples_per_s": round(BATCH / seconds, 2), "step_s": round(seconds, 3),
                "compile_s": round(compile_s, 1),
                "fraction_of_peak": round(flops / seconds / 1e12 / peaks[precision], 3)}
            print(f"{arch} ours compiled {precision}: {result[f'ours_compiled_{precision}']}", file=sys.stderr)
            del step, optimizer
            gc.collect()
    del module, ours_loss
    gc.collect()
    hf_fp32 = result["hf_fp32"]["samples_per_s"]
    result["ours_fp32_vs_hf_fp32"] = round(result["ours_fp32"]["samples_per_s"] / hf_fp32, 2)
    if "bf16" in precisions:
        result["ours_bf16_vs_hf_fp32"] = round(result["ours_bf16"]["samples_per_s"] / hf_fp32, 2)
        result["ours_bf16_vs_hf_bf16"] = round(
            result["ours_bf16"]["samples_per_s"] / result["hf_bf16"]["samples_per_s"], 2)
    for precision in precisions if compile_ours else ():
        result[f"ours_compiled_{precision}_vs_hf_fp32"] = round(
            result[f"ours_compiled_{precision}"]["samples_per_s"] / hf_fp32, 2)
    return result


# ------------------------------------------------------------------------------------------------- input pipeline


def write_pipeline_data(root: Path, images: int, captions_per_image: int = 5) -> tuple[list[str], Path]:
    """Synthetic shards (JPEG-sized image members, JSON with captions) and a 36 x 2048-d store."""
    from region_features.store_writer import FeatureStoreWriter

    rng = np.random.default_rng(0)
    words = ["a", "red", "blue", "large", "small", "circle", "square", "left", "of", "the", "above", "two", "green",
             "triangle", "star", "and", "with", "next", "to", "cross"]
    shards = []
    per_shard = 256
    for number in range(0, images, per_shard):
        path = root / f"train-{number // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for image_id in range(number, min(number + per_shard, images)):
                captions = [" ".join(rng.choice(words, size=rng.integers(8, 16))) for _ in range(captions_per_image)]
                members = {"jpg": rng.bytes(6000), "txt": captions[0].encode(),
                           "json": json.dumps({"image_id": image_id, "captions": captions}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{image_id:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    store = root / "store"
    with FeatureStoreWriter(store, FEATURE_DIM, 1600, 400, fsync=False) as writer:
        for image_id in range(images):
            boxes = np.sort(rng.uniform(0, 400, size=(REGIONS, 2, 2)), axis=1).reshape(REGIONS, 4)
            probs = rng.dirichlet(np.ones(1600) * 0.05, size=REGIONS).astype(np.float16)
            writer.add(image_id, {"image_h": 480, "image_w": 640, "boxes": boxes[:, [0, 2, 1, 3]],
                                  "features": rng.standard_normal((REGIONS, FEATURE_DIM), dtype=np.float32),
                                  "object_ids": probs.argmax(1), "object_conf": probs.max(1).astype(np.float32),
                                  "object_probs": probs, "attr_ids": rng.integers(0, 400, REGIONS),
                                  "attr_conf": rng.uniform(size=REGIONS).astype(np.float32)})
    return shards, store


def bench_pipeline(images: int, batches: int) -> dict:
    from region_features.store import FeatureStore
    from vl.data.shards import ShardStream
    from vl.data.vl_batches import PretrainBatchMaker, TaskMixer
    from vl.data.vl_masking import VLBatchPlan
    from vl.text.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, store_dir = write_pipeline_data(root, images)
        corpus = root / "corpus.txt"
        corpus.write_text("a red blue large small circle square left of the above two green triangle star and with "
                          "next to cross\n" * 20)
        tokenizer = Tokenizer.train([corpus], 200, min_frequency=1)
        cfg = load_config(VLPretrainConfig, ROOT / "configs" / "pretrain-lxmert-base.yaml")
        data_cfg = dataclasses.replace(cfg.data, max_text_len=TOKENS, num_workers=0)
        plans = {"all": VLBatchPlan(mask_text=True, mask_regions=True, itm_negatives=True)}
        store = FeatureStore(store_dir)
        maker = PretrainBatchMaker(tokenizer, store, data_cfg, TaskMixer({"all": 1.0}, 0, sum_all=True), plans,
                                   "lxmert4", with_class_probs=True)
        stream = ShardStream(shards, data_cfg.stream_config(BATCH), maker, seed=0, check_record=maker.check_record)
        iterator = iter(stream)
        next(iterator)  # open files, warm caches
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
    return {"samples_per_s_one_process": round(batches * BATCH / seconds, 1),
            "batch_ms": round(seconds / batches * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["visualbert", "lxmert"], choices=["visualbert", "lxmert"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--pipeline-images", type=int, default=512)
    parser.add_argument("--pipeline-batches", type=int, default=60)
    parser.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = bf16_native("cpu")  # without it a bf16 step is many times slower than fp32: not worth timing
    peaks = {"fp32": measure_peak(torch.float32)}
    if native:
        peaks["bf16"] = measure_peak(torch.bfloat16)
    print(f"{cpu_name()}, bf16 {'native' if native else 'not native (bf16 not timed)'}; "
          f"matmul peak TFLOP/s: {peaks}", file=sys.stderr)
    figures: dict = {"bench": "pretrain", "cpu": cpu_name(), "bf16_native": native, "batch": BATCH,
                     "tokens": TOKENS, "regions": REGIONS, "feature_dim": FEATURE_DIM,
                     "threads": torch.get_num_threads(), "peak_tflops": {k: round(v, 4) for k, v in peaks.items()}}
    for arch in args.archs:
        figures[arch] = bench_arch(arch, args.warmup, args.steps, peaks, args.compile)
    pipeline = bench_pipeline(args.pipeline_images, args.pipeline_batches)
    fastest = max(figures[arch]["ours_bf16" if native else "ours_fp32"]["samples_per_s"] for arch in args.archs)
    pipeline["training_consumes_samples_per_s"] = fastest
    pipeline["pipeline_vs_training"] = round(pipeline["samples_per_s_one_process"] / fastest, 1)
    figures["pipeline"] = pipeline
    figures["targets_met"] = {
        "fp32_ge_1.3x_hf": all(figures[a]["ours_fp32_vs_hf_fp32"] >= 1.3 for a in args.archs),
        "bf16_ge_2x_hf_fp32": all(figures[a]["ours_bf16_vs_hf_fp32"] >= 2.0 for a in args.archs) if native else None,
        "pipeline_ge_5x_training": pipeline["pipeline_vs_training"] >= 5.0,
    }
    print(json.dumps({**figures, **machine_info()}))


if __name__ == "__main__":
    main()
