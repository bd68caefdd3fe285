"""Draw a run's ``metrics.jsonl`` to a PNG: one small panel per logged metric, against the step."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from vl.errors import UserError

# Bookkeeping columns that are not curves worth a panel.
_SKIP = {"step", "elapsed_s", "samples_per_s"}


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl`` file; a malformed line is a UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number} is not a JSON line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{path}:{number} is not a metrics row with a 'step'")
        rows.append(row)
    return rows


def _panels(names: list[str]) -> list[tuple[str, list[str]]]:
    """One panel per metric, except validation metrics that differ only in their last part (``val_t2i_r1``,
    ``val_t2i_r5``, ...), which share a panel titled by the common prefix."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key = name.rsplit("_", 1)[0] if name.startswith("val_") and name.count("_") > 1 else name
        groups.setdefault(key, []).append(name)
    panels: list[tuple[str, list[str]]] = []
    for key, members in groups.items():
        panels += [(key, members)] if len(members) > 1 else [(members[0], members)]
    return panels


def plot_metrics(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``run_dir/loss.png`` (or ``out``) with the curve of every numeric metric in ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in _SKIP and key not in names and isinstance(value, (int, float)):
                names.append(key)
    if "loss" in names:  # the total first
        names.remove("loss")
        names.insert(0, "loss")
    if not names:
        raise UserError(f"{run_dir / 'metrics.jsonl'} holds no metrics to plot")
    panels = _panels(names)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.5 * nrows), squeeze=False)
    for index, (title, members) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for name in members:
            points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
            steps, values = zip(*points)
            label = name[len(title) + 1:] if len(members) > 1 else None
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
        if len(members) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for index in range(len(panels), nrows * cols):
        axes[index // cols][index % cols].axis("off")
    fig.suptitle(run_dir.name, fontsize=11)
    # Fixed margins (in inches, whatever the grid): tight_layout measures every tick label and takes seconds.
    height = 2.5 * nrows
    fig.subplots_adjust(left=0.1, right=0.97, top=1 - 0.75 / height, bottom=0.45 / height, hspace=0.75, wspace=0.35)
    out = Path(out) if out is not None else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
