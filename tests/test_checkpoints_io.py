"""Safe weight I/O: atomic safetensors writes, tied tensors, checked loads, checkpoint-directory detection."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from vl.checkpoints.io import (
    HF_MODEL_TYPES,
    detect_checkpoint_kind,
    load_hf_weights,
    load_into,
    load_state_file,
    save_weights,
)
from vl.config import atomic_write_text
from vl.errors import UserError


class Tied(nn.Module):
    """An embedding and an output projection that share one weight, plus a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(3))


def test_save_weights_stores_tied_tensor_once_and_restores_every_name(tmp_path):
    model = Tied()
    path = save_weights(model.state_dict(), tmp_path / "sub" / "model.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["embed.weight", "head.bias", "scale"]
        assert handle.metadata()["format"] == "pt"
    loaded = load_state_file(path)
    assert sorted(loaded) == sorted(model.state_dict())
    torch.testing.assert_close(loaded["head.weight"], model.embed.weight.detach())

    fresh = Tied()
    report = load_into(fresh, loaded, path)
    assert report.missing == () and report.unexpected == ()
    torch.testing.assert_close(fresh.head.weight, model.head.weight)
    assert fresh.head.weight is fresh.embed.weight


def test_save_weights_clones_overlapping_views(tmp_path):
    base = torch.arange(12.0)
    path = save_weights({"whole": base, "half": base[:6], "strided": base.view(3, 4).t()}, tmp_path / "w.safetensors")
    loaded = load_state_file(path)
    torch.testing.assert_close(loaded["half"], base[:6])
    torch.testing.assert_close(loaded["strided"], base.view(3, 4).t())


def test_load_into_accepts_one_name_of_a_tied_pair_and_rejects_differing_copies():
    source = Tied()
    only_embedding = {k: v for k, v in source.state_dict().items() if k != "head.weight"}
    target = Tied()
    load_into(target, only_embedding, "ckpt.safetensors")
    torch.testing.assert_close(target.head.weight, source.embed.weight)

    differing = {**source.state_dict(), "head.weight": torch.zeros(10, 4)}
    with pytest.raises(UserError, match="'embed.weight' and 'head.weight' are tied in the model but differ"):
        load_into(Tied(), differing, "ckpt.safetensors")


def test_load_into_errors_name_tensor_shapes_and_file():
    weights = Tied().state_dict()
    with pytest.raises(UserError, match=r"ckpt\.bin is missing tensor 'head\.bias'"):
        load_into(Tied(), {k: v for k, v in weights.items() if k != "head.bias"}, "ckpt.bin")
    with pytest.raises(UserError, match=r"ckpt\.bin: tensor 'scale' has shape \(4,\) but the model expects \(3,\)"):
        load_into(Tied(), {**weights, "scale": torch.ones(4)}, "ckpt.bin")
    with pytest.raises(UserError, match=r"ckpt\.bin has tensors the model does not have: 'extra'"):
        load_into(Tied(), {**weights, "extra": torch.ones(1)}, "ckpt.bin")

    report = load_into(Tied(), {**weights, "extra": torch.ones(1)}, "ckpt.bin", allow_unexpected=("ext",))
    assert report.unexpected == ("extra",)
    report = load_into(Tied(), {k: v for k, v in weights.items() if k != "head.bias"}, "ckpt.bin",
                       allow_missing=("head.",))
    assert report.missing == ("head.bias",)
    report = load_into(Tied(), {"scale": torch.ones(3)}, "ckpt.bin", strict=False)
    assert set(report.missing) == {"embed.weight", "head.weight", "head.bias"}


def test_load_state_file_rejects_unknown_suffix_non_tensors_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        load_state_file(tmp_path / "absent.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match=r"w\.npz: unknown type '\.npz'"):
        load_state_file(tmp_path / "w.npz")
    torch.save({"weight": torch.zeros(2), "step": 3}, tmp_path / "state.pt")
    with pytest.raises(UserError, match=r"state\.pt: entry 'step' is a int, not a tensor"):
        load_state_file(tmp_path / "state.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(UserError, match=r"cannot read weights file .*garbage\.safetensors"):
        load_state_file(tmp_path / "garbage.safetensors")


def test_detect_checkpoint_kind(tmp_path):
    hf_dir, run_dir = tmp_path / "hf", tmp_path / "run"
    atomic_write_text(hf_dir / "config.json", '{"model_type": "bert"}')
    assert detect_checkpoint_kind(hf_dir) == HF_MODEL_TYPES["bert"] == "hf-bert"
    atomic_write_text(run_dir / "config.yaml", "model: {}\n")
    save_weights({"w": torch.zeros(1)}, run_dir / "model.safetensors")
    assert detect_checkpoint_kind(run_dir) == "vl-run"
    atomic_write_text(hf_dir / "config.json", '{"model_type": "gpt2"}')
    with pytest.raises(UserError, match=r"config\.json: model_type 'gpt2' is not supported"):
        detect_checkpoint_kind(hf_dir)
    atomic_write_text(hf_dir / "config.json", "{not json")
    with pytest.raises(UserError, match=r"config\.json is not valid JSON"):
        detect_checkpoint_kind(hf_dir)
    with pytest.raises(UserError, match="is not a directory"):
        detect_checkpoint_kind(run_dir / "config.yaml")


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    save_weights({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_weights({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    atomic_write_text(tmp_path / "model.safetensors.index.json",
                      '{"weight_map": {"a": "model-00001-of-00002.safetensors", '
                      '"b": "model-00002-of-00002.safetensors"}}')
    tensors, source = load_hf_weights(tmp_path)
    assert sorted(tensors) == ["a", "b"] and source.name == "model.safetensors.index.json"
    atomic_write_text(tmp_path / "model.safetensors.index.json", '{"weight_map": {"a": "../elsewhere.bin"}}')
    with pytest.raises(UserError, match="is not a file name in"):
        load_hf_weights(tmp_path)
