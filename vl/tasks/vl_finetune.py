"""What vision-language fine-tuning (VQA, retrieval) shares: the ``--init`` checkpoint, the tokenizer, and batches
of text and regions read from a feature store.

``--init`` (``load_init``) may be

- a run directory of this project: a VL pretraining run (``vl pretrain``), or a VQA / retrieval fine-tuning run
  (its fusion weights and ITM head are reused; its task heads are not);
- a Hugging Face LXMERT or VisualBERT directory (``config.json`` + weights), loaded with its heads;
- a Hugging Face BERT directory: the fusion model comes from the config's ``model:`` section and only its text
  stream is initialised from BERT;
- ``scratch``: the fusion model of the config's ``model:`` section, freshly initialised (baselines).

The tokenizer is ``--tokenizer`` when given, else the ``vocab.txt`` of ``--init``, else (scratch only) one trained
on the task's training texts; the run directory keeps a copy (``vocab.txt``), so a run is self-contained.

Batches follow the fusion batch contract (``vl.fusion.base``): ``input_ids``, ``attention_mask``,
``token_type_ids`` (B, T); ``region_feats`` (B, R, D) float32; ``region_boxes`` (B, R, 4) normalised x1, y1, x2, y2
(the model expands them to its box geometry); ``region_mask`` (B, R). R is the batch's largest region count
(at least 1); an image without regions has an all-zero mask.

What trains (``finetune.mode``, ``--mode``), as for the text tasks: ``full`` (everything), ``frozen`` (the fusion
model is frozen and kept in eval mode; the task heads train), ``adapters`` (bottleneck adapters in every fusion
layer, with the LayerNorms and the task heads; the rest frozen), so that one pretrained model serves many tasks;
``scalar-mix`` (the fusion model frozen; the heads read the pooler applied to a learned mix of the [CLS] state
after the embeddings and every layer: single-stream models and LXMERT's text stream).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vl.config import read_yaml
from vl.data.tags import RegionTagger
from vl.errors import UserError
from vl.fusion.base import FusionConfig, fusion_config_from_dict
from vl.fusion.pretraining import HeadsConfig, VLPretrainingModel, build_pretraining_model
from vl.text.tokenizer import Tokenizer

SCRATCH = "scratch"
VL_MODES = ("full", "frozen", "adapters", "scalar-mix")


@dataclass(frozen=True)
class VLFinetuneMode:
    """The ``finetune:`` section of a VQA / retrieval config: what trains (module docstring)."""

    mode: str = "full"
    adapter_size: int = 64  # adapters: bottleneck width

    def __post_init__(self):
        if self.mode not in VL_MODES:
            raise ValueError(f"finetune.mode must be one of {', '.join(VL_MODES)}, got {self.mode!r}")
        if self.adapter_size < 1:
            raise ValueError(f"finetune.adapter_size must be positive, got {self.adapter_size}")


def cls_states(cfg: FusionConfig) -> int:
    """How many [CLS] states ``all_layers`` returns: the embeddings' and each text-side layer's."""
    if cfg.fusion == "single_stream":
        return cfg.text.num_layers + 1
    if cfg.cross.kind == "lxmert":
        return cfg.text.num_layers + cfg.cross.num_layers + 1
    raise UserError("finetune.mode scalar-mix mixes the [CLS] states of the text stream, and ViLBERT pools both "
                    "streams' first tokens: use frozen or adapters")


class FinetuneModeMixin:
    """What a task model (with a ``fusion`` attribute) needs for ``finetune.mode``:
    ``frozen_fusion`` keeps the fusion model in eval mode through ``train()``; ``scalar_mix`` (scalar-mix mode)
    makes ``pooled_output`` pool a learned mix of every layer's [CLS] state instead of the last one."""

    frozen_fusion = False  # (``scalar_mix``, when set, is a registered submodule: no class attribute may shadow it)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_fusion:
            self.fusion.eval()
        return self

    def pooled_output(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled pair summary (B, H) the task heads read."""
        scalar_mix = self._modules.get("scalar_mix")
        if scalar_mix is None:
            return self.fusion(batch).pooled
        layers = self.fusion(batch, all_layers=True).layer_cls  # L + 1 tensors (B, 1, H_t)
        return self.fusion.pooler(scalar_mix(layers))  # the pooler reads position 0


def prepare_mode(model: torch.nn.Module, mode: VLFinetuneMode) -> None:
    """Add the modules ``mode`` puts into a task model (adapters in its fusion layers, the scalar mix), before its
    weights are loaded or trained."""
    if mode.mode == "adapters":
        from vl.encoders.adapters import add_adapters

        add_adapters(model.fusion, mode.adapter_size, model.fusion.cfg.text.activation)
    elif mode.mode == "scalar-mix":
        from vl.encoders.adapters import ScalarMix

        model.scalar_mix = ScalarMix(cls_states(model.fusion.cfg))


def apply_mode(model: torch.nn.Module, mode: VLFinetuneMode) -> list[str]:
    """``prepare_mode``, then freeze what ``mode`` keeps fixed; returns the trainable parameter names."""
    prepare_mode(model, mode)
    if mode.mode in ("frozen", "scalar-mix"):
        model.fusion.requires_grad_(False)
        model.frozen_fusion = True  # the task model keeps it in eval mode (deterministic features)
    elif mode.mode == "adapters":
        from vl.encoders.adapters import freeze_all_but_adapters

        freeze_all_but_adapters(model.fusion)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def note(message: str) -> None:
    """A progress or warning line on stderr."""
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# Config files



# --------------------------------------------------------------------------------------------------------------
# --init


@dataclass
class InitModel:
    """The model a fine-tuning run starts from: fusion + whatever heads the checkpoint had, and its tokenizer."""

    model: VLPretrainingModel
    tokenizer: Tokenizer | None  # None: the checkpoint has no vocab.txt (scratch, or a bare HF directory)
    source: str  # "scratch" or the resolved checkpoint path
    kind: str  # "scratch", "vl-run", "vl-finetune", "hf-lxmert", "hf-visualbert", "hf-bert"


def _tokenizer_in(directory: Path) -> Tokenizer | None:
    return Tokenizer.from_dir(directory) if (directory / "vocab.txt").is_file() else None


def load_init(init: str, model_cfg: FusionConfig | None) -> InitModel:
    """The starting model for ``--init`` (see the module docstring). ``model_cfg`` (the config's ``model:``
    section) builds the model for ``scratch`` and BERT inits; the other kinds carry their own architecture."""
    from vl.checkpoints.io import VL_RUN_KIND, detect_checkpoint_kind, load_into, load_state_file

    if init == SCRATCH:
        if model_cfg is None:
            raise UserError("--init scratch needs a model: give --config with a 'model:' section "
                            "(e.g. configs/finetune-vqa-tiny.yaml)")
        return InitModel(build_pretraining_model(model_cfg, HeadsConfig(mlm=False, itm=True)), None, SCRATCH,
                         SCRATCH)
    directory = Path(init)
    kind = detect_checkpoint_kind(directory)
    if kind == "hf-bert":
        from vl.checkpoints.hf_vl import init_text_from_hf_bert

        if model_cfg is None:
            raise UserError(f"--init {init} is a BERT checkpoint: give --config with a 'model:' section for the "
                            "vision-language model whose text stream it initialises")
        model = build_pretraining_model(model_cfg, HeadsConfig(mlm=False, itm=True))
        init_text_from_hf_bert(model, directory)
        return InitModel(model, _tokenizer_in(directory), str(directory.resolve()), kind)
    if kind == VL_RUN_KIND:
        if (directory / "quantization.json").is_file():
            raise UserError(f"--init {init} is an int8 run (quantization.json), for inference only; start from its "
                            "fp32 source")
        data = read_yaml(directory / "config.yaml")
        model_section = data.get("model")
        if not isinstance(model_section, dict) or "fusion" not in model_section:
            raise UserError(f"--init {init} is a text-only run; start from a vision-language run, a Hugging Face "
                            "LXMERT / VisualBERT / BERT directory, or 'scratch'")
        if "task" in data:  # one of our fine-tuning runs: reuse its fusion model and ITM head
            cfg = fusion_config_from_dict(data, str(directory / "config.yaml"))
            weights_path = directory / "model.safetensors"
            state = load_state_file(weights_path)
            model = build_pretraining_model(cfg, HeadsConfig(mlm=False, itm="heads.itm.weight" in state))
            kept = {key: value for key, value in state.items() if key.startswith(("fusion.", "heads.itm."))}
            report = load_into(model, kept, weights_path, strict=False)
            if report.missing:
                raise UserError(f"--init {init}: {weights_path} lacks '{report.missing[0]}'")
            return InitModel(model, _tokenizer_in(directory), str(directory.resolve()), "vl-finetune")
    from vl.checkpoints.vl_run import load_vl_checkpoint

    model = load_vl_checkpoint(directory, ignore_unknown=True)
    return InitModel(model, _tokenizer_in(directory), str(directory.resolve()), kind)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A WordPiece vocabulary of at most ``vocab_size`` tokens learned from ``texts`` (scratch runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "texts.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        return Tokenizer.train([corpus], vocab_size, min_frequency=1)


def prepare_init(init: str, model_cfg: FusionConfig | None, tokenizer_dir: str | None,
                 training_texts: Sequence[str]) -> tuple[InitModel, Tokenizer]:
    """The starting model and tokenizer of a fine-tuning run.

    The tokenizer is ``tokenizer_dir`` when given, else the init's ``vocab.txt``, else (scratch only) one trained on
    ``training_texts``. A scratch model's vocabulary is sized to its tokenizer (as ``vl pretrain`` does), so a
    scratch baseline given a pretraining run's tokenizer has exactly the pretrained model's shape.
    """
    if init == SCRATCH:
        if model_cfg is None:
            raise UserError("--init scratch needs a model: give --config with a 'model:' section "
                            "(e.g. configs/finetune-vqa-tiny.yaml)")
        if tokenizer_dir is not None:
            tokenizer = Tokenizer.from_dir(tokenizer_dir)
        else:
            tokenizer = train_tokenizer(training_texts, model_cfg.text.vocab_size)
            note(f"trained a {tokenizer.vocab_size}-token WordPiece vocabulary on {len(training_texts)} texts")
        model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(
            model_cfg.text, vocab_size=max(tokenizer.vocab_size, 8), pad_token_id=tokenizer.pad_id))
        return load_init(SCRATCH, model_cfg), tokenizer
    init_model = load_init(init, model_cfg)
    if tokenizer_dir is not None:
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    elif init_model.tokenizer is not None:
        tokenizer = init_model.tokenizer
    else:
        raise UserError(f"--init {init_model.source} has no vocab.txt; give --tokenizer DIR")
    if tokenizer.vocab_size > init_model.model.cfg.text.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
                        f"{init_model.model.cfg.text.vocab_size} (model.text.vocab_size)")
    return init_model, tokenizer


def steps_for_epochs(train_cfg: Any, epochs: float, num_examples: int) -> Any:
    """``train_cfg`` (a ``TrainConfig``) with ``steps`` = ceil(epochs * examples / examples per step) when
    ``epochs`` > 0; unchanged otherwise."""
    if epochs <= 0:
        return train_cfg
    per_step = train_cfg.batch_size * train_cfg.grad_accum_steps
    return dataclasses.replace(train_cfg, steps=max(1, math.ceil(epochs * num_examples / per_step)))


def check_store(store: Any, cfg: FusionConfig, flag: str = "--features") -> None:
    """A UserError when the feature store's feature width differs from the model's ``region.feature_dim``."""
    if int(store.feature_dim) != cfg.region.feature_dim:
        raise UserError(f"{flag} {store.root} has {store.feature_dim}-d region features but the model reads "
                        f"{cfg.region.feature_dim}-d ones (model.region.feature_dim)")


def open_store(path: str | os.PathLike, flag: str = "--features") -> Any:
    """The ``FeatureStore`` at ``path``; a missing directory is a UserError naming ``flag``."""
    from region_features.store import FeatureStore

    if not Path(path).is_dir():
        raise UserError(f"{flag} feature store not found: {path}")
    return FeatureStore(path)


# --------------------------------------------------------------------------------------------------------------
# Batches


def text_batch(token_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T) of already-encoded texts, right-padded."""
    length = max(1, max(len(ids) for ids in token_ids))
    input_ids = torch.full((len(token_ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), length), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids)}


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids ([CLS] ... [SEP]) of each text, at most ``max_len`` each."""
    return [list(encoding.ids) for encoding in tokenizer.encode_batch(list(texts), max_len=max_len)]


class ImageRegions(NamedTuple):
    """One image's regions as a model reads them: features (K, D) as stored, normalised boxes (K, 4), and, for a
    model with object tags, their word ids and weights (K, L) (``vl.data.tags``)."""

    feats: np.ndarray
    boxes: np.ndarray
    tag_ids: np.ndarray | None = None
    tag_weights: np.ndarray | None = None


def read_regions(store: Any, image_id: Any, max_regions: int, tagger: RegionTagger | None = None) -> ImageRegions:
    """The first ``max_regions`` regions of an image (with their tags when a ``tagger`` is given)."""
    return record_regions(store[image_id], max_regions, tagger)


def record_regions(record: dict[str, Any], max_regions: int, tagger: RegionTagger | None = None) -> ImageRegions:
    """``read_regions`` of a store record (``FeatureStore.__getitem__``'s keys)."""
    count = min(int(record["features"].shape[0]), max_regions)
    boxes = np.clip(record["normalized_boxes"][:count], 0.0, 1.0).astype(np.float32)
    if tagger is None:
        return ImageRegions(record["features"][:count], boxes)
    return ImageRegions(record["features"][:count], boxes, *tagger(record, count))


def region_batch(regions: Sequence[ImageRegions | tuple[np.ndarray, np.ndarray]],
                 feature_dim: int) -> dict[str, torch.Tensor]:
    """``region_feats`` (B, R, D) float32, ``region_boxes`` (B, R, 4), ``region_mask`` (B, R) of per-image
    regions, padded to the largest count (at least 1); with tags, ``region_tag_ids`` / ``region_tag_weights``
    (B, R, L) too (zero weight at padding)."""
    regions = [item if isinstance(item, ImageRegions) else ImageRegions(*item) for item in regions]
    num_regions = max(1, max(len(item.feats) for item in regions))
    feats = np.zeros((len(regions), num_regions, feature_dim), dtype=np.float32)
    boxes = np.zeros((len(regions), num_regions, 4), dtype=np.float32)
    mask = np.zeros((len(regions), num_regions), dtype=np.int64)
    tagged = regions[0].tag_ids is not None
    if tagged:
        width = regions[0].tag_ids.shape[1]
        tag_ids = np.zeros((len(regions), num_regions, width), dtype=np.int64)
        tag_weights = np.zeros((len(regions), num_regions, width), dtype=np.float32)
    for row, item in enumerate(regions):
        count = len(item.feats)
        feats[row, :count] = item.feats
        boxes[row, :count] = item.boxes
        mask[row, :count] = 1
        if tagged:
            tag_ids[row, :count] = item.tag_ids
            tag_weights[row, :count] = item.tag_weights
    batch = {"region_feats": torch.from_numpy(feats), "region_boxes": torch.from_numpy(boxes),
             "region_mask": torch.from_numpy(mask)}
    if tagged:
        batch["region_tag_ids"] = torch.from_numpy(tag_ids)
        batch["region_tag_weights"] = torch.from_numpy(tag_weights)
    return batch


def missing_images(store: Any, image_ids: Sequence[Any]) -> list[Any]:
    """The ids (in order, without repeats) that have no features in ``store``."""
    return [image_id for image_id in dict.fromkeys(image_ids) if image_id not in store]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
