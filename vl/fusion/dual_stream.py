"""Dual-stream fusion: a text stream and a region stream that exchange information through cross-attention.

Two families are configurations of ``DualStreamModel`` (``cfg.cross.kind``):

- LXMERT ("lxmert"): N_l language layers, N_r object-relationship layers, then N_x cross-modality layers. Each
  cross-modality layer has ONE cross-attention module (with its residual LayerNorm) used in both directions,
  then self-attention and a feed-forward per stream. Regions are embedded as (LN(W f) + LN(W b)) / 2 and the
  pooled output is tanh(Linear(text [CLS])). This reproduces Hugging Face's ``LxmertModel`` exactly
  (``vl.checkpoints.hf_vl`` loads its checkpoints).
- ViLBERT ("coattention"): streams of different widths; before text layer t and vision layer v of every pair in
  ``cross.coattn_layers`` a co-attention block lets each stream attend to the other (separate weights per
  direction) and runs a feed-forward per stream. Pooled output: relu(Linear(text [CLS])) *
  relu(Linear(first region)), the first region being the whole-image token (``region.image_token``: the mean of
  the image's region features, as given, so a masked region stays hidden, with the whole image's box). The token
  is internal: ``region_hidden`` holds the real regions only, so masking and the region objectives never see it.

With ``model.tags`` (Oscar) each region's object tag (``vl.encoders.tags``) is a token appended to the text stream,
[text; tags], where the language layers bind question words to tags directly; or it is summed into its region's
token (``tags.placement: region``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vl.encoders.regions import box_geometry, build_region_embeddings, embed_regions, init_visual_tables
from vl.encoders.relations import BoxRelationBias, biased_attention_mask
from vl.encoders.tags import build_object_tags
from vl.encoders.text import Pooler, build_text_embeddings
from vl.encoders.transformer import (
    Attention,
    FeedForward,
    Residual,
    TransformerLayer,
    gather_rows,
    init_bert_weights,
    row_positions,
    scatter_rows,
)
from vl.fusion.base import FusionConfig, OutputRows, VLOutput, key_padding_mask, masked_mean, read_batch


class LxmertCrossLayer(nn.Module):
    """LXMERT's cross-modality layer on two streams of the same width.

    One ``cross_attention`` (+ ``cross_residual``) is applied text->regions and regions->text, both from the
    layer's inputs; then ``text_layer`` and ``vision_layer`` (self-attention + feed-forward) run per stream.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, dropout: float = 0.1, attn_dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, activation: str = "gelu", pre_ln: bool = False):
        super().__init__()
        self.cross_attention = Attention(dim, num_heads, attn_dropout=attn_dropout)
        self.cross_residual = Residual(dim, dropout=dropout, layer_norm_eps=layer_norm_eps, pre_ln=pre_ln)
        layer = dict(dropout=dropout, attn_dropout=attn_dropout, layer_norm_eps=layer_norm_eps, activation=activation,
                     pre_ln=pre_ln)
        self.text_layer = TransformerLayer(dim, num_heads, ffn_dim, **layer)
        self.vision_layer = TransformerLayer(dim, num_heads, ffn_dim, **layer)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None, regions: torch.Tensor,
                region_mask: torch.Tensor | None, text_positions: torch.Tensor | None = None,
                region_positions: torch.Tensor | None = None, region_self_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, T, D), regions (B, R, D); masks bool (B, 1, 1, T|R) or None -> updated (text, regions).

        ``text_positions`` (B, M) / ``region_positions`` (B, N): return only those rows of a stream, (B, M, D) /
        (B, N, D). The cross-attention still runs at every position: the self-attention's keys need them all.
        ``region_self_mask`` (B, nh, R, R) additive: the regions' self-attention mask when it is not ``region_mask``
        (box relations).
        """
        text_cross, regions_cross = self.cross_attention.both_ways(text, text_mask, regions, region_mask)
        text_attended = self.cross_residual(text, lambda _: text_cross)  # (B, T, D)
        regions_attended = self.cross_residual(regions, lambda _: regions_cross)  # (B, R, D)
        return (self.text_layer(text_attended, text_mask, positions=text_positions),
                self.vision_layer(regions_attended, region_mask if region_self_mask is None else region_self_mask,
                                  positions=region_positions))


class CoAttentionBlock(nn.Module):
    """ViLBERT's co-attention block: each stream attends to the other, then a feed-forward per stream.

    Text queries (width ``text_dim``) attend to region keys/values (``vision_dim``) and vice versa, through
    attention of inner width ``inner_dim``; each output is projected back to its stream's width.
    """

    def __init__(self, *, text_dim: int, vision_dim: int, inner_dim: int, num_heads: int, text_ffn_dim: int,
                 vision_ffn_dim: int, dropout: float = 0.1, attn_dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 activation: str = "gelu", pre_ln: bool = False):
        super().__init__()
        residual = dict(dropout=dropout, layer_norm_eps=layer_norm_eps, pre_ln=pre_ln)
        self.text_cross_attention = Attention(text_dim, num_heads, kv_dim=vision_dim, attn_dropout=attn_dropout,
                                              inner_dim=inner_dim)
        self.text_cross_residual = Residual(text_dim, **residual)
        self.vision_cross_attention = Attention(vision_dim, num_heads, kv_dim=text_dim, attn_dropout=attn_dropout,
                                                inner_dim=inner_dim)
        self.vision_cross_residual = Residual(vision_dim, **residual)
        self.text_ffn = FeedForward(text_dim, text_ffn_dim, activation=activation)
        self.text_ffn_residual = Residual(text_dim, **residual)
        self.vision_ffn = FeedForward(vision_dim, vision_ffn_dim, activation=activation)
        self.vision_ffn_residual = Residual(vision_dim, **residual)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None, regions: torch.Tensor,
                region_mask: torch.Tensor | None, text_positions: torch.Tensor | None = None,
                region_positions: torch.Tensor | None = None, region_self_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, T, D_t), regions (B, R, D_v); masks bool (B, 1, 1, T|R) or None -> updated (text, regions).
        (``region_self_mask`` is unused: a co-attention block has no self-attention.)

        ``text_positions`` (B, M) / ``region_positions`` (B, N): return only those rows of a stream (its queries
        and feed-forward run there only), (B, M, D_t) / (B, N, D_v).
        """
        text_queries = text if text_positions is None else gather_rows(text, text_positions)  # (B, T|M, D_t)
        region_queries = regions if region_positions is None else gather_rows(regions, region_positions)
        text_attended = self.text_cross_residual(
            text_queries, lambda h: self.text_cross_attention(h, regions, attn_mask=region_mask))  # (B, T, D_t)
        regions_attended = self.vision_cross_residual(
            region_queries, lambda h: self.vision_cross_attention(h, text, attn_mask=text_mask))  # (B, R, D_v)
        return (self.text_ffn_residual(text_attended, self.text_ffn),
                self.vision_ffn_residual(regions_attended, self.vision_ffn))


def with_image_token(inputs: dict[str, torch.Tensor | None], geometry: str) -> dict[str, torch.Tensor | None]:
    """``read_batch``'s inputs with ViLBERT's whole-image region prepended: its feature the mean of the real regions'
    features, its box the whole image in ``geometry``'s encoding; it carries no object tag."""
    feats, mask = inputs["region_feats"], inputs["region_mask"]
    batch = feats.shape[0]
    weights = mask.to(feats.dtype) if mask is not None else feats.new_ones(feats.shape[:2])  # (B, R)
    mean = (feats * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, D)
    whole = box_geometry(feats.new_tensor([[[0.0, 0.0, 1.0, 1.0]]]), geometry).expand(batch, 1, -1)  # (B, 1, G)
    out = dict(inputs)
    out["region_feats"] = torch.cat([mean[:, None], feats], dim=1)
    out["region_boxes"] = torch.cat([whole.to(inputs["region_boxes"].dtype), inputs["region_boxes"]], dim=1)
    out["region_mask"] = torch.cat([weights.new_ones(batch, 1).to(mask.dtype), mask], dim=1) \
        if mask is not None else None
    for key in ("region_tag_ids", "region_tag_weights"):
        if inputs.get(key) is not None:
            value = inputs[key]
            out[key] = torch.cat([value.new_zeros(batch, 1, *value.shape[2:]), value], dim=1)
    return out


def last_update(order: list[tuple[str, nn.Module]], stream: str) -> int | None:
    """The index in ``order`` of the last layer that updates ``stream`` ("text" / "vision"; "cross" layers update
    both), or None. A stream restricted to a few output rows computes them there only: every earlier layer's output
    is read as keys and values at every row."""
    updates = [step for step, (kind, _) in enumerate(order) if kind in (stream, "cross")]
    return updates[-1] if updates else None


class DualStreamModel(nn.Module):
    """Text stream + region stream + their exchange (LXMERT or ViLBERT, by ``cfg.cross.kind``).

    ``model(batch) -> VLOutput`` with text_hidden (B, T, H_t), region_hidden (B, R, H_v) and pooled (B, H):
    H = H_t for pooling "text_cls", ``cross.hidden_size`` for "product". Batch keys: see ``vl.fusion.base``.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        if cfg.fusion != "dual_stream":
            raise ValueError(f"DualStreamModel needs fusion 'dual_stream', got '{cfg.fusion}'")
        self.cfg = cfg
        text, vision, cross = cfg.text, cfg.vision, cfg.cross
        common = dict(dropout=text.dropout, attn_dropout=text.attn_dropout, layer_norm_eps=text.layer_norm_eps,
                      activation=text.activation, pre_ln=text.pre_ln)
        self.text_embeddings = build_text_embeddings(text)
        self.region_embeddings = build_region_embeddings(cfg, vision.hidden_size)
        self.tags = build_object_tags(cfg, vision.hidden_size)
        self.text_layers = nn.ModuleList(
            TransformerLayer(text.hidden_size, text.num_heads, text.intermediate_size, **common)
            for _ in range(text.num_layers)
        )
        self.vision_layers = nn.ModuleList(
            TransformerLayer(vision.hidden_size, vision.num_heads, vision.intermediate_size, **common)
            for _ in range(vision.num_layers)
        )
        if cross.kind == "lxmert":
            self.cross_layers = nn.ModuleList(
                LxmertCrossLayer(text.hidden_size, text.num_heads, text.intermediate_size, **common)
                for _ in range(cross.num_layers)
            )
        else:
            self.cross_layers = nn.ModuleList(
                CoAttentionBlock(text_dim=text.hidden_size, vision_dim=vision.hidden_size,
                                 inner_dim=cfg.coattn_hidden_size, num_heads=cfg.coattn_num_heads,
                                 text_ffn_dim=text.intermediate_size, vision_ffn_dim=vision.intermediate_size, **common)
                for _ in cross.coattn_layers
            )
        self.text_final_norm = nn.LayerNorm(text.hidden_size, eps=text.layer_norm_eps) if text.pre_ln else None
        self.vision_final_norm = nn.LayerNorm(vision.hidden_size, eps=text.layer_norm_eps) if text.pre_ln else None
        if cfg.pooling == "text_cls":
            self.pooler = Pooler(text.hidden_size)
        else:
            self.text_pooler = nn.Linear(text.hidden_size, cfg.coattn_hidden_size)
            self.vision_pooler = nn.Linear(vision.hidden_size, cfg.coattn_hidden_size)
        self.text_hidden_size = text.hidden_size
        self.region_hidden_size = vision.hidden_size
        self.hidden_size = cfg.pooled_size
        # biases every self-attention of the region stream (not the cross-attention)
        self.relations = BoxRelationBias(vision.num_heads) if cfg.region.box_relations else None
        self.apply(lambda module: init_bert_weights(module, text.init_std))
        init_visual_tables(self.text_embeddings, self.region_embeddings)
        if self.relations is not None:
            self.relations.reset_parameters()

    def _layer_order(self) -> list[tuple[str, nn.Module]]:
        """Every layer in the order the paper runs it, tagged "text" / "vision" (one stream) or "cross" (both).

        LXMERT: the language layers, the object-relationship layers, the cross-modality layers. ViLBERT: for each
        pair (t, v) of ``cross.coattn_layers``, text layers up to t and vision layers up to v, then a co-attention
        block; then the rest of each stream.
        """
        cross = self.cfg.cross
        text_layers, vision_layers = list(self.text_layers), list(self.vision_layers)
        if cross.kind == "lxmert":
            return ([("text", layer) for layer in text_layers] + [("vision", layer) for layer in vision_layers]
                    + [("cross", layer) for layer in self.cross_layers])
        order: list[tuple[str, nn.Module]] = []
        text_done = vision_done = 0
        for block, (text_until, vision_until) in zip(self.cross_layers, cross.coattn_layers):
            order += [("text", layer) for layer in text_layers[text_done:text_until]]
            order += [("vision", layer) for layer in vision_layers[vision_done:vision_until]]
            order.append(("cross", block))
            text_done, vision_done = text_until, vision_until
        return (order + [("text", layer) for layer in text_layers[text_done:]]
                + [("vision", layer) for layer in vision_layers[vision_done:]])

    def _run_streams(self, text: torch.Tensor, text_mask: torch.Tensor | None, regions: torch.Tensor,
                     region_mask: torch.Tensor | None, text_positions: torch.Tensor | None = None,
                     region_positions: torch.Tensor | None = None, collect: list[torch.Tensor] | None = None,
                     region_self_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
        """Both streams through ``_layer_order`` -> (text, regions, text_restricted, regions_restricted).

        With ``text_positions`` / ``region_positions`` the last layer that updates that stream computes those rows
        only, and the stream comes back as (B, M, H) with its flag set (a stream with no layer at all comes back
        whole). ``collect`` (LXMERT): appended with the text stream's [CLS] (B, 1, H_t) at entry and after each
        language and cross-modality layer (the last one after the final norm of a pre-LN model).
        ``region_self_mask``: the regions' self-attention mask when it differs from ``region_mask`` (box relations).
        """
        self_mask = region_mask if region_self_mask is None else region_self_mask
        if collect is not None:
            if self.cfg.cross.kind != "lxmert":
                raise ValueError("every layer's [CLS] is defined for LXMERT's text stream only")
            collect.append(text[:, :1])
        order = self._layer_order()
        text_last = last_update(order, "text")
        region_last = last_update(order, "vision")
        for step, (kind, layer) in enumerate(order):
            text_rows = text_positions if step == text_last else None
            region_rows = region_positions if step == region_last else None
            if kind == "text":
                text = layer(text, text_mask, positions=text_rows)
            elif kind == "vision":
                regions = layer(regions, self_mask, positions=region_rows)
            else:
                text, regions = layer(text, text_mask, regions, region_mask, text_positions=text_rows,
                                      region_positions=region_rows, region_self_mask=region_self_mask)
            if collect is not None and kind != "vision":
                collect.append(text[:, :1])
        if self.text_final_norm is not None:
            text, regions = self.text_final_norm(text), self.vision_final_norm(regions)
            if collect:
                collect[-1] = text[:, :1]
        text_restricted = text_positions is not None and text_last is not None
        region_restricted = region_positions is not None and region_last is not None
        return text, regions, text_restricted, region_restricted

    def forward(self, batch: dict[str, torch.Tensor], rows: OutputRows | None = None,
                all_layers: bool = False) -> VLOutput:
        """``rows``: compute the last layers at these positions only (see ``OutputRows`` and ``VLOutput``);
        ``all_layers`` (LXMERT): also return the text stream's [CLS] after every layer (``VLOutput.layer_cls``)."""
        if all_layers and rows is not None:
            raise ValueError("all_layers computes every row; it cannot be combined with rows")
        inputs = read_batch(batch, self.cfg)
        image_token = self.cfg.region.image_token
        if image_token:
            real_mask = inputs["region_mask"]
            inputs = with_image_token(inputs, self.cfg.region.geometry)
        attention_mask, region_mask = inputs["attention_mask"], inputs["region_mask"]
        text = self.text_embeddings(inputs["input_ids"], inputs["token_type_ids"])  # (B, T, H_t)
        regions, tags = embed_regions(self.cfg, self.text_embeddings, self.region_embeddings, inputs,
                                      self.tags)  # (B, R, H_v), (B, R, H_t) or None
        num_text = text.shape[1]
        rows = rows or OutputRows()
        if image_token and rows.regions is not None:  # the token's row is computed too (the pooler reads it)
            rows = dataclasses.replace(rows, regions=torch.cat(
                [rows.regions.new_ones(rows.regions.shape[0], 1), rows.regions], dim=1))
        rows = rows.with_first(text=True, regions=self.cfg.pooling == "product")
        text_rows, stream_mask = rows.text, attention_mask
        if tags is not None:  # the tags join the text stream, visible where their regions are
            text = torch.cat([text, tags], dim=1)  # (B, T + R, H_t)
            if attention_mask is not None or region_mask is not None:
                text_part = attention_mask if attention_mask is not None else \
                    torch.ones(text.shape[0], num_text, dtype=torch.long, device=text.device)
                region_part = region_mask if region_mask is not None else \
                    torch.ones(tags.shape[:2], dtype=torch.long, device=text.device)
                stream_mask = torch.cat([text_part.to(region_part.dtype), region_part], dim=1)  # (B, T + R)
            if text_rows is not None:  # nothing reads the tags' last hidden states
                text_rows = torch.cat([text_rows.bool(), torch.zeros(tags.shape[:2], dtype=torch.bool,
                                                                     device=text.device)], dim=1)
        text_positions = row_positions(text_rows) if text_rows is not None else None  # (B, M)
        region_positions = row_positions(rows.regions) if rows.regions is not None else None  # (B, N)
        layer_cls: list[torch.Tensor] | None = [] if all_layers else None
        region_padding = key_padding_mask(region_mask)
        region_self_mask = None
        if self.relations is not None:
            region_self_mask = biased_attention_mask(region_padding, self.relations(inputs["region_boxes"]), 0,
                                                     regions.shape[1])  # (B, nh, R, R)
        text_hidden, region_hidden, text_restricted, region_restricted = self._run_streams(
            text, key_padding_mask(stream_mask), regions, region_padding, text_positions, region_positions,
            layer_cls, region_self_mask)
        if text_restricted:
            text_hidden = scatter_rows(text_hidden, text_positions, text.shape[1])  # (B, T [+ R], H_t)
        if region_restricted:
            region_hidden = scatter_rows(region_hidden, region_positions, regions.shape[1])  # (B, R, H_v)
        tag_hidden = None
        if tags is not None:
            text_hidden, tag_hidden = text_hidden.split([num_text, tags.shape[1]], dim=1)  # (B, T, H_t), (B, R, H_t)
        first_region = region_hidden[:, 0]  # (B, H_v): the whole-image token when there is one
        if image_token:  # the caller sees its real regions only
            region_hidden, region_mask = region_hidden[:, 1:], real_mask
            tag_hidden = tag_hidden[:, 1:] if tag_hidden is not None else None
        if self.cfg.pooling == "text_cls":
            return VLOutput(
                text_hidden=text_hidden,
                region_hidden=region_hidden,
                pooled=self.pooler(text_hidden),
                pooled_text=masked_mean(text_hidden, attention_mask) if rows.text is None else None,
                pooled_region=masked_mean(region_hidden, region_mask) if rows.regions is None else None,
                tag_hidden=tag_hidden,
                layer_cls=layer_cls,
            )
        pooled_text = torch.relu(self.text_pooler(text_hidden[:, 0]))  # (B, H)
        pooled_region = torch.relu(self.vision_pooler(first_region))  # (B, H)
        return VLOutput(text_hidden=text_hidden, region_hidden=region_hidden, pooled=pooled_text * pooled_region,
                        pooled_text=pooled_text, pooled_region=pooled_region, tag_hidden=tag_hidden)
