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

from vl.encoders.regions import build_region_embeddings, embed_regions, init_visual_tables
from vl.encoders.relations import BoxRelationBias, biased_attention_mask
from vl.encoders.tags import build_object_tags
from vl.encoders.text import Pooler, build_text_embeddings, build_transformer_encoder
from vl.encoders.transformer import init_bert_weights
from vl.fusion.base import FusionConfig, OutputRows, VLOutput, key_padding_mask, masked_mean, read_batch


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
        self.text_embeddings = build_text_embeddings(text)
        self.region_embeddings = build_region_embeddings(cfg, text.hidden_size)
        self.tags = build_object_tags(cfg, text.hidden_size)
        self.encoder = build_transformer_encoder(text)
        self.relations = BoxRelationBias(text.num_heads) if cfg.region.box_relations else None
        self.pooler = Pooler(text.hidden_size)
        self.text_hidden_size = text.hidden_size
        self.region_hidden_size = text.hidden_size
        self.hidden_size = text.hidden_size
        self.apply(lambda module: init_bert_weights(module, text.init_std))
        init_visual_tables(self.text_embeddings, self.region_embeddings)
        if self.relations is not None:
            self.relations.reset_parameters()

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
        attn_mask = key_padding_mask(joint_mask)
        if self.relations is not None:  # tags sit at their regions' boxes: the (R, R) bias tiles [tags; regions]
            copies = 1 + len(tag_parts)
            bias = self.relations(inputs["region_boxes"]).repeat(1, 1, copies, copies)  # (B, nh, [R +] R, [R +] R)
            attn_mask = biased_attention_mask(attn_mask, bias, num_text, tokens.shape[1])
        layer_cls = None
        if all_layers:
            states = self.encoder(tokens, attn_mask, return_all=True)
            hidden, layer_cls = states[-1], [state[:, :1] for state in states]
        else:
            hidden = self.encoder(tokens, attn_mask, rows=joint_rows)  # (B, T [+ R] + R, H)
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
