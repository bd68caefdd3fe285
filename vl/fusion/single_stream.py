"""Single-stream fusion: text tokens and region tokens concatenated through one shared transformer.

VisualBERT and UNITER are two configurations of ``SingleStreamModel`` (see ``configs/visualbert-*.yaml`` and
``configs/uniter-*.yaml``):

- VisualBERT: region token = LN_text(Linear(feature) + visual_type[1] + visual_position[0]); no box input; the
  LayerNorm is the text embeddings' own. With ``region.geometry: none, type_embedding: own,
  position_embedding: true, final_norm: text, part_norm: false`` the model reproduces Hugging Face's
  ``VisualBertModel`` exactly (``vl.checkpoints.hf_vl`` loads its checkpoints).
- UNITER: region token = LN(LN(Linear(feature)) + LN(Linear(7-d geometry)) + text_type[1]).

With ``model.tags`` (Oscar) each region's object tag (``vl.encoders.tags``) is a token between the text and the
regions, [text; tags; regions], or is summed into its region's token (``tags.placement: region``).
"""

from __future__ import annotations

import torch
from torch import nn

from vl.encoders.regions import RegionEmbeddings
from vl.encoders.tags import ObjectTags
from vl.encoders.text import Pooler
from vl.encoders.transformer import TextEmbeddings, TransformerEncoder, init_bert_weights
from vl.fusion.base import FusionConfig, OutputRows, VLOutput, key_padding_mask, masked_mean, read_batch


def build_region_embeddings(cfg: FusionConfig, hidden_size: int) -> RegionEmbeddings:
    """The ``RegionEmbeddings`` that ``cfg.region`` describes, of width ``hidden_size``."""
    region, text = cfg.region, cfg.text
    return RegionEmbeddings(
        feature_dim=region.feature_dim,
        geometry_dim=region.geometry_dim,
        hidden_size=hidden_size,
        layer_norm_eps=text.layer_norm_eps,
        dropout=text.dropout,
        combine=region.combine,
        part_norm=region.part_norm,
        final_norm=region.final_norm == "own",
        num_types=text.type_vocab_size if region.type_embedding == "own" else 0,
        type_id=region.type_id,
        num_positions=text.max_position if region.position_embedding else 0,
    )


def build_object_tags(cfg: FusionConfig, region_hidden: int) -> ObjectTags | None:
    """The ``ObjectTags`` that ``cfg.tags`` asks for (None without tags)."""
    if cfg.tags is None:
        return None
    return ObjectTags(cfg.tags.placement, cfg.text.hidden_size, region_hidden, cfg.region.geometry_dim,
                      cfg.text.layer_norm_eps, cfg.text.dropout)


def embed_regions(cfg: FusionConfig, text_embeddings: TextEmbeddings, region_embeddings: RegionEmbeddings,
                  inputs: dict[str, torch.Tensor | None], tags: ObjectTags | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Region tokens (B, R, H), borrowing the text segment row / LayerNorm where ``cfg.region`` says so, and the
    tag tokens (B, R, H_t) when ``tags`` places them on the text side (else None). ``inputs``: ``read_batch``'s."""
    type_embedding = None
    if cfg.region.type_embedding == "text":
        type_embedding = text_embeddings.token_type_embeddings.weight[cfg.region.type_id]  # (H,)
    shared_norm = text_embeddings.norm if cfg.region.final_norm == "text" else None
    tag_tokens = region_extra = None
    if tags is not None:
        tag_tokens, region_extra = tags(text_embeddings.word_embeddings, inputs["region_tag_ids"],
                                        inputs["region_tag_weights"], inputs["region_boxes"])
    region_tokens = region_embeddings(inputs["region_feats"], inputs["region_boxes"], type_embedding=type_embedding,
                                      shared_norm=shared_norm, extra=region_extra)
    return region_tokens, tag_tokens


def init_visual_tables(text_embeddings: TextEmbeddings, region_embeddings: RegionEmbeddings) -> None:
    """VisualBERT's "special visual initialisation": visual type / position tables start as the text ones."""
    with torch.no_grad():
        if region_embeddings.type_embeddings is not None:
            region_embeddings.type_embeddings.weight.copy_(text_embeddings.token_type_embeddings.weight)
        if region_embeddings.position_embeddings is not None:
            region_embeddings.position_embeddings.weight.copy_(text_embeddings.position_embeddings.weight)


class SingleStreamModel(nn.Module):
    """[text; regions] -> one ``TransformerEncoder`` -> split back, and a [CLS] pooler.

    ``model(batch) -> VLOutput`` with text_hidden (B, T, H), region_hidden (B, R, H), pooled (B, H) =
    tanh(Linear(hidden[:, 0])), pooled_text / pooled_region = masked means of each part. Batch keys: see
    ``vl.fusion.base``. Attention is bidirectional over every real token of both modalities.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        if cfg.fusion != "single_stream":
            raise ValueError(f"SingleStreamModel needs fusion 'single_stream', got '{cfg.fusion}'")
        self.cfg = cfg
        text = cfg.text
        self.text_embeddings = TextEmbeddings(
            text.vocab_size, text.hidden_size, text.max_position, text.type_vocab_size, text.pad_token_id,
            text.layer_norm_eps, text.dropout,
        )
        self.region_embeddings = build_region_embeddings(cfg, text.hidden_size)
        self.tags = build_object_tags(cfg, text.hidden_size)
        self.encoder = TransformerEncoder(
            text.num_layers, text.hidden_size, text.num_heads, text.intermediate_size, text.dropout,
            text.attn_dropout, text.layer_norm_eps, text.activation, text.pre_ln,
        )
        self.pooler = Pooler(text.hidden_size)
        self.text_hidden_size = text.hidden_size
        self.region_hidden_size = text.hidden_size
        self.hidden_size = text.hidden_size
        self.apply(lambda module: init_bert_weights(module, text.init_std))
        init_visual_tables(self.text_embeddings, self.region_embeddings)

    def forward(self, batch: dict[str, torch.Tensor], rows: OutputRows | None = None,
                all_layers: bool = False) -> VLOutput:
        """``rows``: compute the last layer at these positions only (see ``OutputRows`` and ``VLOutput``);
        ``all_layers``: also return every layer's [CLS] state (``VLOutput.layer_cls``; not with ``rows``)."""
        if all_layers and rows is not None:
            raise ValueError("all_layers computes every row; it cannot be combined with rows")
        inputs = read_batch(batch, self.cfg)
        input_ids, attention_mask, region_mask = inputs["input_ids"], inputs["attention_mask"], inputs["region_mask"]
        text_tokens = self.text_embeddings(input_ids, inputs["token_type_ids"])  # (B, T, H)
        region_tokens, tag_tokens = embed_regions(self.cfg, self.text_embeddings, self.region_embeddings, inputs,
                                                  self.tags)  # (B, R, H), (B, R, H) or None
        num_text, num_regions = input_ids.shape[1], region_tokens.shape[1]
        tag_parts = [tag_tokens] if tag_tokens is not None else []
        joint_mask = None
        if attention_mask is not None or region_mask is not None:
            text_part = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            region_part = region_mask if region_mask is not None else region_tokens.new_ones(region_tokens.shape[:2])
            # tags are visible where their regions are
            joint_mask = torch.cat([text_part.to(region_part.dtype), *[region_part] * len(tag_parts), region_part],
                                   dim=1)  # (B, T [+ R] + R)
        joint_rows = None
        if rows is not None and (rows.text is not None or rows.regions is not None):
            rows = rows.with_first(text=True, regions=False)  # [CLS], read by the pooler
            text_rows = rows.text if rows.text is not None else input_ids.new_ones(input_ids.shape, dtype=torch.bool)
            region_rows = rows.regions if rows.regions is not None else \
                input_ids.new_ones(region_tokens.shape[:2], dtype=torch.bool)
            tag_rows = [torch.zeros_like(region_rows, dtype=torch.bool)] * len(tag_parts)  # nothing reads them
            joint_rows = torch.cat([text_rows.bool(), *tag_rows, region_rows.bool()], dim=1)  # (B, T [+ R] + R)
        tokens = torch.cat([text_tokens, *tag_parts, region_tokens], dim=1)
        layer_cls = None
        if all_layers:
            states = self.encoder(tokens, key_padding_mask(joint_mask), return_all=True)
            hidden, layer_cls = states[-1], [state[:, :1] for state in states]
        else:
            hidden = self.encoder(tokens, key_padding_mask(joint_mask), rows=joint_rows)  # (B, T [+ R] + R, H)
        # (B, T, H), [(B, R, H)], (B, R, H); ``split`` as in ``Attention.both_ways``: its backward concatenates the
        # gradients, where each slice's would zero-fill a (B, T + R, H) tensor to be summed
        parts = hidden.split([num_text, *[num_regions] * len(tag_parts), num_regions], dim=1)
        text_hidden, region_hidden = parts[0], parts[-1]
        restricted = rows if rows is not None else OutputRows()
        return VLOutput(
            text_hidden=text_hidden,
            region_hidden=region_hidden,
            pooled=self.pooler(hidden),
            pooled_text=masked_mean(text_hidden, attention_mask) if restricted.text is None else None,
            pooled_region=masked_mean(region_hidden, region_mask) if restricted.regions is None else None,
            tag_hidden=parts[1] if tag_parts else None,
            layer_cls=layer_cls,
        )
