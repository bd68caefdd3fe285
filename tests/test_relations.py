"""Box relations in attention (``region.box_relations``): the pair geometry, the bias, both fusion families."""

from __future__ import annotations

import pytest
import torch

from tests.support import ARCHITECTURES, TINY, fusion_batch, take
from vl.encoders.cpu_kernels import attention
from vl.encoders.relations import BoxRelationBias, biased_attention_mask, pair_geometry
from vl.errors import UserError
from vl.fusion import build_fusion, load_fusion_config
from vl.fusion.base import RegionConfig

WITH_BOXES = [name for name, arch in zip(TINY, ARCHITECTURES) if arch != "visualbert"]  # VisualBERT reads no boxes


def relations_model(config: str, on: bool, seed: int = 0):
    cfg = load_fusion_config(f"configs/{config}", [f"model.region.box_relations={'true' if on else 'false'}"])
    torch.manual_seed(seed)
    return build_fusion(cfg).eval()


def test_pair_geometry_says_where_each_box_lies_from_each_other():
    boxes = torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.6, 0.1, 1.0, 0.5]]])  # a small box top-left, a larger one right
    pairs = pair_geometry(boxes)  # (1, 2, 2, 4)
    assert pairs.shape == (1, 2, 2, 4)
    assert torch.allclose(pairs[0, 0, 0], torch.zeros(4), atol=1e-6)  # a box from itself
    dx, dy, dw, dh = pairs[0, 0, 1]  # box 1 seen from box 0: right of it, lower, twice as wide and high
    assert dx == pytest.approx(0.7) and dy == pytest.approx(0.2)
    assert dw == pytest.approx(torch.log(torch.tensor(2.0)).item()) and dh == pytest.approx(dw.item())
    assert torch.allclose(pairs[0, 1, 0], -pairs[0, 0, 1], atol=1e-6)  # and the other way round


def test_bias_starts_at_zero_and_lands_on_the_visual_block_only():
    relations = BoxRelationBias(num_heads=2)
    relations.reset_parameters()
    boxes = torch.rand(3, 4, 4).sort(dim=-1).values
    assert torch.count_nonzero(relations(boxes)) == 0
    torch.nn.init.normal_(relations.mlp[-1].weight)
    bias = relations(boxes)  # (3, 2, 4, 4)
    padding = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    padding[0, ..., -1] = False  # example 0's last region is padding
    mask = biased_attention_mask(padding, bias, start=5, length=9)  # 5 text tokens, then 4 regions
    assert mask.shape == (3, 2, 9, 9)
    assert torch.equal(mask[1:, :, 5:, 5:], bias[1:])
    assert torch.count_nonzero(mask[1:, :, :5, :]) == 0 and torch.count_nonzero(mask[:, :, 5:, :5]) == 0
    assert torch.isinf(mask[0, :, :, -1]).all() and not torch.isinf(mask[1:]).any()


def test_additive_masks_agree_between_the_training_kernel_and_sdpa():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.randn(2, 3, 5, 5)
    mask[0, :, :, -1] = float("-inf")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(attention(q, k, v, mask), expected, atol=1e-5)


@pytest.mark.parametrize("config", WITH_BOXES)
def test_a_model_with_relations_equals_one_without_at_initialisation(config):
    with_relations, without = relations_model(config, True), relations_model(config, False)
    missing, unexpected = with_relations.load_state_dict(without.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith("relations.") for key in missing)
    batch = fusion_batch(with_relations.cfg, [6, 4], [5, 3])
    with torch.no_grad():
        a, b = with_relations(batch), without(batch)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-5)
    assert torch.allclose(a.region_hidden, b.region_hidden, atol=1e-5)


@pytest.mark.parametrize("config", WITH_BOXES)
def test_relations_train_read_the_boxes_and_ignore_padding(config):
    model = relations_model(config, True).train()
    torch.nn.init.normal_(model.relations.mlp[-1].weight)
    batch = fusion_batch(model.cfg, [6, 4], [5, 3])
    out = model(batch)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.region_hidden).all()
    out.pooled.sum().backward()
    assert model.relations.mlp[0].weight.grad is not None and model.relations.mlp[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        moved = dict(batch, region_boxes=batch["region_boxes"].flip(1))  # the same boxes, paired with other regions
        assert not torch.allclose(model(moved).pooled, model(batch).pooled, atol=1e-4)
        alone = model(take(batch, 1, 4, 3)).pooled  # example 1 without its padding gives the same output
        assert torch.allclose(model(batch).pooled[1:], alone, atol=1e-4)


def test_relations_need_boxes_and_do_not_export_to_hugging_face():
    with pytest.raises(ValueError, match="box_relations needs a box geometry"):
        RegionConfig(geometry="none", box_relations=True)
    from vl.checkpoints.hf_vl import hf_architecture
    from vl.fusion.pretraining import HeadsConfig

    with pytest.raises(UserError, match="box_relations"):
        hf_architecture(relations_model("lxmert-tiny.yaml", True).cfg, HeadsConfig(mlm=True))
