"""Crash safety: outputs are flushed before their rename, a replaced directory is never missing, and a training run
killed with SIGKILL at random moments (checkpoint writes included) resumes from its last complete checkpoint with
per-step losses that continue exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vl import atomic
from vl.atomic import atomic_directory, restore_aside

ROOT = Path(__file__).resolve().parents[1]


def test_directory_replacement_flushes_and_never_leaves_a_gap(tmp_path, monkeypatch):
    target = tmp_path / "step-3"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
    synced: list[str] = []
    real_fsync = atomic.fsync_path
    monkeypatch.setattr(atomic, "fsync_path", lambda p: (synced.append(str(p)), real_fsync(p)))
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src, dst):
        assert Path(target).exists() or Path(dst) == target  # the name is gone only until the new one lands
        renames.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert any(name.endswith("weights") for name in synced) and str(tmp_path) in synced  # file, then the parent
    assert renames[0][0] == "step-3" and renames[0][1].startswith(".step-3.replaced-")  # old one aside first
    assert [p.name for p in tmp_path.iterdir()] == ["step-3"]  # nothing left beside it


def test_a_crash_between_the_renames_keeps_the_old_directory(tmp_path):
    target = tmp_path / "step-3"
    aside = tmp_path / ".step-3.replaced-abc"
    aside.mkdir()
    (aside / "weights").write_text("old")  # what a crash after the first rename leaves
    restore_aside(target)
    assert (target / "weights").read_text() == "old" and not aside.exists()
    stale = tmp_path / ".step-3.replaced-def"
    stale.mkdir()
    restore_aside(target)  # the target exists: a leftover aside copy is only removed
    assert not stale.exists() and (target / "weights").read_text() == "old"


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train_loop import Regression, ToyData
from vl.train.loop import TrainConfig, seed_everything, train
seed_everything(0)
cfg = TrainConfig(steps={steps}, lr=1e-2, warmup_steps=2, log_every=1, save_every=1, keep_last=2, seed=0)
train(Regression(), ToyData(), cfg, {run!r}, loss_weights={{"mse": 1.0}}, plot=False)
"""


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def _rows(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _launch(script: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_at_random_moments_then_relaunch_continues_exactly(tmp_path):
    steps = 40
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        (tmp_path / f"{run.name}.py").write_text(SCRIPT.format(tests=str(ROOT / "tests"), steps=steps, run=str(run)))
    reference = _launch(tmp_path / "straight.py")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    rng = random.Random(0)
    kills = 0
    for _ in range(60):  # relaunch until the run completes
        target = _rows(killed) + rng.randint(1, 6)
        process = _launch(tmp_path / "killed.py")
        deadline = time.monotonic() + 120
        # kill once this launch has logged a few steps (however fast the machine), a random moment later: with a
        # checkpoint at every step, often during its write
        while process.poll() is None and _rows(killed) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        if process.poll() is not None:
            assert process.returncode == 0, process.stderr.read()[-2000:]
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        kills += 1
    else:
        pytest.fail("the killed run never completed")
    assert kills >= 3
    assert _losses(killed) == _losses(straight)  # every step once, with the uninterrupted run's loss


def test_a_plot_that_fails_while_written_leaves_the_old_one(tmp_path):
    """The demo's plots go through a temporary name: a write that dies halfway leaves the previous plot whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vl.demo.report import atomic_savefig

    out = tmp_path / "plot.png"
    fig = plt.figure()
    fig.gca().plot([0, 1])
    atomic_savefig(fig, out)
    plt.close(fig)
    old = out.read_bytes()
    assert old.startswith(b"\x89PNG")

    class DiesHalfway:
        def savefig(self, path, **options):
            Path(path).write_bytes(old[: len(old) // 2])
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_savefig(DiesHalfway(), out)
    assert out.read_bytes() == old and sorted(tmp_path.iterdir()) == [out]
