"""Does the text core learn, and does pretraining help? Tiny BERT and ELECTRA on the generated world's corpus.

1. MLM + SOP (``configs/text-bert-tiny.yaml``, whole-word masking) on the world's train corpus: the MLM loss over
   the first and the last tenth of the run.
2. ELECTRA (``configs/text-electra-tiny.yaml``): discriminator accuracy against the "all original" rate (the
   accuracy of never answering "replaced") over the last tenth of the run. (The tiny config samples at temperature
   2; with ``--electra-temperature 1`` the discriminator needs ~1000 steps to leave the "all original" answer.)
3. Fine-tuning on a small classification task made from the world's val/test sentences: is the sentence as
   written, or are its words shuffled? The pretrained encoder and the same architecture from random weights get
   the same data, steps and learning rate; accuracy on held-out sentences. Also with the frozen pretrained
   encoder (``mode: frozen``).

    .venv/bin/python bench/text_core.py [--pretrain-steps 600] [--finetune-examples 400] [--seed 0]

Ends with one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vl.checkpoints.vl_run import read_model_config, save_vl_run
from vl.config import load_config
from vl.world.dataset import WorldConfig, generate_world
from vl.text.bert import BertPretrainingModel
from vl.text.classify import TASK as CLASSIFY
from vl.text.finetune import FinetuneConfig, TextFinetuneConfig, finetune_text
from vl.text.tokenizer import Tokenizer
from vl.train.loop import TrainConfig
from vl.train.plot import read_metrics
from vl.text.pretrain import TextPretrainConfig, pretrain_text
from vl.precision import machine_info


ROOT = Path(__file__).resolve().parents[1]

def tenths(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean of ``key`` over the first and the last tenth of the rows that have it."""
    values = [row[key] for row in rows if key in row]
    tenth = max(1, len(values) // 10)
    return sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth


def pretrain(config: str, corpus: Path, out: Path, steps: int, seed: int, extra: tuple[str, ...] = ()) -> list[dict]:
    overrides = [f"train.steps={steps}", "train.log_every=5", f"train.save_every={steps}", f"train.seed={seed}",
                 "data.max_len=64", "model.max_position=64", *extra]
    cfg = load_config(TextPretrainConfig, ROOT / "configs" / config, overrides)
    pretrain_text(cfg, [str(corpus)], out)
    return read_metrics(out / "metrics.jsonl")


def order_task(sentences: list[str], rng: random.Random) -> list[dict]:
    """Half the sentences as written (label "original"), half with their words shuffled (label "shuffled")."""
    rows = []
    for sentence in sentences:
        words = sentence.rstrip(".").split()
        if len(words) < 4:
            continue
        if rng.random() < 0.5:
            rows.append({"text": sentence, "label": "original"})
        else:
            shuffled = words[:]
            while shuffled == words:
                rng.shuffle(shuffled)
            rows.append({"text": " ".join(shuffled) + ".", "label": "shuffled"})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-examples", type=int, default=400)
    parser.add_argument("--finetune-epochs", type=float, default=4.0)
    parser.add_argument("--world-images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--electra-temperature", type=float, help="override the config's sampling temperature")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs in DIR (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="text-core-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        world = generate_world(work / "world", WorldConfig(seed=args.seed, train=args.world_images, val=100,
                                                           test=100, size=64), force=True, progress=False)
        corpus = world.corpus_split("train")

        bert_rows = pretrain("text-bert-tiny.yaml", corpus, work / "bert", args.pretrain_steps, args.seed)
        mlm_first, mlm_last = tenths(bert_rows, "mlm")
        sop_first, sop_last = tenths(bert_rows, "sop_acc")

        extra = () if args.electra_temperature is None else (f"electra.temperature={args.electra_temperature}",)
        electra_rows = pretrain("text-electra-tiny.yaml", corpus, work / "electra", args.pretrain_steps, args.seed,
                                extra)
        _, disc_acc = tenths(electra_rows, "disc_acc")
        _, baseline = tenths(electra_rows, "disc_baseline_acc")
        gen_first, gen_last = tenths(electra_rows, "gen_mlm")

        # a randomly initialised twin of the pretrained run: same config, same tokenizer
        scratch = work / "scratch"
        model_cfg, _ = read_model_config(work / "bert")
        torch.manual_seed(args.seed)
        save_vl_run(BertPretrainingModel(model_cfg), scratch)
        Tokenizer.from_dir(work / "bert").save(scratch)

        rng = random.Random(args.seed)
        held_out = [s for s in (world.corpus_split("val").read_text() + world.corpus_split("test").read_text())
                    .splitlines() if s.strip()]
        rng.shuffle(held_out)
        rows = order_task(held_out, rng)
        train_rows, val_rows = rows[:args.finetune_examples], rows[args.finetune_examples:args.finetune_examples + 400]
        write_jsonl(train_rows, work / "order_train.jsonl")
        write_jsonl(val_rows, work / "order_val.jsonl")
        results = {}
        for name, init, mode in (("pretrained", work / "bert", "full"), ("scratch", scratch, "full"),
                                 ("pretrained_frozen", work / "bert", "frozen")):
            cfg = TextFinetuneConfig(
                finetune=FinetuneConfig(mode=mode, epochs=args.finetune_epochs, max_len=64),
                train=TrainConfig(batch_size=16, lr=1e-3 if mode == "frozen" else 3e-4, warmup_ratio=0.1,
                                  log_every=10, save_every=0, seed=args.seed),
            )
            _, metrics = finetune_text(CLASSIFY, cfg, init, work / "order_train.jsonl", work / "order_val.jsonl",
                                       work / f"order-{name}")
            results[name] = metrics["accuracy"]
        figures = {
            "bench": "text_core",
            "pretrain_steps": args.pretrain_steps,
            "mlm_loss_first": round(mlm_first, 3), "mlm_loss_last": round(mlm_last, 3),
            "mlm_loss_ratio": round(mlm_last / mlm_first, 3),
            "sop_acc_first": round(sop_first, 3), "sop_acc_last": round(sop_last, 3),
            "electra_gen_mlm_first": round(gen_first, 3), "electra_gen_mlm_last": round(gen_last, 3),
            "electra_disc_acc": round(disc_acc, 4), "electra_all_original_acc": round(baseline, 4),
            "order_task_train": len(train_rows), "order_task_val": len(val_rows),
            "finetune_acc_pretrained": round(results["pretrained"], 2),
            "finetune_acc_scratch": round(results["scratch"], 2),
            "finetune_acc_pretrained_frozen": round(results["pretrained_frozen"], 2),
            "mlm_learns": mlm_last < 0.6 * mlm_first,
            "electra_beats_all_original": disc_acc > baseline,
            "pretraining_helps": results["pretrained"] > results["scratch"],
            "seconds": round(time.perf_counter() - start, 1),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({**figures, **machine_info()}))


if __name__ == "__main__":
    main()
