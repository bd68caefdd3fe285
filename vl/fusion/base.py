"""What every fusion model shares: its config, the batch it reads, the output it returns.

Batch (a dict of tensors; B = batch, T = text length, R = regions, D = region feature width):

=================  ============  ===========================================================================
key                shape         meaning
=================  ============  ===========================================================================
``input_ids``       (B, T) long   WordPiece ids, ``[CLS] ... [SEP]``
``attention_mask``  (B, T)        1 at real tokens, 0 at padding (optional: all real)
``token_type_ids``  (B, T) long   segment ids (optional: all 0)
``region_feats``    (B, R, D)     pooled region features (masked regions already zeroed by the collator)
``region_boxes``    (B, R, G)     box geometry, G = ``cfg.region.geometry_dim`` (4: normalised x1, y1, x2, y2;
                                  5: + area; 7: + w, h, area; see ``vl.encoders.regions.box_geometry``).
                                  Plain normalised (B, R, 4) boxes are accepted for any G and expanded.
                                  Not needed when ``cfg.region.geometry == "none"`` (VisualBERT).
``region_mask``     (B, R)        1 at real regions, 0 at padding (optional: all real)
``region_tag_ids``  (B, R, L)     object-tag word ids per region (``vl.encoders.tags``); only when ``cfg.tags``
``region_tag_weights`` (B, R, L)  their weights, the detector's probabilities; 0 at padding and masked regions
=================  ============  ===========================================================================

Every fusion model is called as ``model(batch) -> VLOutput`` and exposes ``model.cfg`` (its ``FusionConfig``),
``model.text_embeddings`` (a ``TextEmbeddings``, whose ``word_embeddings`` the MLM decoder ties to),
``model.text_hidden_size`` (H_t), ``model.region_hidden_size`` (H_v) and ``model.hidden_size`` (H, the pooled
width).

Config files: a model config is the ``model:`` section of a YAML file, or the whole file when it has no
``model:`` key (``load_fusion_config`` accepts both).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from vl.config import ConfigError, apply_overrides, from_dict, read_yaml
from vl.encoders.regions import GEOMETRY_DIMS, GeometryKind, box_geometry
from vl.encoders.text import TextEncoderConfig
from vl.errors import UserError


@dataclass(frozen=True)
class RegionConfig:
    """How region features and boxes become region embeddings (``vl.encoders.regions.RegionEmbeddings``).

    LXMERT:    part_norm, combine=mean, final_norm=none, geometry=lxmert4: (LN(W f) + LN(W b)) / 2.
    UNITER:    part_norm, combine=sum, final_norm=own, type_embedding=text, geometry=uniter7:
               LN(LN(W f) + LN(W b) + type[1]).
    ViLBERT:   combine=sum, final_norm=own, geometry=vilbert5: LN(W f + W b).
    VisualBERT: geometry=none, type_embedding=own, position_embedding, final_norm=text:
               LN_text(W f + visual_type[1] + visual_position[0]).
    """

    feature_dim: int = 2048  # D: 2048 for bottom-up-attention features, any width for ours
    geometry: GeometryKind = "lxmert4"  # box geometry fed to the box projection; "none": no box input
    part_norm: bool = True  # LayerNorm after each of the feature and box projections
    # with part_norm, also the box projection's LayerNorm; it makes a box and its multiples alike (docs/experiments)
    box_norm: bool = True
    combine: Literal["mean", "sum"] = "mean"  # how the feature and box parts are combined
    final_norm: Literal["none", "own", "text"] = "none"  # LayerNorm after combining; "text": the text embeddings'
    type_embedding: Literal["none", "own", "text"] = "none"  # add a type embedding: own table or text's segments
    type_id: int = 1  # the type id of region tokens
    position_embedding: bool = False  # VisualBERT: a learned visual position table, read at index 0
    # ViLBERT: a whole-image region first (the mean of the real regions' features, the whole image's box), which
    # the region pooler reads; outside masking and the region objectives (dual-stream only)
    image_token: bool = False
    # attention between visual tokens biased by their relative boxes (vl.encoders.relations); off as published
    box_relations: bool = False

    @property
    def geometry_dim(self) -> int:
        return GEOMETRY_DIMS[self.geometry]

    def __post_init__(self):
        if self.feature_dim <= 0:
            raise ValueError(f"region.feature_dim must be positive, got {self.feature_dim}")
        if self.geometry not in GEOMETRY_DIMS:
            raise ValueError(f"region.geometry '{self.geometry}' is not one of {list(GEOMETRY_DIMS)}")
        if self.type_id < 0:
            raise ValueError(f"region.type_id must be >= 0, got {self.type_id}")
        if self.box_relations and self.geometry == "none":
            raise ValueError("region.box_relations needs a box geometry; region.geometry is 'none'")


@dataclass(frozen=True)
class TagConfig:
    """Object tags (Oscar, VinVL): per region, the names of its most probable detector classes and attributes,
    weighted by their probabilities, in the word-embedding space (``vl.encoders.tags``, ``vl.data.tags``).

    placement "text": one tag token per region joins the text side (single-stream: [text; tags; regions];
    dual-stream: the text stream), with a segment embedding of its own and its region's box geometry.
    placement "region": the tag is added to its region's token (Unicoder-VL sums the object label into it).
    """

    placement: Literal["text", "region"] = "text"
    classes: int = 1  # a tag names the region's most probable classes, this many
    attributes: int = 4  # ... and its most probable attributes, this many
    min_probability: float = 0.05  # names less probable than this are left out of the tag

    def __post_init__(self):
        if self.placement not in ("text", "region"):
            raise ValueError(f"tags.placement must be text or region, got {self.placement!r}")
        if self.classes < 0 or self.attributes < 0 or self.classes + self.attributes == 0:
            raise ValueError("tags.classes and tags.attributes must be >= 0, and one of them positive")
        if not 0.0 <= self.min_probability < 1.0:
            raise ValueError(f"tags.min_probability must be in [0, 1), got {self.min_probability}")


@dataclass(frozen=True)
class VisionStreamConfig:
    """The region stream of a dual-stream model (LXMERT's object-relationship layers, ViLBERT's image stream)."""

    hidden_size: int = 768  # H_v (ViLBERT: 1024)
    num_layers: int = 5  # LXMERT N_r; ViLBERT 6
    num_heads: int = 12
    intermediate_size: int = 3072

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_layers < 0 or self.intermediate_size <= 0:
            raise ValueError("vision.num_layers must be >= 0 and vision.intermediate_size positive")


@dataclass(frozen=True)
class CrossConfig:
    """How the two streams of a dual-stream model exchange information.

    kind "lxmert": ``num_layers`` cross-modality layers after both single-modality stacks; each has ONE
    cross-attention module used in both directions, then self-attention and a feed-forward per stream.
    kind "coattention" (ViLBERT): a co-attention block before text layer ``t`` and vision layer ``v`` for every
    pair ``[t, v]`` in ``coattn_layers`` (``t`` may equal the number of text layers: a block at the end). A block
    is cross-attention in each direction (separate weights, inner width ``hidden_size``) and a feed-forward per
    stream.
    """

    kind: Literal["lxmert", "coattention"] = "lxmert"
    num_layers: int = 5  # lxmert: N_x cross-modality layers
    coattn_layers: tuple[tuple[int, int], ...] = ()  # coattention: (text_layer, vision_layer) pairs, increasing
    hidden_size: int = 0  # coattention: attention inner width (ViLBERT's bi_hidden_size); 0 = text hidden size
    num_heads: int = 0  # coattention: heads; 0 = text heads

    def __post_init__(self):
        if self.kind == "lxmert" and self.num_layers < 0:
            raise ValueError(f"cross.num_layers must be >= 0, got {self.num_layers}")
        if self.kind == "coattention":
            if not self.coattn_layers:
                raise ValueError("cross.coattn_layers must list at least one [text_layer, vision_layer] pair")
            previous = (-1, -1)
            for pair in self.coattn_layers:
                if len(pair) != 2 or pair[0] < 0 or pair[1] < 0:
                    raise ValueError(f"cross.coattn_layers entry {list(pair)} is not a [text_layer, vision_layer] "
                                     "pair of non-negative ints")
                if pair[0] < previous[0] or pair[1] < previous[1]:
                    raise ValueError(f"cross.coattn_layers must be non-decreasing in both layers; {list(pair)} "
                                     f"comes after {list(previous)}")
                previous = tuple(pair)


@dataclass(frozen=True)
class FusionConfig:
    """A whole vision-language model: text core, region embeddings, fusion family and its streams.

    fusion "single_stream" (VisualBERT, UNITER): [text; regions] through one ``TransformerEncoder`` of the
    ``text`` config; ``vision`` and ``cross`` must be left unset.
    fusion "dual_stream" (LXMERT, ViLBERT): a text stream (``text``), a region stream (``vision``) and their
    exchange (``cross``).
    pooling "text_cls": tanh(Linear(text [CLS])) (BERT, VisualBERT, UNITER, LXMERT); "product": ViLBERT's
    relu(Linear(text [CLS])) * relu(Linear(first region)), both of width ``cross.hidden_size``.
    """

    fusion: Literal["single_stream", "dual_stream"] = "single_stream"
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    vision: VisionStreamConfig | None = None  # dual_stream only
    cross: CrossConfig | None = None  # dual_stream only
    pooling: Literal["text_cls", "product"] = "text_cls"
    tags: TagConfig | None = None  # object tags beside the regions; None: no tags (the published models)

    def __post_init__(self):
        if self.fusion == "single_stream":
            if self.vision is not None or self.cross is not None:
                raise ValueError("fusion 'single_stream' takes no 'vision' or 'cross' section")
            if self.pooling != "text_cls":
                raise ValueError("fusion 'single_stream' pools with 'text_cls' only")
        elif self.fusion == "dual_stream":
            if self.vision is None or self.cross is None:
                raise ValueError("fusion 'dual_stream' needs both a 'vision' and a 'cross' section")
            if self.region.final_norm == "text":
                raise ValueError("region.final_norm 'text' is for single-stream models only")
            if self.region.type_embedding == "text" and self.vision.hidden_size != self.text.hidden_size:
                raise ValueError("region.type_embedding 'text' needs vision.hidden_size == text.hidden_size")
            if self.cross.kind == "lxmert":
                if self.vision.hidden_size != self.text.hidden_size or self.vision.num_heads != self.text.num_heads:
                    raise ValueError("cross.kind 'lxmert' shares one cross-attention between the streams, so "
                                     "vision.hidden_size and num_heads must equal the text's")
            else:
                for text_layer, vision_layer in self.cross.coattn_layers:
                    if text_layer > self.text.num_layers or vision_layer > self.vision.num_layers:
                        raise ValueError(f"cross.coattn_layers pair [{text_layer}, {vision_layer}] is beyond "
                                         f"{self.text.num_layers} text / {self.vision.num_layers} vision layers")
                if self.coattn_hidden_size % self.coattn_num_heads:
                    raise ValueError(f"cross.hidden_size {self.coattn_hidden_size} is not divisible by "
                                     f"{self.coattn_num_heads} heads")
            if self.pooling == "product" and self.cross.kind != "coattention":
                raise ValueError("pooling 'product' (ViLBERT) needs cross.kind 'coattention'")
        if self.region.type_embedding == "text" and self.text.type_vocab_size <= self.region.type_id:
            raise ValueError(f"region.type_id {self.region.type_id} needs text.type_vocab_size > it")
        if self.region.type_embedding == "own" and self.text.type_vocab_size <= self.region.type_id:
            raise ValueError(f"region.type_id {self.region.type_id} needs text.type_vocab_size > it "
                             "(the own table has text.type_vocab_size rows)")

    @property
    def text_hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def region_hidden_size(self) -> int:
        return self.vision.hidden_size if self.vision is not None else self.text.hidden_size

    @property
    def coattn_hidden_size(self) -> int:
        return (self.cross.hidden_size or self.text.hidden_size) if self.cross is not None else 0

    @property
    def coattn_num_heads(self) -> int:
        return (self.cross.num_heads or self.text.num_heads) if self.cross is not None else 0

    @property
    def pooled_size(self) -> int:
        return self.coattn_hidden_size if self.pooling == "product" else self.text.hidden_size


def fusion_config_from_dict(data: dict, source: str = "<dict>") -> FusionConfig:
    """A ``FusionConfig`` from a mapping: the ``model:`` section, or a mapping that holds one under ``model``."""
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        return from_dict(FusionConfig, data["model"], source=source, prefix="model")
    return from_dict(FusionConfig, data, source=source)


def load_fusion_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> FusionConfig:
    """Load a model config from YAML: the file's ``model:`` section, or the whole file when it has none.

    Overrides are ``--set`` items addressed the way the file is laid out (``model.text.hidden_size=64`` for a
    file with a ``model:`` section, ``text.hidden_size=64`` for a bare model file).
    """
    data = read_yaml(path)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set {' '.join(overrides)})"
    if "model" in data and not isinstance(data["model"], dict):
        raise ConfigError(f"model: expected a mapping in {source}")
    return fusion_config_from_dict(data, source)


@dataclass
class VLOutput:
    """The output of every fusion model.

    text_hidden: (B, T, H_t) last hidden states of the text tokens.
    region_hidden: (B, R, H_v) last hidden states of the regions (H_v = H_t for single-stream models).
    pooled: (B, H) the pair summary for ITM / VQA heads (see ``FusionConfig.pooling``).
    pooled_text: (B, H_t) mean of ``text_hidden`` over real tokens, or ViLBERT's text pooler output (B, H).
    pooled_region: (B, H_v) mean of ``region_hidden`` over real regions, or ViLBERT's image pooler output (B, H).
    The per-stream summaries serve contrastive losses and first-stage retrieval. Hidden states at padded
    positions are unspecified; nothing downstream should read them.

    A model called with ``rows`` (``OutputRows``) computes its last layer at those rows only: ``text_hidden`` /
    ``region_hidden`` are exact at the requested rows (and at [CLS], which ``pooled`` reads) and zero or exact
    elsewhere, and the masked means of a restricted stream (``pooled_text`` / ``pooled_region`` under "text_cls"
    pooling) are None.
    """

    text_hidden: torch.Tensor
    region_hidden: torch.Tensor
    pooled: torch.Tensor
    pooled_text: torch.Tensor | None = None
    pooled_region: torch.Tensor | None = None
    tag_hidden: torch.Tensor | None = None  # (B, R, H_t) last hidden states of the tag tokens (tags.placement text)
    # with ``all_layers``: the [CLS] state (B, 1, H_t) after the embeddings and after each layer that updates it,
    # last one last (an ELMo-style scalar mix of layers reads them)
    layer_cls: list[torch.Tensor] | None = None


@dataclass
class OutputRows:
    """The positions at which a caller reads a fusion model's last hidden states (heads at masked positions).

    text: bool (B, T), regions: bool (B, R); None = every position of that stream. The model adds the rows its
    pooling reads ([CLS]; ViLBERT's first region). Keys and values of the last layer still come from every
    position; only its queries, attention output, feed-forward and final norm are restricted to these rows.
    """

    text: torch.Tensor | None = None
    regions: torch.Tensor | None = None

    def with_first(self, text: bool, regions: bool) -> OutputRows:
        """A copy with position 0 of the text and / or region rows set (the rows a pooler reads)."""
        text_rows, region_rows = self.text, self.regions
        if text and text_rows is not None:
            text_rows = text_rows.bool().clone()
            text_rows[:, 0] = True
        if regions and region_rows is not None:
            region_rows = region_rows.bool().clone()
            region_rows[:, 0] = True
        return OutputRows(text_rows, region_rows)


def key_padding_mask(padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1-at-real mask -> bool (B, 1, 1, S) for SDPA, or None when nothing is padded.

    A row with no real key at all (an example without regions) is left fully visible rather than giving NaN.
    """
    if padding_mask is None:
        return None
    mask = padding_mask.bool()
    if bool(mask.all()):
        return None
    mask = mask | ~mask.any(dim=1, keepdim=True)  # (B, S)
    return mask[:, None, None, :]


def masked_mean(hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (B, S, H) over positions where ``padding_mask`` (B, S) is 1 -> (B, H)."""
    if padding_mask is None:
        return hidden.mean(dim=1)
    weights = padding_mask.to(hidden.dtype).unsqueeze(-1)  # (B, S, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _require(batch: dict, key: str) -> torch.Tensor:
    if key not in batch or batch[key] is None:
        raise UserError(f"batch is missing '{key}' (have: {', '.join(sorted(batch))})")
    return batch[key]


def read_batch(batch: dict, cfg: FusionConfig) -> dict[str, torch.Tensor | None]:
    """Check a batch against the contract above; returns its tensors with optional ones filled or None.

    Raises UserError naming the missing or mis-shaped key.
    """
    input_ids = _require(batch, "input_ids")
    region_feats = _require(batch, "region_feats")
    if input_ids.dim() != 2:
        raise UserError(f"batch 'input_ids' must be (B, T), got shape {tuple(input_ids.shape)}")
    if region_feats.dim() != 3 or region_feats.shape[-1] != cfg.region.feature_dim:
        raise UserError(f"batch 'region_feats' must be (B, R, {cfg.region.feature_dim}), "
                        f"got shape {tuple(region_feats.shape)}")
    batch_size, num_regions = region_feats.shape[:2]
    if input_ids.shape[0] != batch_size:
        raise UserError(f"batch 'input_ids' has {input_ids.shape[0]} rows but 'region_feats' has {batch_size}")
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise UserError(f"batch 'attention_mask' shape {tuple(attention_mask.shape)} != input_ids "
                        f"{tuple(input_ids.shape)}")
    token_type_ids = batch.get("token_type_ids")
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise UserError(f"batch 'token_type_ids' shape {tuple(token_type_ids.shape)} != input_ids "
                        f"{tuple(input_ids.shape)}")
    region_mask = batch.get("region_mask")
    if region_mask is not None and tuple(region_mask.shape) != (batch_size, num_regions):
        raise UserError(f"batch 'region_mask' must be ({batch_size}, {num_regions}), "
                        f"got {tuple(region_mask.shape)}")
    region_boxes = None
    geometry_dim = cfg.region.geometry_dim
    if geometry_dim:
        region_boxes = _require(batch, "region_boxes")
        if region_boxes.dim() != 3 or tuple(region_boxes.shape[:2]) != (batch_size, num_regions):
            raise UserError(f"batch 'region_boxes' must be ({batch_size}, {num_regions}, {geometry_dim}), "
                            f"got {tuple(region_boxes.shape)}")
        if region_boxes.shape[-1] == 4 and geometry_dim != 4:
            region_boxes = box_geometry(region_boxes, cfg.region.geometry)
        elif region_boxes.shape[-1] != geometry_dim:
            raise UserError(f"batch 'region_boxes' has {region_boxes.shape[-1]} values per box; geometry "
                            f"'{cfg.region.geometry}' needs {geometry_dim} (or 4 normalised corners)")
        region_boxes = region_boxes.to(region_feats.dtype)
    tag_ids = tag_weights = None
    if cfg.tags is not None:
        for key in ("region_tag_ids", "region_tag_weights"):
            if batch.get(key) is None:
                raise UserError(f"batch is missing '{key}': the model reads object tags (model.tags); "
                                "build its batches with vl.data.tags.RegionTagger")
        tag_ids, tag_weights = batch["region_tag_ids"], batch["region_tag_weights"]
        if tag_ids.dim() != 3 or tuple(tag_ids.shape[:2]) != (batch_size, num_regions) or \
                tag_weights.shape != tag_ids.shape:
            raise UserError(f"batch 'region_tag_ids' and 'region_tag_weights' must both be ({batch_size}, "
                            f"{num_regions}, L), got {tuple(tag_ids.shape)} and {tuple(tag_weights.shape)}")
        tag_weights = tag_weights.to(region_feats.dtype)
        if region_mask is not None:  # padded regions never carry a tag
            tag_weights = tag_weights * region_mask.to(tag_weights.dtype).unsqueeze(-1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "region_feats": region_feats,
        "region_boxes": region_boxes,
        "region_mask": region_mask,
        "region_tag_ids": tag_ids,
        "region_tag_weights": tag_weights,
    }
