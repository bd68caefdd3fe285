"""The demo's report: a table of held-out figures, PNG plots, and ``report.md`` / ``report.html``.

Every figure is computed here from the files the demo's commands wrote for the test split (which no stage trained
on): detector mAP from ``vl-regions detect``'s COCO results (scored with pycocotools), VQA accuracy from
``vl predict vqa``'s results JSON (scored with the official metric in ``vl.tasks.vqa.metric``), retrieval recall from
``vl evaluate retrieval``'s RANKINGS.json against the Karpathy split's ground truth.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vl.config import atomic_write_text

if TYPE_CHECKING:
    from vl.demo.pipeline import Demo

NOT_LOSSES = {"step", "lr", "grad_norm", "samples_per_s", "elapsed_s", "nonfinite_skipped", "loss"}
VQA_RUNS = {"vqa-single": "pretrained single-stream (UNITER)", "vqa-scratch": "from scratch (UNITER)",
            "vqa-dual": "pretrained dual-stream (LXMERT)", "vqa-scratch-dual": "from scratch (LXMERT)"}
# What the world's questions ask (vqa/question_families_*.json), grouped as the report shows them
FAMILY_GROUPS = {"color": "colour", "shape": "shape", "size": "size", "size_yes_no": "size", "count": "counting",
                 "exist": "existence", "spatial_yes_no": "spatial relation", "spatial_choice": "spatial relation"}


def detector_map(instances: Path, detections: Path) -> dict[str, float]:
    """COCO mAP and mAP@0.5 of a results file, with pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(instances))
        results = json.loads(detections.read_text())
        if not results:
            return {"mAP": 0.0, "mAP@0.5": 0.0}
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"mAP": float(evaluation.stats[0]), "mAP@0.5": float(evaluation.stats[1])}


def vqa_scores(annotations: list[Any], results: Path, groups: dict[int, str] | None = None) -> dict[str, Any]:
    """Official VQA accuracy of a results file against read annotations (``read_vqa_annotations``), per question
    group too when ``groups`` is given."""
    from vl.data.formats import read_vqa_results
    from vl.tasks.vqa.metric import evaluate_vqa

    return evaluate_vqa(annotations, read_vqa_results(results), groups)


def question_groups(path: Path) -> dict[int, str] | None:
    """Question id -> the report's group (``FAMILY_GROUPS``) from a world's question families file, if any."""
    if not path.is_file():
        return None
    families = json.loads(path.read_text())["families"]
    return {int(question_id): FAMILY_GROUPS.get(family, family) for question_id, family in families.items()}


def retrieval_recall(karpathy: Path, rankings: Path, split: str = "test") -> dict[str, float]:
    """R@1/5/10 in both directions from a RANKINGS.json, against the Karpathy split's captions."""
    from vl.data.formats import read_karpathy

    images = read_karpathy(karpathy, split)
    image_of_sentence: dict[int, Any] = {}
    sentences_of_image: dict[Any, set[int]] = {}
    for image in images:
        image_id = image.image_id
        for sentence in image.sentences:
            image_of_sentence[sentence.sentid] = image_id
            sentences_of_image.setdefault(image_id, set()).add(sentence.sentid)
    data = json.loads(rankings.read_text())
    recall: dict[str, float] = {}
    for k in (1, 5, 10):
        hits = [image_of_sentence[row["sentid"]] in row["ranked_image_ids"][:k] for row in data["text_to_image"]]
        recall[f"text→image R@{k}"] = 100.0 * sum(hits) / max(len(hits), 1)
    for k in (1, 5, 10):
        hits = [bool(sentences_of_image[row["image_id"]] & set(row["ranked_sentids"][:k])) for row in
                data["image_to_text"]]
        recall[f"image→text R@{k}"] = 100.0 * sum(hits) / max(len(hits), 1)
    recall["chance text→image R@1"] = 100.0 / max(len(images), 1)
    return recall


def example_answers(log: Path) -> list[str]:
    """The first answer line printed by each ``vl vqa`` call in the examples log."""
    answers, current = [], None
    for line in log.read_text().splitlines():
        if line.startswith("$ "):
            if current is not None:
                answers.append(current)
            current = ""
        elif current == "" and line.strip():
            current = line.strip()
    if current is not None:
        answers.append(current)
    return answers


def plot_pretraining(runs: dict[str, Path], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for label, run in runs.items():
        path = run / "metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for key, value in row.items():
                if key in NOT_LOSSES or "acc" in key or not isinstance(value, (int, float)) or "step" not in row:
                    continue
                series.setdefault(key, {}).setdefault(label, []).append((row["step"], value))
    if not series:
        return None
    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for index, name in enumerate(names):
        ax = axes[index // cols][index % cols]
        for label, points in series[name].items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for index in range(len(names), rows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.suptitle("pretraining losses per objective")
    fig.tight_layout()
    atomic_savefig(fig, out, dpi=90)
    plt.close(fig)
    return out


def plot_vqa(scores: dict[str, dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["overall", "yes/no", "number", "other"]
    fig, ax = plt.subplots(figsize=(7, 3.9))
    width = 0.8 / max(len(scores), 1)
    for index, (name, score) in enumerate(scores.items()):
        values = [score["overall"]] + [score["per_answer_type"].get(g, 0.0) for g in groups[1:]]
        positions = [g + (index - (len(scores) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(positions, values, width, label=VQA_RUNS.get(name, name))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)  # not over bars
    ax.set_title("VQA accuracy on the held-out test split")
    fig.tight_layout()
    atomic_savefig(fig, out, dpi=90)
    plt.close(fig)
    return out


def plot_data_efficiency(efficiency: dict[str, dict[float, float]], out: Path) -> Path:
    """VQA accuracy against the share of training questions fine-tuned on (log scale), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in efficiency.items():
        fractions = sorted(points)
        pretrained = not name.startswith("vqa-scratch")
        ax.plot([100 * f for f in fractions], [points[f] for f in fractions], marker="o",
                linestyle="-" if pretrained else "--", label=VQA_RUNS.get(name, name))
    ax.set_xscale("log")
    shares = sorted({f for points in efficiency.values() for f in points})
    ax.set_xticks([100 * f for f in shares], [f"{100 * f:g}%" for f in shares])
    ax.set_xlabel("share of the VQA training questions fine-tuned on")
    ax.set_ylabel("VQA accuracy (%), test split")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("What pretraining buys: accuracy against fine-tuning data")
    fig.tight_layout()
    atomic_savefig(fig, out, dpi=90)
    plt.close(fig)
    return out


def atomic_savefig(fig: Any, out: Path, **options: Any) -> None:
    """``fig.savefig`` through a temporary name and a rename, as every other output is written."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", **options)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def one_box_per_object(detections: list[dict[str, Any]], min_score: float = 0.5, iou: float = 0.5
                       ) -> list[dict[str, Any]]:
    """COCO detections of one image as a reader wants to see them: score >= ``min_score``, and of boxes that
    overlap by more than ``iou`` (one object, several class hypotheses, which the mAP protocol keeps) the best."""
    import torch
    from torchvision.ops import nms

    kept = [d for d in detections if d["score"] >= min_score]
    if not kept:
        return []
    boxes = torch.tensor([d["bbox"] for d in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> corners
    order = nms(boxes, torch.tensor([d["score"] for d in kept], dtype=torch.float32), iou)
    return [kept[i] for i in order.tolist()]


def plot_examples(demo: Demo, examples: list[dict[str, Any]], answers: list[str], out: Path) -> Path:
    """A grid of held-out images with the detector's boxes and the question/answer pairs from ``vl vqa``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt
    from PIL import Image

    detections = json.loads((demo.out / "detections_test.json").read_text())
    categories = {c["id"]: c["name"] for c in json.loads(
        (demo.world / "annotations" / "instances_test2014.json").read_text())["categories"]}
    cols = min(3, max(len(examples), 1))
    rows = math.ceil(len(examples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 4.0 * rows), squeeze=False)
    for index, example in enumerate(examples):
        ax = axes[index // cols][index % cols]
        ax.imshow(Image.open(example["image"]).convert("RGB"))
        for det in one_box_per_object([d for d in detections if d["image_id"] == example["image_id"]]):
            x, y, w, h = det["bbox"]
            ax.add_patch(patches.Rectangle((x, y), w, h, fill=False, color="white", linewidth=1))
            ax.text(x, y - 1, f"{categories.get(det['category_id'], '?')} {det['score']:.2f}", color="white",
                    fontsize=6, backgroundcolor="black")
        answer, _, score = (answers[index] if index < len(answers) else "(no answer)").rpartition(" ")
        ax.set_title(f"Q: {example['question']}\nA: {answer.strip()} ({score})", fontsize=7)
        ax.axis("off")
    for index in range(len(examples), rows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.tight_layout()
    atomic_savefig(fig, out, dpi=100)
    plt.close(fig)
    return out


def _with_blind(score: dict[str, Any], blind: dict[str, Any] | None, kind: str | None = None,
                breakdown: str = "per_question_type") -> str:
    """``"48.1 (40.2)"``: accuracy on the real images, and in brackets on other images' regions (overall, or of
    question ``kind`` of ``score[breakdown]``)."""
    def pick(metrics: dict[str, Any]) -> float:
        return metrics["overall"] if kind is None else metrics.get(breakdown, {}).get(kind, float("nan"))
    return f"{pick(score):.1f}" + (f" ({pick(blind):.1f})" if blind else "")


def pretraining_recipe(demo: Demo) -> str:
    """What each pretrained model is: its config, width and layers, steps and batch, from the run's config.yaml."""
    from vl.config import read_yaml

    parts = []
    for name, label, config in (("pretrain-single", "single-stream", demo.cfg.single_stream_config),
                                ("pretrain-dual", "dual-stream", demo.cfg.dual_stream_config)):
        saved = read_yaml(demo.run_dir(name) / "config.yaml")
        train, model = saved.get("train", {}), saved.get("model", {})
        text = model.get("text", {})
        layers = f"{text.get('num_layers', '?')} layers"
        vision, cross = model.get("vision") or {}, model.get("cross") or {}
        if vision and cross:  # dual-stream
            coattention = cross.get("coattn_layers") or []  # ViLBERT: one block per listed pair
            exchanges = cross.get("num_layers") if cross.get("kind") == "lxmert" else len(coattention)
            layers = (f"{text.get('num_layers', '?')} language + {vision.get('num_layers', '?')} object + "
                      f"{exchanges} cross-modality layers")
        parts.append(f"{label} `{config}` (width {text.get('hidden_size', '?')}, {layers}, "
                     f"{train.get('steps', '?')} steps of {train.get('batch_size', '?')} captions)")
    return "Pretraining: " + "; ".join(parts) + "."


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def stage_sharing(demo: Demo) -> str:
    """How the stages shared the machine, which the stage times depend on."""
    slots = demo.slots()
    if slots == 1:
        return "The stages ran one after another."
    threads = demo.threads_per_stage()
    alone = ", ".join(stage.name for stage in demo.stages() if stage.alone)
    return (f"Stages {alone} ran one after another with the whole machine; the later stages ran {slots} at a "
            f"time, each on {threads} thread{'s' if threads > 1 else ''}, so their times overlap and add up to more "
            "than the total.")


def write_report(demo: Demo, total_seconds: float) -> Path:
    from vl.data.formats import read_vqa_annotations
    from vl.world.dataset import WorldPaths
    from vl.demo.config import fraction_stage

    out = demo.out
    cfg = demo.cfg
    figures: dict[str, Any] = {}
    figures["detector"] = detector_map(demo.world / "annotations" / "instances_test2014.json",
                                       out / "detections_test.json")
    for key, path in (("detector_test", out / "detector_test.json"), ("detector_val", demo.detector / "metrics.json")):
        if path.is_file():
            figures[key] = json.loads(path.read_text())
    annotations = read_vqa_annotations(demo.annotations("test"))  # read once: every score and the examples' truth
    groups = question_groups(WorldPaths(demo.world).question_families("test"))
    figures["vqa"] = {name: vqa_scores(annotations, out / f"{name}_test_results.json", groups) for name in VQA_RUNS}
    figures["vqa_image_blind"] = {name: vqa_scores(annotations, out / f"{name}_test_blind_results.json", groups)
                                  for name in VQA_RUNS if (out / f"{name}_test_blind_results.json").is_file()}
    efficiency: dict[str, dict[float, float]] = {}
    for name in VQA_RUNS:
        points = {1.0: figures["vqa"][name]["overall"]}
        for fraction in cfg.data_fractions:
            results = out / f"{fraction_stage(name, fraction)}_test_results.json"
            if results.is_file():
                points[fraction] = vqa_scores(annotations, results)["overall"]
        efficiency[name] = points
    figures["data_efficiency"] = {name: {f"{100 * f:g}%": value for f, value in sorted(points.items())}
                                  for name, points in efficiency.items()}
    figures["retrieval"] = retrieval_recall(demo.world / "dataset_coco.json", out / "retrieval_rankings_test.json")
    examples = demo.example_questions()
    answers = example_answers(demo.logs / "examples.log")

    plots = {
        "pretraining": plot_pretraining({"single-stream (UNITER)": demo.run_dir("pretrain-single"),
                                         "dual-stream (LXMERT)": demo.run_dir("pretrain-dual")},
                                        out / "pretraining_loss.png"),
        "vqa": plot_vqa(figures["vqa"], out / "vqa_accuracy.png"),
        "data efficiency": plot_data_efficiency(efficiency, out / "data_efficiency.png"),
        "examples": plot_examples(demo, examples, answers, out / "examples.png"),
    }
    atomic_write_text(out / "figures.json", json.dumps(figures, indent=1))

    det = figures["detector"]
    summary_rows = [["detector mAP@0.5 (test)", f"{det['mAP@0.5']:.3f}"], ["detector mAP@[.5:.95] (test)",
                                                                           f"{det['mAP']:.3f}"]]
    for key, split in (("detector_test", "test"), ("detector_val", "val")):
        metrics = figures.get(key, {})
        if isinstance(metrics.get("attr_accuracy"), (int, float)):
            summary_rows.append([f"detector attribute accuracy ({split}; chance {metrics.get('attr_chance', 0.0):.2f})",
                                 f"{metrics['attr_accuracy']:.3f}"])
    vqa_rows = []
    for name, label in VQA_RUNS.items():
        score = figures["vqa"][name]
        per_type = score["per_answer_type"]
        vqa_rows.append([label, f"{score['overall']:.2f}"] + [f"{per_type.get(t, float('nan')):.2f}"
                                                              for t in ("yes/no", "number", "other")])
    blind = figures["vqa_image_blind"]
    by_group = "per_group" if groups else "per_question_type"
    kinds = list(dict.fromkeys(FAMILY_GROUPS.values())) if groups else \
        sorted({t for score in figures["vqa"].values() for t in score["per_question_type"]})
    type_rows = [[kind] + [_with_blind(figures["vqa"][name], blind.get(name), kind, by_group) for name in VQA_RUNS]
                 for kind in kinds]
    type_rows.append(["overall"] + [_with_blind(figures["vqa"][name], blind.get(name)) for name in VQA_RUNS])
    shares = sorted({f for points in efficiency.values() for f in points})
    efficiency_rows = [[VQA_RUNS[name]] + [f"{points[f]:.1f}" if f in points else "-" for f in shares]
                       for name, points in efficiency.items()]
    recall = figures["retrieval"]
    retrieval_rows = [[direction] + [f"{recall[f'{direction} R@{k}']:.1f}" for k in (1, 5, 10)]
                      for direction in ("text→image", "image→text")]
    timing_rows = [[name, f"{seconds:.0f}"] for name, seconds in demo.timings.items()]
    truth = {a.question_id: a.multiple_choice_answer for a in annotations}
    qa_rows = []
    for i, e in enumerate(examples):
        answer, _, score = (answers[i] if i < len(answers) else "").rpartition(" ")
        qa_rows.append([str(e["image_id"]), e["question"], answer.strip() or "(none)", score,
                        truth.get(e["question_id"], "?")])
    fraction_budget = ", ".join(f"{steps} on {fraction:.0%}" for fraction, steps in
                                zip(cfg.data_fractions, cfg.fraction_steps))

    sections = [
        "# vl demo report",
        f"Seed {cfg.seed}; world of {cfg.train_images} train / {cfg.val_images} val / {cfg.test_images} test images "
        f"at {cfg.size} px, {cfg.questions_per_image} questions each; {cfg.num_boxes} regions per image. Machine: "
        f"{demo.machine()}. Total time {total_seconds / 60:.1f} min. Every figure below is measured on the test "
        "split, which no stage trained on.",
        "## Detector\n\n" + _table(["metric", "value"], summary_rows),
        "## VQA accuracy (%), test split, official metric\n\n" + _table(
            ["model", "overall", "yes/no", "number", "other"], vqa_rows),
        f"Same fine-tuning budget for all four ({cfg.vqa_steps} steps); each pretrained model is compared with its "
        "own architecture trained from scratch. " + pretraining_recipe(demo),
        "### By what the question asks, with the image-blind control\n\nEach cell: accuracy on the real images (on "
        "other images' regions, `vl predict vqa --shuffle-images`). Where the two are close, the model answers from "
        "the question alone.\n\n" + _table(["question" if groups else "question type", *VQA_RUNS.values()],
                                          type_rows),
        "### Data efficiency: fine-tuned on a share of the training questions\n\n"
        + _table(["model", *[f"{100 * f:g}%" for f in shares]], efficiency_rows)
        + f"\n\nThe same questions and budget for every model at each share ({fraction_budget} steps; all of them: "
        f"{cfg.vqa_steps}).",
        "## Image-text retrieval (%), test split\n\n" + _table(["direction", "R@1", "R@5", "R@10"], retrieval_rows)
        + f"\n\nChance R@1 (text→image): {recall['chance text→image R@1']:.1f}%.",
        "## Plots\n\n" + "\n\n".join(f"![{name}]({path.name})" for name, path in plots.items() if path),
        "## Questions on held-out images (`vl vqa`)\n\n" + _table(
            ["image", "question", "top answer", "score", "annotators' answer"], qa_rows),
        "## Time per stage (s)\n\n" + _table(["stage", "seconds"], timing_rows) + "\n\n" + stage_sharing(demo),
    ]
    markdown = "\n\n".join(sections) + "\n"
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", _markdown_to_html(markdown))
    return out / "report.md"


def _markdown_to_html(markdown: str) -> str:
    """Just enough Markdown for the report: headings, tables, images and paragraphs."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if not table:
            return
        head, *rows = table
        body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(re.fullmatch(r"-+", c) for c in cells):
                table.append(cells)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif match := re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip()):
            body.append(f'<p><img src="{html.escape(match.group(2))}" alt="{html.escape(match.group(1))}"></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>vl demo report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"
