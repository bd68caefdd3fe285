"""Initialising the text core from any checkpoint a user brings: a run directory of ours (text or
vision-language) or a Hugging Face BERT, LXMERT or VisualBERT.

Used by continued pretraining (``vl pretrain-text --init``, DAPT/TAPT) and fine-tuning (``vl finetune --init``).
Every kind comes back in ``BertPretrainingModel`` names (``text_encoder.*``, ``mlm.*``, ``nsp.*``) with the
encoder's ``TextEncoderConfig``; other tensors of a run (task heads, an ELECTRA generator) are left out.

A vision-language checkpoint gives its language part: the text embeddings, then a single-stream model's shared
layers (VisualBERT, UNITER: the whole transformer, which reads text alone as BERT does) or a dual-stream model's
language layers (LXMERT, ViLBERT: the cross-modality layers need regions and are left out), and its MLM head.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vl.checkpoints.io import VL_RUN_KIND, detect_checkpoint_kind, load_into, load_state_file
from vl.config import read_yaml
from vl.encoders.text import TextEncoderConfig
from vl.errors import UserError

BERT_PREFIXES = ("text_encoder.", "mlm.", "nsp.")


@dataclass(frozen=True)
class TextCheckpoint:
    """A text checkpoint: its kind ("hf-bert", "hf-lxmert", "hf-visualbert" or "vl-run"), directory, encoder
    config, tensors in our names,
    and the weights file they came from."""

    kind: str
    path: Path
    cfg: TextEncoderConfig
    state_dict: dict[str, torch.Tensor]
    weights_file: Path

    def tokenizer(self):
        """The checkpoint's WordPiece tokenizer (``vocab.txt`` + ``tokenizer_config.json`` in its directory)."""
        from vl.text.tokenizer import Tokenizer

        if not (self.path / "vocab.txt").is_file():
            raise UserError(f"checkpoint {self.path} has no vocab.txt, so its tokenizer is unknown; add the vocab.txt "
                            "it was trained with")
        tokenizer = Tokenizer.from_dir(self.path)
        if tokenizer.vocab_size > self.cfg.vocab_size:
            raise UserError(f"checkpoint {self.path}: vocab.txt has {tokenizer.vocab_size} tokens but the model "
                            f"embeds only {self.cfg.vocab_size}")
        return tokenizer


def load_text_checkpoint(path: str | os.PathLike) -> TextCheckpoint:
    """Read a text checkpoint directory (see the module docstring); anything else is a UserError naming it."""
    path = Path(path)
    kind = detect_checkpoint_kind(path)
    if kind == "hf-bert":
        from vl.checkpoints.hf_bert import load_hf_bert

        loaded = load_hf_bert(path, ignore_unknown=True)
        return TextCheckpoint(kind, path, loaded.cfg, dict(loaded.state_dict), Path(loaded.source))
    if kind in ("hf-lxmert", "hf-visualbert"):
        from vl.checkpoints.hf_vl import load_hf_vl

        loaded_vl = load_hf_vl(path, ignore_unknown=True)
        cfg, state_dict = language_part(loaded_vl.cfg, dict(loaded_vl.state_dict), path)
        return TextCheckpoint(kind, path, cfg, state_dict, Path(loaded_vl.source))
    if kind != VL_RUN_KIND:
        raise UserError(f"checkpoint {path} is a '{kind}' checkpoint; the text core starts from a BERT, LXMERT or "
                        "VisualBERT checkpoint or a run directory")
    from vl.checkpoints.vl_run import read_model_config

    cfg, _ = read_model_config(path)
    if not isinstance(cfg, TextEncoderConfig):
        weights_file = path / "model.safetensors"
        cfg, state_dict = language_part(cfg, load_state_file(weights_file), path)
        return TextCheckpoint(VL_RUN_KIND, path, cfg, state_dict, weights_file)
    config = read_yaml(path / "config.yaml")
    finetune = config.get("finetune")
    if isinstance(finetune, dict) and finetune.get("mode") == "adapters":
        base = config.get("init", "its base checkpoint")
        raise UserError(f"checkpoint {path} holds adapter weights only; initialise from {base} instead")
    weights_file = path / "model.safetensors"
    tensors = load_state_file(weights_file)
    state_dict = {key: value for key, value in tensors.items() if key.startswith(BERT_PREFIXES)}
    if not any(key.startswith("text_encoder.") for key in state_dict):
        raise UserError(f"checkpoint {weights_file} holds no text_encoder.* tensors")
    return TextCheckpoint(VL_RUN_KIND, path, cfg, state_dict, weights_file)


def language_part(cfg, tensors: dict[str, torch.Tensor], source: Path
                  ) -> tuple[TextEncoderConfig, dict[str, torch.Tensor]]:
    """A vision-language model's language part in ``BertPretrainingModel`` names (see the module docstring):
    ``cfg`` its ``FusionConfig``, ``tensors`` its state dict in ``VLPretrainingModel`` names."""
    if cfg.fusion == "single_stream":
        layers = "fusion.encoder."
    else:
        if cfg.text.pre_ln:  # its one final LayerNorm follows the cross-modality layers, which are left out
            raise UserError(f"checkpoint {source}: a pre-LN dual-stream model's language layers have no final norm "
                            "of their own; start the text core from a post-LN model")
        layers = "fusion.text_layers."
    renames = (("fusion.text_embeddings.", "text_encoder.embeddings."),
               (layers, "text_encoder.encoder." if cfg.fusion == "single_stream" else "text_encoder.encoder.layers."),
               ("heads.mlm.", "mlm."))
    state = {}
    for key, value in tensors.items():
        for old, new in renames:
            if key.startswith(old):
                state[new + key[len(old):]] = value
    if cfg.fusion == "single_stream":
        state.update({"text_encoder.pooler." + key[len("fusion.pooler."):]: value for key, value in tensors.items()
                      if key.startswith("fusion.pooler.")})
    if not any(key.startswith("text_encoder.encoder.") for key in state):
        raise UserError(f"checkpoint {source} holds no language layers ({layers}*)")
    return cfg.text, state


def init_from_checkpoint(model: nn.Module, checkpoint: TextCheckpoint, prefixes: tuple[str, ...] = BERT_PREFIXES
                         ) -> list[str]:
    """Copy the checkpoint's tensors under ``prefixes`` into ``model`` (whose names follow BertPretrainingModel).

    Every ``text_encoder.*`` tensor but the pooler must be present; heads the checkpoint lacks keep their initial
    values and are returned (as model keys) so the caller can say so.
    """
    state = {key: value for key, value in checkpoint.state_dict.items() if key.startswith(prefixes)}
    report = load_into(model, state, checkpoint.weights_file, strict=False)
    required_missing = [key for key in report.missing
                        if key.startswith("text_encoder.") and not key.startswith("text_encoder.pooler.")]
    if required_missing:
        raise UserError(f"checkpoint {checkpoint.weights_file} is missing encoder tensor '{required_missing[0]}'")
    wanted = [key for key in report.unexpected if key.startswith("text_encoder.")]
    if wanted:
        raise UserError(f"checkpoint {checkpoint.weights_file} has encoder tensor '{wanted[0]}' that the model lacks")
    return [key for key in report.missing if key.startswith(prefixes)]


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file, to record which base checkpoint a run was built on."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
