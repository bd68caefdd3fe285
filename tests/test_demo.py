"""The shrunken demo runs every stage through the real commands and writes a report with finite figures."""

import json
import math
import os
import subprocess
import sys


def finite_numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from finite_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from finite_numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_demo_writes_a_report(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "vl", "demo", "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[16/16]" in done.stdout
    report = (out / "report.md").read_text()
    for heading in ("Detector", "VQA accuracy", "image-blind control", "retrieval", "Time per stage"):
        assert heading.lower() in report.lower()
    # the report says what was pretrained, as the run configs record it (quick: 4 steps)
    assert "`pretrain-uniter-small.yaml` (width 128, 3 layers, 4 steps" in report
    assert "`pretrain-lxmert-small.yaml` (width 128, 2 language + 2 object + 2 cross-modality layers, 4 steps" in report
    if (os.cpu_count() or 1) >= 2:  # the later stages shared the machine, and the report says so
        assert "the later stages ran 2 at a time" in report
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    for png in ("pretraining_loss.png", "vqa_accuracy.png", "data_efficiency.png", "examples.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    figures = json.loads((out / "figures.json").read_text())
    numbers = list(finite_numbers(figures))
    assert numbers and all(math.isfinite(n) for n in numbers)
    assert set(figures["vqa"]) == {"vqa-single", "vqa-dual", "vqa-scratch", "vqa-scratch-dual"}
    assert set(figures["vqa_image_blind"]) == set(figures["vqa"])  # every model also answered on other images
    # A second run finds every stage done and only rewrites the report.
    again = subprocess.run([sys.executable, "-m", "vl", "demo", "--quick", "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done earlier") == 16
