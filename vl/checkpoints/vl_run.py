"""Model weights in a run directory of this project, and loading any checkpoint a user may bring.

A run directory holds ``config.yaml`` and ``model.safetensors``:

- vision-language: ``config.yaml`` has a ``model:`` section (``FusionConfig``, with ``fusion:``) and usually a
  ``heads:`` section (``HeadsConfig``); ``model.safetensors`` holds ``VLPretrainingModel.state_dict()``
  (``fusion.*``, ``heads.*``). Without ``heads:``, the heads are read off the weights.
- text-only BERT: ``model:`` is a ``TextEncoderConfig`` (no ``fusion:`` key); ``model.safetensors`` holds
  ``BertPretrainingModel.state_dict()`` (``text_encoder.*``, ``mlm.*``, ``nsp.*``).

Other sections of ``config.yaml`` (training, data) are ignored here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vl.checkpoints.io import VL_RUN_KIND, detect_checkpoint_kind, load_into, load_state_file, save_weights
from vl.config import ConfigError, atomic_write_text, from_dict, read_yaml, to_dict
from vl.text.bert import BertPretrainingModel
from vl.encoders.text import TextEncoderConfig
from vl.errors import UserError
from vl.fusion.base import FusionConfig, fusion_config_from_dict
from vl.fusion.pretraining import HeadsConfig, VLPretrainingModel, build_pretraining_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def save_vl_run(model: VLPretrainingModel | BertPretrainingModel, run_dir: str | os.PathLike) -> Path:
    """Write ``model``'s weights and config into ``run_dir`` (weights first, then config.yaml; both atomic)."""
    import yaml

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is not a directory")
    if isinstance(model, VLPretrainingModel):
        config = {"model": to_dict(model.cfg), "heads": to_dict(model.heads.cfg)}
    elif isinstance(model, BertPretrainingModel):
        config = {"model": to_dict(model.cfg)}
    else:
        raise TypeError(f"save_vl_run takes a VLPretrainingModel or BertPretrainingModel, not {type(model).__name__}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), run_dir / WEIGHTS_FILE)
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    return run_dir


def heads_from_weights(state_dict: dict[str, torch.Tensor]) -> HeadsConfig:
    """The ``HeadsConfig`` whose heads a ``VLPretrainingModel`` state dict holds."""
    region_outputs = {}
    for key, tensor in state_dict.items():
        if key.startswith("heads.region.decoders.") and key.endswith(".weight"):
            region_outputs[key.split(".")[3]] = tensor.shape[0]
    answer = state_dict.get("heads.answer.classifier.weight")
    return HeadsConfig(
        mlm="heads.mlm.transform.dense.weight" in state_dict,
        itm="heads.itm.weight" in state_dict,
        region_outputs=region_outputs,
        num_answers=answer.shape[0] if answer is not None else 0,
    )


def read_model_config(run_dir: str | os.PathLike) -> tuple[FusionConfig | TextEncoderConfig, HeadsConfig | None]:
    """The model config of a run directory: (FusionConfig, HeadsConfig or None) for a VL run,
    (TextEncoderConfig, None) for a BERT run."""
    path = Path(run_dir) / CONFIG_FILE
    data = read_yaml(path)
    model = data.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{path} has no 'model:' section")
    if "fusion" not in model:
        return from_dict(TextEncoderConfig, model, source=str(path), prefix="model"), None
    cfg = fusion_config_from_dict(data, str(path))
    heads = data.get("heads")
    return cfg, (from_dict(HeadsConfig, heads, source=str(path), prefix="heads") if heads is not None else None)


def load_vl_run(run_dir: str | os.PathLike) -> VLPretrainingModel | BertPretrainingModel:
    """The model saved in a run directory (see the module docstring), with every tensor checked."""
    run_dir = Path(run_dir)
    if detect_checkpoint_kind(run_dir) != VL_RUN_KIND:
        raise UserError(f"{run_dir} is not a run directory of this project (config.yaml + {WEIGHTS_FILE})")
    if (run_dir / "quantization.json").is_file():
        raise UserError(f"{run_dir} is an int8 run (quantization.json), for inference only; use its fp32 source")
    cfg, heads = read_model_config(run_dir)
    weights_path = run_dir / WEIGHTS_FILE
    state_dict = load_state_file(weights_path)
    if isinstance(cfg, TextEncoderConfig):
        model = BertPretrainingModel(cfg)
    else:
        model = build_pretraining_model(cfg, heads or heads_from_weights(state_dict))
    load_into(model, state_dict, weights_path)
    return model


def load_vl_checkpoint(checkpoint_dir: str | os.PathLike, ignore_unknown: bool = False) -> VLPretrainingModel:
    """A ``VLPretrainingModel`` from a run directory of ours or a Hugging Face LXMERT / VisualBERT directory.

    For a Hugging Face BERT directory, build the VL model from a config and call
    ``vl.checkpoints.hf_vl.init_text_from_hf_bert`` instead.
    """
    from vl.checkpoints.hf_vl import LXMERT_KIND, VISUALBERT_KIND, load_hf_vl_model

    kind = detect_checkpoint_kind(checkpoint_dir)
    if kind in (LXMERT_KIND, VISUALBERT_KIND):
        return load_hf_vl_model(checkpoint_dir, ignore_unknown)[0]
    if kind == VL_RUN_KIND:
        model = load_vl_run(checkpoint_dir)
        if isinstance(model, VLPretrainingModel):
            return model
    raise UserError(f"{checkpoint_dir} holds a text-only BERT checkpoint ({kind}), not a vision-language model; "
                    "initialise a VL model's text stream from it instead")
