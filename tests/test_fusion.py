"""Fusion models: every registered architecture and every shipped config builds, runs forward and backward,
stays finite, and gives the same outputs at real positions whatever the padding."""

from __future__ import annotations


import pytest
import torch

from vl.config import ConfigError
from vl.encoders.regions import RegionEmbeddings, box_geometry
from vl.errors import UserError
from vl.fusion import FUSION_REGISTRY, VLOutput, build_fusion, load_fusion_config
from vl.fusion.base import fusion_config_from_dict
from vl.fusion.pretraining import HeadsConfig, VLHeads, build_pretraining_model

from support import CONFIGS, TINY, fusion_batch, take

BASE = sorted(name.replace("-tiny", "-base") for name in TINY)


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    torch.manual_seed(0)
    cfg = load_fusion_config(CONFIGS / request.param)
    return request.param, cfg, build_fusion(cfg)


def test_every_registered_architecture_has_shipped_configs():
    fusions = {load_fusion_config(CONFIGS / name).fusion for name in TINY}
    assert fusions == set(FUSION_REGISTRY)
    assert len(TINY) == 4 and all((CONFIGS / name).is_file() for name in BASE)


PADDINGS = {"none": ([6, 6, 6], [5, 5, 5]), "text": ([6, 3, 4], [5, 5, 5]), "regions": ([6, 6, 6], [5, 2, 4]),
            "both": ([6, 3, 5], [2, 5, 3])}


@pytest.mark.parametrize("padding", list(PADDINGS))
def test_forward_backward_finite(tiny, padding):
    name, cfg, model = tiny
    model.train()
    text_lens, region_counts = PADDINGS[padding]
    batch = fusion_batch(cfg, text_lens, region_counts)
    out = model(batch)
    assert isinstance(out, VLOutput)
    batch_size, num_text, num_regions = 3, max(text_lens), max(region_counts)
    assert out.text_hidden.shape == (batch_size, num_text, model.text_hidden_size)
    assert out.region_hidden.shape == (batch_size, num_regions, model.region_hidden_size)
    assert out.pooled.shape == (batch_size, model.hidden_size)
    assert out.pooled_text.shape[0] == batch_size and out.pooled_region.shape[0] == batch_size
    for tensor in (out.text_hidden, out.region_hidden, out.pooled, out.pooled_text, out.pooled_region):
        assert torch.isfinite(tensor).all(), name
    model.zero_grad()
    loss = out.text_hidden.pow(2).mean() + out.region_hidden.pow(2).mean() + out.pooled.pow(2).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


def test_padding_does_not_change_real_positions(tiny):
    name, cfg, model = tiny
    model.eval()
    text_lens, region_counts = [7, 3, 5], [2, 6, 4]
    batch = fusion_batch(cfg, text_lens, region_counts, seed=1)
    with torch.no_grad():
        padded = model(batch)
        for i, (length, count) in enumerate(zip(text_lens, region_counts)):
            single = model(take(batch, i, length, count))
            torch.testing.assert_close(padded.text_hidden[i, :length], single.text_hidden[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(padded.region_hidden[i, :count], single.region_hidden[0], atol=1e-5, rtol=1e-4)
            for field in ("pooled", "pooled_text", "pooled_region"):
                torch.testing.assert_close(getattr(padded, field)[i], getattr(single, field)[0], atol=1e-5,
                                           rtol=1e-4, msg=f"{name}: {field} of example {i}")


def test_optional_masks_mean_no_padding(tiny):
    _, cfg, model = tiny
    model.eval()
    batch = fusion_batch(cfg, [5, 5], [4, 4])
    bare = {key: value for key, value in batch.items() if key not in ("attention_mask", "region_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(batch).pooled, model(bare).pooled)


def test_example_without_regions_stays_finite(tiny):
    _, cfg, model = tiny
    model.eval()
    batch = fusion_batch(cfg, [5, 4], [3, 3])
    batch["region_mask"][1] = 0
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out.text_hidden).all() and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("name", TINY)
def test_pre_ln_variant(name):
    cfg = load_fusion_config(CONFIGS / name, ["model.text.pre_ln=true"])
    model = build_fusion(cfg)
    out = model(fusion_batch(cfg, [4, 3], [3, 2]))
    out.pooled.sum().backward()
    assert torch.isfinite(out.text_hidden).all()


@pytest.mark.parametrize("name", BASE)
def test_base_configs_at_paper_sizes(name):
    cfg = load_fusion_config(CONFIGS / name)
    with torch.device("meta"):  # structure and shapes only: no memory, no compute
        model = build_fusion(cfg)
        out = model({
            "input_ids": torch.zeros(1, 20, dtype=torch.long),
            "region_feats": torch.zeros(1, 36, cfg.region.feature_dim),
            "region_boxes": torch.zeros(1, 36, 4),
        })
    assert out.text_hidden.shape == (1, 20, cfg.text.hidden_size)
    assert out.region_hidden.shape == (1, 36, cfg.region_hidden_size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    expected = {"lxmert-base.yaml": (200, 215), "vilbert-base.yaml": (225, 245), "uniter-base.yaml": (105, 115),
                "visualbert-base.yaml": (105, 115)}[name]
    assert expected[0] < params < expected[1], f"{name}: {params:.1f}M parameters"
    if name.startswith("lxmert"):
        assert (len(model.text_layers), len(model.vision_layers), len(model.cross_layers)) == (9, 5, 5)
    if name.startswith("vilbert"):
        assert (model.text_hidden_size, model.region_hidden_size, model.hidden_size) == (768, 1024, 1024)
        assert cfg.cross.coattn_layers == ((6, 0), (7, 1), (8, 2), (9, 3), (10, 4), (11, 5))


def test_lxmert_cross_attention_is_shared_between_directions():
    cfg = load_fusion_config(CONFIGS / "lxmert-tiny.yaml")
    model = build_fusion(cfg)
    layer = model.cross_layers[0]
    assert sum(1 for name, _ in layer.named_children() if "cross" in name) == 2  # one attention + its residual
    batch = fusion_batch(cfg, [4], [3])
    out = model(batch)
    model.zero_grad()
    # A random projection: the plain sum of LayerNorm outputs has no gradient (each row's normalised values sum to 0).
    (out.text_hidden * torch.randn(out.text_hidden.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    # The text output of layer 0 depends on the shared module through both directions' use of it.
    assert layer.cross_attention.query.weight.grad.abs().sum() > 1e-3


def test_vilbert_streams_have_different_widths_and_coattention_runs_where_configured():
    cfg = load_fusion_config(CONFIGS / "vilbert-tiny.yaml")
    model = build_fusion(cfg).eval()
    assert model.text_hidden_size != model.region_hidden_size
    calls = []
    for index, block in enumerate(model.cross_layers):
        block.register_forward_hook(lambda module, args, output, index=index: calls.append(("co", index)))
    for index, layer in enumerate(model.text_layers):
        layer.register_forward_hook(lambda module, args, output, index=index: calls.append(("text", index)))
    with torch.no_grad():
        model(fusion_batch(cfg, [4], [3]))
    # coattn_layers [[1, 0], [2, 1]]: text layer 0, co-attention 0, text layer 1, co-attention 1.
    assert calls == [("text", 0), ("co", 0), ("text", 1), ("co", 1)]


def test_box_geometry():
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.6]]])
    assert torch.equal(box_geometry(boxes, "lxmert4"), boxes)
    torch.testing.assert_close(box_geometry(boxes, "vilbert5"), torch.tensor([[[0.1, 0.2, 0.5, 0.6, 0.16]]]))
    torch.testing.assert_close(box_geometry(boxes, "uniter7"),
                               torch.tensor([[[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]]]))
    with pytest.raises(UserError, match="unknown box geometry"):
        box_geometry(boxes, "corners")


def test_region_embeddings_combine_modes():
    torch.manual_seed(0)
    feats, boxes = torch.randn(2, 3, 8), torch.rand(2, 3, 4)
    mean = RegionEmbeddings(8, 4, 16, dropout=0.0, combine="mean").eval()
    total = RegionEmbeddings(8, 4, 16, dropout=0.0, combine="sum").eval()
    total.load_state_dict(mean.state_dict())
    torch.testing.assert_close(total(feats, boxes), 2 * mean(feats, boxes))
    expected = (mean.feature_norm(mean.feature_proj(feats)) + mean.box_norm(mean.box_proj(boxes))) / 2
    torch.testing.assert_close(mean(feats, boxes), expected)
    typed = RegionEmbeddings(8, 0, 16, dropout=0.0, part_norm=False, final_norm=True, num_types=2).eval()
    assert typed(feats).shape == (2, 3, 16)


def test_batch_errors_name_the_key():
    cfg = load_fusion_config(CONFIGS / "lxmert-tiny.yaml")
    model = build_fusion(cfg)
    batch = fusion_batch(cfg, [4], [3])
    with pytest.raises(UserError, match="'region_boxes'"):
        model({key: value for key, value in batch.items() if key != "region_boxes"})
    with pytest.raises(UserError, match="'region_feats'"):
        model({**batch, "region_feats": torch.zeros(1, 3, 7)})
    with pytest.raises(UserError, match="'region_boxes' has 6 values"):
        model({**batch, "region_boxes": torch.zeros(1, 3, 6)})


def test_config_files_both_layouts_and_errors(tmp_path):
    nested = load_fusion_config(CONFIGS / "uniter-tiny.yaml", ["model.text.num_layers=3"])
    assert nested.text.num_layers == 3
    bare = tmp_path / "bare.yaml"
    bare.write_text("fusion: single_stream\ntext: {hidden_size: 32, num_heads: 4}\nregion: {feature_dim: 8}\n")
    assert load_fusion_config(bare, ["text.num_layers=1"]).text.num_layers == 1
    assert fusion_config_from_dict({"model": {"fusion": "single_stream"}}).fusion == "single_stream"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fusion: single_stream\n  regions: {}\n")
    with pytest.raises(ConfigError, match="model.regions.*bad.yaml"):
        load_fusion_config(bad)
    with pytest.raises(ConfigError, match="coattn_layers"):
        load_fusion_config(CONFIGS / "vilbert-tiny.yaml", ["model.cross.coattn_layers=[[2, 0], [1, 1]]"])
    with pytest.raises(ConfigError, match="beyond"):
        load_fusion_config(CONFIGS / "vilbert-tiny.yaml", ["model.cross.coattn_layers=[[3, 0]]"])
    with pytest.raises(ConfigError, match="needs both a 'vision' and a 'cross'"):
        load_fusion_config(CONFIGS / "uniter-tiny.yaml", ["model.fusion=dual_stream"])
    with pytest.raises(ConfigError, match="geometry"):
        load_fusion_config(CONFIGS / "uniter-tiny.yaml", ["model.region.geometry=boxes9"])


@pytest.mark.parametrize("name", TINY)
def test_heads_shapes_and_tying(name):
    cfg = load_fusion_config(CONFIGS / name)
    heads_cfg = HeadsConfig(mlm=True, itm=True, region_outputs={"obj": 7, "feat": cfg.region.feature_dim},
                            num_answers=5)
    model = build_pretraining_model(cfg, heads_cfg).eval()
    assert isinstance(model.heads, VLHeads)
    assert model.heads.mlm.decoder.weight is model.fusion.text_embeddings.word_embeddings.weight
    out = model(fusion_batch(cfg, [5, 3], [4, 2]))
    assert model.heads.mlm(out.text_hidden[:, :2]).shape == (2, 2, cfg.text.vocab_size)
    assert model.heads.itm(out.pooled).shape == (2, 2)
    region = model.heads.region(out.region_hidden[:, :1])
    assert region["obj"].shape == (2, 1, 7) and region["feat"].shape == (2, 1, cfg.region.feature_dim)
    assert model.heads.answer(out.pooled).shape == (2, 5)
    assert set(model.state_dict()) == {k for k in model.state_dict() if k.startswith(("fusion.", "heads."))}


def test_vilbert_whole_image_region_is_the_mean_region_and_stays_internal():
    """ViLBERT's pooler reads a whole-image region (mean feature, whole-image box) that the model prepends itself:
    the same as feeding that region by hand to the model without the option; callers see their real regions only."""
    import dataclasses

    from vl.fusion.base import OutputRows

    torch.manual_seed(0)
    cfg = load_fusion_config(CONFIGS / "vilbert-tiny.yaml")
    assert cfg.region.image_token
    model = build_fusion(cfg).eval()
    plain = build_fusion(dataclasses.replace(cfg, region=dataclasses.replace(cfg.region, image_token=False))).eval()
    plain.load_state_dict(model.state_dict())
    batch = fusion_batch(cfg, [6, 3, 5], [2, 5, 3])
    mask = batch["region_mask"].float()
    mean = (batch["region_feats"] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(3, 1, 4)  # the whole image
    by_hand = {**batch, "region_feats": torch.cat([mean[:, None], batch["region_feats"]], 1),
               "region_boxes": torch.cat([whole, batch["region_boxes"]], 1),
               "region_mask": torch.cat([torch.ones(3, 1, dtype=batch["region_mask"].dtype), batch["region_mask"]], 1)}
    with torch.no_grad():
        ours, theirs = model(batch), plain(by_hand)
        torch.testing.assert_close(ours.pooled, theirs.pooled)
        assert ours.region_hidden.shape[1] == batch["region_feats"].shape[1]
        torch.testing.assert_close(ours.region_hidden, theirs.region_hidden[:, 1:])
        # restricted to a few region rows (heads at masked positions), the pooled output is the same
        rows = torch.zeros_like(batch["region_mask"], dtype=torch.bool)
        rows[:, 1] = True
        restricted = model(batch, rows=OutputRows(regions=rows))
        torch.testing.assert_close(restricted.pooled, ours.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(restricted.region_hidden[:, 1], ours.region_hidden[:, 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["uniter-tiny.yaml", "visualbert-tiny.yaml", "lxmert-tiny.yaml"])
def test_all_layers_returns_every_cls_state_ending_with_the_last(name):
    torch.manual_seed(0)
    cfg = load_fusion_config(CONFIGS / name)
    model = build_fusion(cfg).eval()
    batch = fusion_batch(cfg, [6, 3, 5], [2, 5, 3])
    with torch.no_grad():
        plain, every = model(batch), model(batch, all_layers=True)
    expected = cfg.text.num_layers + 1 + (cfg.cross.num_layers if cfg.fusion == "dual_stream" else 0)
    assert len(every.layer_cls) == expected and all(state.shape == (3, 1, cfg.text.hidden_size)
                                                    for state in every.layer_cls)
    torch.testing.assert_close(every.layer_cls[-1], plain.text_hidden[:, :1])
    torch.testing.assert_close(every.pooled, plain.pooled)
    assert plain.layer_cls is None


def test_box_norm_off_keeps_a_boxs_scale():
    """LN(W b) with a zero bias is blind to b's scale, so two boxes on one ray from the corner look alike; without
    the box LayerNorm (``region.box_norm: false``) they differ."""
    torch.manual_seed(0)
    feats = torch.zeros(1, 2, 8)
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2], [0.2, 0.2, 0.4, 0.4]]])
    tokens = {}
    for box_norm in (True, False):
        emb = RegionEmbeddings(8, 4, 16, dropout=0.0, box_norm=box_norm).eval()
        torch.nn.init.zeros_(emb.box_proj.bias)
        tokens[box_norm] = emb(feats, boxes)
    assert torch.allclose(tokens[True][0, 0], tokens[True][0, 1], atol=1e-5)
    assert not torch.allclose(tokens[False][0, 0], tokens[False][0, 1], atol=1e-3)
