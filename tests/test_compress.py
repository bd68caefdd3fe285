"""``vl quantize``: a fine-tuned run's linear layers to int8, loaded by every inference command, and refused when
tampered with."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vl.checkpoints.io import load_state_file, save_weights
from vl.cli import main
from vl.compress.quantize import QUANTIZATION_FILE, quantized_layers
from vl.errors import UserError
from vl.tasks.runs import load_any_task_run
from vl.world.features import write_world_features

from support import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    store = write_world_features(world, root / "store")
    assert main(["finetune", "vqa", "--init", "scratch", "--config", str(CONFIGS / "finetune-vqa-tiny.yaml"),
                 "--train-questions", str(world.vqa_questions("train")),
                 "--train-annotations", str(world.vqa_annotations("train")),
                 "--features", str(store), "--out", str(root / "vqa"), "--set", "train.steps=30",
                 "--set", "train.batch_size=16"]) == 0
    assert main(["quantize", str(root / "vqa"), "--out", str(root / "vqa-int8")]) == 0
    return root, store


def test_a_quantized_vqa_run_answers_like_its_source(world, runs, tmp_path, capsys):
    root, store = runs
    info = json.loads((root / "vqa-int8" / QUANTIZATION_FILE).read_text())
    assert info["format"] == "vl-dynamic-int8" and info["task"] == "vqa"
    fp32, _, _ = load_any_task_run(root / "vqa")
    int8, _, _ = load_any_task_run(root / "vqa-int8")
    layers = quantized_layers(int8)
    assert layers == info["quantized_layers"] and len(layers) == sum(
        isinstance(module, torch.nn.Linear) for module in fp32.modules())
    state = load_state_file(root / "vqa-int8" / "model.safetensors")
    assert all(state[f"{name}.weight_int8"].dtype == torch.int8 for name in layers)
    assert not any(key.endswith(".weight") and key.rsplit(".", 1)[0] in layers for key in state)
    answers = {}
    for name in ("vqa", "vqa-int8"):
        out = tmp_path / f"{name}.json"
        assert main(["predict", "vqa", "--run", str(root / name), "--questions", str(world.vqa_questions("val")),
                     "--features", str(store), "--out", str(out)]) == 0
        answers[name] = [row["answer"] for row in json.loads(out.read_text())]
    agree = sum(a == b for a, b in zip(answers["vqa"], answers["vqa-int8"])) / len(answers["vqa"])
    assert agree >= 0.9, agree  # int8 rounding flips only near-ties
    capsys.readouterr()
    assert main(["evaluate", "vqa", "--annotations", str(world.vqa_annotations("val")),
                 "--results", str(tmp_path / "vqa-int8.json")]) == 0
    assert capsys.readouterr().out.startswith("overall: ")


def test_a_quantized_retrieval_run_evaluates(world, runs, tmp_path, capsys):
    root, store = runs
    assert main(["finetune", "retrieval", "--init", "scratch", "--config",
                 str(CONFIGS / "finetune-retrieval-tiny.yaml"), "--karpathy", str(world.karpathy),
                 "--features", str(store), "--out", str(tmp_path / "ret"), "--set", "train.steps=3",
                 "--set", "train.batch_size=8"]) == 0
    assert main(["quantize", str(tmp_path / "ret"), "--out", str(tmp_path / "ret-int8")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "retrieval", "--run", str(tmp_path / "ret-int8"), "--karpathy", str(world.karpathy),
                 "--split", "test", "--features", str(store), "--out", str(tmp_path / "rankings.json")]) == 0
    assert "text->image R@1 " in capsys.readouterr().out


def tampered(runs, tmp_path, name="bad"):
    root, _ = runs
    bad = tmp_path / name
    shutil.copytree(root / "vqa-int8", bad)
    return bad


def test_loading_refuses_a_tampered_int8_run(runs, tmp_path):
    bad = tampered(runs, tmp_path)
    info = json.loads((bad / QUANTIZATION_FILE).read_text())
    first = info["quantized_layers"][0]
    state = load_state_file(bad / "model.safetensors")
    state[f"{first}.weight_int8"] = state[f"{first}.weight_int8"].float()
    save_weights(state, bad / "model.safetensors")
    with pytest.raises(UserError, match=rf"'{first}.weight_int8' is float32 .*, expected int8"):
        load_any_task_run(bad)

    bad = tampered(runs, tmp_path, "bad2")
    state = load_state_file(bad / "model.safetensors")
    del state[f"{first}.weight_scales"]
    save_weights(state, bad / "model.safetensors")
    with pytest.raises(UserError, match=rf"lacks '{first}.weight_scales'"):
        load_any_task_run(bad)

    bad = tampered(runs, tmp_path, "bad3")
    (bad / QUANTIZATION_FILE).write_text(json.dumps({**info, "quantized_layers": ["fusion.nowhere"]}))
    with pytest.raises(UserError, match="'fusion.nowhere' is not a linear layer of the model"):
        load_any_task_run(bad)

    bad = tampered(runs, tmp_path, "bad4")
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors"):
        load_any_task_run(bad)


def test_quantize_errors_name_the_input(world, runs, tmp_path, capsys):
    root, store = runs
    for argv, message in (
        (["quantize", str(root / "vqa-int8"), "--out", str(tmp_path / "x")], "is already quantized"),
        (["quantize", str(root / "vqa"), "--out", str(root / "vqa")], "is the run itself"),
        (["quantize", str(store), "--out", str(tmp_path / "y")], "is not a fine-tuned vqa or retrieval run"),
        (["finetune", "vqa", "--init", str(root / "vqa-int8"), "--config", str(CONFIGS / "finetune-vqa-tiny.yaml"),
          "--train-questions", str(world.vqa_questions("train")),
          "--train-annotations", str(world.vqa_annotations("train")), "--features", str(store),
          "--out", str(tmp_path / "z")], "is an int8 run"),
    ):
        capsys.readouterr()
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
