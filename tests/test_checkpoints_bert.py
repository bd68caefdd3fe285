"""Hugging Face BERT checkpoints: parity with transformers, malformed files, export round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vl.checkpoints.hf_bert import (
    export_hf_bert,
    hf_key_to_ours,
    load_hf_bert,
    load_hf_bert_model,
    our_key_to_hf,
    text_config_from_hf,
)
from vl.checkpoints.io import detect_checkpoint_kind
from vl.text.bert import BertPretrainingModel
from vl.encoders.text import TextEncoder, TextEncoderConfig
from vl.errors import UserError

transformers = pytest.importorskip("transformers")

TINY_HF = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=64, type_vocab_size=2)
ATOL = 1e-5


def tiny_hf(model_cls=None, seed: int = 0, **overrides):
    """A randomly initialised tiny transformers BERT in eval mode, on the eager (reference) attention."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**{**TINY_HF, **overrides})
    model_cls = model_cls or transformers.BertForPreTraining
    model = model_cls._from_config(config, attn_implementation="eager")
    with torch.no_grad():  # non-zero biases and LayerNorms, so a mixed-up name cannot hide behind an init value
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def batch(seed: int = 1):
    """Three sequences of 9 tokens, two of them padded, with both segments present."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, TINY_HF["vocab_size"], (3, 9), generator=gen)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 3:] = 1
    token_type_ids[attention_mask == 0] = 0
    return input_ids, attention_mask, token_type_ids


def save_hf(model, directory: Path, fmt: str = "safetensors") -> Path:
    """``save_pretrained``; for "bin", the legacy ``pytorch_model.bin`` that transformers 4's
    ``save_pretrained(safe_serialization=False)`` wrote: ``torch.save`` of the state dict, tied weights shared."""
    if fmt == "safetensors":
        model.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
    else:
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def assert_parity(hf_model, ours: BertPretrainingModel):
    input_ids, attention_mask, token_type_ids = batch()
    with torch.no_grad():
        ref = hf_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                       output_hidden_states=True)
        ref_pooled = hf_model.bert(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids).pooler_output
        out = ours(input_ids, attention_mask, token_type_ids, return_all=True)
    torch.testing.assert_close(out.hidden, ref.hidden_states[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, ref_pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.mlm_logits, ref.prediction_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=ATOL, rtol=0)
    assert len(out.all_hidden) == len(ref.hidden_states) == TINY_HF["num_hidden_layers"] + 1
    for mine, theirs in zip(out.all_hidden, ref.hidden_states):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bert_for_pretraining_parity(tmp_path, fmt):
    hf_model = tiny_hf()
    save_hf(hf_model, tmp_path, fmt)
    assert detect_checkpoint_kind(tmp_path) == "hf-bert"
    ours, report = load_hf_bert_model(tmp_path)
    assert report.missing == () and report.unexpected == ()
    assert ours.mlm.decoder.weight is ours.text_encoder.embeddings.word_embeddings.weight
    assert_parity(hf_model, ours.eval())

    # Selected MLM rows are the full logits at those positions.
    input_ids, attention_mask, token_type_ids = batch()
    selected = torch.zeros_like(input_ids, dtype=torch.bool)
    selected[0, 2] = selected[1, 5] = selected[2, 1] = True
    with torch.no_grad():
        full = ours(input_ids, attention_mask, token_type_ids).mlm_logits
        rows = ours(input_ids, attention_mask, token_type_ids, mlm_positions_mask=selected).mlm_logits
    assert rows.shape == (3, TINY_HF["vocab_size"])
    torch.testing.assert_close(rows, full[selected])


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_activation_maps_to_the_same_function(tmp_path, hidden_act):
    hf_model = tiny_hf(hidden_act=hidden_act)
    checkpoint = load_hf_bert(save_hf(hf_model, tmp_path))
    assert checkpoint.cfg.activation == hidden_act
    ours, _ = load_hf_bert_model(tmp_path)
    assert_parity(hf_model, ours.eval())


def test_base_model_file_without_prefix_and_with_legacy_layernorm_names(tmp_path):
    hf_model = tiny_hf(transformers.BertModel)
    save_hf(hf_model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert not any(key.startswith("bert.") for key in tensors)  # BertModel files carry no prefix
    legacy = {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
              for key, value in tensors.items()}
    assert "embeddings.LayerNorm.gamma" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})

    checkpoint = load_hf_bert(tmp_path)
    assert checkpoint.heads == {"pooler"}
    ours, report = load_hf_bert_model(tmp_path)
    assert report.missing and all(key.startswith(("mlm.", "nsp.")) for key in report.missing)
    input_ids, attention_mask, token_type_ids = batch()
    with torch.no_grad():
        ref = hf_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        out = ours.eval()(input_ids, attention_mask, token_type_ids)
    torch.testing.assert_close(out.hidden, ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=ATOL, rtol=0)


def test_key_map_covers_every_parameter_both_ways():
    ours = BertPretrainingModel(TextEncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                                                  intermediate_size=37, max_position=64))
    hf_keys = set(tiny_hf().state_dict())
    for key in ours.state_dict():
        hf_key = our_key_to_hf(key)
        assert hf_key in hf_keys, key
        assert hf_key_to_ours(hf_key) == key
    assert hf_key_to_ours("cls.predictions.decoder.bias") == "mlm.decoder.bias"
    assert hf_key_to_ours("classifier.weight") is None


# ------------------------------------------------------------------------------------------ malformed checkpoints


def test_missing_tensor_is_named(tmp_path):
    save_hf(tiny_hf(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["bert.encoder.layer.1.attention.self.key.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    missing = r"missing tensor 'bert\.encoder\.layer\.1\.attention\.self\.key\.weight'"
    with pytest.raises(UserError, match=missing) as err:
        load_hf_bert_model(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(err.value)


def test_missing_tensor_is_named_as_the_file_names_it(tmp_path):
    save_hf(tiny_hf(transformers.BertModel), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layer.0.output.dense.bias"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing tensor 'encoder\.layer\.0\.output\.dense\.bias' \(model parameter "
                                        r"'text_encoder\.encoder\.layers\.0\.ffn\.fc_out\.bias'\)"):
        load_hf_bert_model(tmp_path)


def test_partly_present_head_is_an_error(tmp_path):
    save_hf(tiny_hf(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["cls.predictions.transform.LayerNorm.bias"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"cls\.predictions\.transform\.LayerNorm\.bias"):
        load_hf_bert_model(tmp_path)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    save_hf(tiny_hf(), tmp_path, "bin")
    tensors = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    tensors["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(36, 32)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight'.*\(36, 32\).*"
                                        r"\(37, 32\)") as err:
        load_hf_bert_model(tmp_path)
    assert str(tmp_path / "pytorch_model.bin") in str(err.value)


class _Payload:
    """Unpickling this object calls ``os.mkdir(marker)``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _a_function():
    return "pickled function"


@pytest.mark.parametrize("payload", ["object", "function"])
def test_pickle_that_is_not_weights_is_refused_without_running_code(tmp_path, payload):
    save_hf(tiny_hf(), tmp_path, "bin")
    marker = tmp_path / "code_ran"
    weights = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    weights["extra"] = _Payload(marker) if payload == "object" else _a_function
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin") as err:
        load_hf_bert_model(tmp_path)
    assert "pickled objects" in str(err.value)
    assert not marker.exists()
    if payload == "object":  # the payload is live: a plain unpickler would have run it
        torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
        assert marker.is_dir()


def test_pickle_of_a_non_dict_is_refused(tmp_path):
    tiny_hf().config.save_pretrained(tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin holds a list, not a dict"):
        load_hf_bert(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file_is_named(tmp_path, fmt):
    save_hf(tiny_hf(), tmp_path, fmt)
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"cannot read weights file {path}"):
        load_hf_bert(tmp_path)


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path} is not a checkpoint directory"):
        load_hf_bert(tmp_path)
    with pytest.raises(UserError, match="checkpoint directory not found"):
        load_hf_bert(tmp_path / "nope")
    tiny_hf().config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=f"checkpoint directory {tmp_path} has no weights file"):
        load_hf_bert(tmp_path)


def test_unsupported_config_and_unknown_tensors(tmp_path):
    with pytest.raises(UserError, match=r"my/config\.json: position_embedding_type 'relative_key'"):
        text_config_from_hf({"model_type": "bert", "position_embedding_type": "relative_key"}, "my/config.json")
    with pytest.raises(UserError, match="hidden_act 'quick_gelu'"):
        text_config_from_hf({"hidden_act": "quick_gelu"})
    with pytest.raises(UserError, match="'num_hidden_layers' must be an integer"):
        text_config_from_hf({"num_hidden_layers": "two"})
    with pytest.raises(UserError, match="not divisible"):
        text_config_from_hf({"hidden_size": 30, "num_attention_heads": 4})

    hf_model = tiny_hf(transformers.BertForSequenceClassification, num_labels=3)
    save_hf(hf_model, tmp_path)
    with pytest.raises(UserError, match=r"not part of BERT pretraining: 'classifier\.bias', 'classifier\.weight'"):
        load_hf_bert(tmp_path)
    checkpoint = load_hf_bert(tmp_path, ignore_unknown=True)
    assert checkpoint.heads == {"pooler"}
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(UserError, match="model_type 'roberta' is not supported"):
        load_hf_bert(tmp_path)


# ------------------------------------------------------------------------------------------------------ export


def test_export_round_trip_through_transformers(tmp_path):
    torch.manual_seed(3)
    cfg = TextEncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                            max_position=64, activation="gelu_new", layer_norm_eps=1e-7)
    ours = BertPretrainingModel(cfg).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    export_hf_bert(ours, cfg, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]

    hf_model, info = transformers.BertForPreTraining.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf_model.config.hidden_act == "gelu_new" and hf_model.config.layer_norm_eps == 1e-7
    assert_parity(hf_model.eval(), ours)

    reloaded, _ = load_hf_bert_model(tmp_path / "hf")
    assert reloaded.cfg == cfg
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, atol=0, rtol=0)


def test_export_text_encoder_as_bert_model(tmp_path):
    cfg = TextEncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                            max_position=64)
    encoder = TextEncoder(cfg).eval()
    export_hf_bert(encoder, cfg, tmp_path)
    hf_model, info = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager",
                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    input_ids, attention_mask, token_type_ids = batch()
    with torch.no_grad():
        ref = hf_model.eval()(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        out = encoder(input_ids, attention_mask, token_type_ids)
    torch.testing.assert_close(out.hidden, ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=ATOL, rtol=0)


def test_export_refuses_pre_ln(tmp_path):
    cfg = TextEncoderConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=37,
                            pre_ln=True)
    with pytest.raises(UserError, match="pre-LN"):
        export_hf_bert(BertPretrainingModel(cfg), cfg, tmp_path)
    assert not (tmp_path / "config.json").exists()
