"""Object tags (Oscar): the detector's names as word embeddings beside the regions, in both fusion families and
both placements; the tagger that derives them from a store's distributions; masking hides them with their region."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vl.data.tags import RegionTagger, class_probabilities
from vl.data.vl_masking import MaskingVocab, VLBatchPlan, VLMaskingConfig, prepare_vl_batch, unmask_batch
from vl.errors import UserError
from vl.fusion import build_fusion, load_fusion_config
from vl.fusion.base import OutputRows, TagConfig
from vl.text.tokenizer import Tokenizer

from support import CONFIGS, TINY, fusion_batch, take

PLACEMENTS = ("text", "region")
TAG_WIDTH = 3


def tagged_config(name: str, placement: str):
    cfg = load_fusion_config(CONFIGS / name)
    return dataclasses.replace(cfg, tags=TagConfig(placement=placement))


def with_tags(batch: dict, cfg, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch_size, num_regions = batch["region_mask"].shape
    ids = torch.randint(5, cfg.text.vocab_size, (batch_size, num_regions, TAG_WIDTH), generator=generator)
    weights = torch.rand(batch_size, num_regions, TAG_WIDTH, generator=generator)
    return {**batch, "region_tag_ids": ids, "region_tag_weights": weights}


@pytest.fixture(scope="module", params=[(name, placement) for name in TINY for placement in PLACEMENTS],
                ids=lambda p: f"{p[0].removesuffix('.yaml')}-{p[1]}")
def tagged(request):
    torch.manual_seed(0)
    name, placement = request.param
    cfg = tagged_config(name, placement)
    return name, placement, cfg, build_fusion(cfg)


def test_forward_backward_with_tags(tagged):
    name, placement, cfg, model = tagged
    model.train()
    batch = with_tags(fusion_batch(cfg, [6, 3, 5], [2, 5, 3]), cfg)
    out = model(batch)
    assert out.text_hidden.shape == (3, 6, model.text_hidden_size)
    assert out.region_hidden.shape == (3, 5, model.region_hidden_size)
    assert (out.tag_hidden is not None) == (placement == "text")
    if out.tag_hidden is not None:
        assert out.tag_hidden.shape == (3, 5, model.text_hidden_size)
    for tensor in (out.text_hidden, out.region_hidden, out.pooled):
        assert torch.isfinite(tensor).all()
    model.zero_grad()
    (out.pooled.pow(2).mean() + out.text_hidden.pow(2).mean() + out.region_hidden.pow(2).mean()).backward()
    tag_grads = [p.grad for n, p in model.named_parameters() if n.startswith("tags.")]
    assert tag_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in tag_grads)


def test_the_model_reads_the_tags_and_padding_carries_none(tagged):
    _, _, cfg, model = tagged
    model.eval()
    batch = with_tags(fusion_batch(cfg, [5, 4], [4, 2]), cfg)
    with torch.no_grad():
        base = model(batch).pooled
        changed = dict(batch, region_tag_weights=batch["region_tag_weights"].clone())
        changed["region_tag_weights"][0, 0] += 1.0  # a real region's tag
        assert not torch.allclose(model(changed).pooled[0], base[0], atol=1e-5)
        padded = dict(batch, region_tag_weights=batch["region_tag_weights"].clone())
        padded["region_tag_weights"][1, 3] += 5.0  # a padded region of example 1
        torch.testing.assert_close(model(padded).pooled, base)


def test_padding_does_not_change_real_positions_with_tags(tagged):
    name, _, cfg, model = tagged
    model.eval()
    text_lens, region_counts = [7, 3, 5], [2, 6, 4]
    batch = with_tags(fusion_batch(cfg, text_lens, region_counts, seed=1), cfg)
    with torch.no_grad():
        padded = model(batch)
        for i, (length, count) in enumerate(zip(text_lens, region_counts)):
            single_batch = take(batch, i, length, count)
            single = model(single_batch)
            torch.testing.assert_close(padded.text_hidden[i, :length], single.text_hidden[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(padded.pooled[i], single.pooled[0], atol=1e-5, rtol=1e-4, msg=name)


def test_restricted_rows_match_the_full_model(tagged):
    _, _, cfg, model = tagged
    model.eval()
    batch = with_tags(fusion_batch(cfg, [6, 4], [5, 3], seed=2), cfg)
    text_rows = torch.zeros(2, 6, dtype=torch.bool)
    text_rows[0, 2] = text_rows[1, 3] = True
    region_rows = torch.zeros(2, 5, dtype=torch.bool)
    region_rows[0, 1] = region_rows[1, 2] = True
    with torch.no_grad():
        full = model(batch)
        rows = model(batch, OutputRows(text_rows, region_rows))
    torch.testing.assert_close(rows.text_hidden[text_rows], full.text_hidden[text_rows], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rows.region_hidden[region_rows], full.region_hidden[region_rows], atol=1e-5,
                               rtol=1e-4)
    torch.testing.assert_close(rows.pooled, full.pooled, atol=1e-5, rtol=1e-4)


def test_a_tagged_model_needs_tag_keys():
    cfg = tagged_config("uniter-tiny.yaml", "text")
    model = build_fusion(cfg)
    batch = fusion_batch(cfg, [4], [3])
    with pytest.raises(UserError, match="batch is missing 'region_tag_ids': the model reads object tags"):
        model(batch)
    tagged_batch = with_tags(batch, cfg)
    with pytest.raises(UserError, match="'region_tag_ids' and 'region_tag_weights' must both be"):
        model({**tagged_batch, "region_tag_weights": tagged_batch["region_tag_weights"][:, :, :1]})


def test_models_without_tags_have_no_tag_parameters():
    for name in TINY:
        model = build_fusion(load_fusion_config(CONFIGS / name))
        assert not any(n.startswith("tags.") for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="tags.placement must be text or region"):
        TagConfig(placement="both")


# ------------------------------------------------------------------------------------------------------- the tagger


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("tags") / "corpus.txt"
    corpus.write_text("a red circle and a blue square\na small green star\n" * 20)
    return Tokenizer.train([corpus], 60, min_frequency=1)


def test_tags_name_the_most_probable_classes_and_attributes(tokenizer):
    classes, attributes = ["circle", "square", "traffic_light"], ["red", "blue", "small"]
    tagger = RegionTagger(classes, attributes, tokenizer, TagConfig(classes=1, attributes=2, min_probability=0.1))
    record = {
        "object_ids": np.array([0, 2]), "object_conf": np.array([0.8, 0.05], np.float32),
        "object_probs": np.array([[0.8, 0.15, 0.05], [0.1, 0.2, 0.7]], np.float16),
        "attr_ids": np.array([0, 2]), "attr_conf": np.array([0.9, 0.6], np.float32),
        "attr_probs": np.array([[0.9, 0.05, 0.5], [0.2, 0.3, 0.6]], np.float16),
    }
    ids, weights = tagger(record, 2)
    assert ids.shape == weights.shape == (2, tagger.width) and tagger.width == 3 * tagger.pieces

    def named(row: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, weight in zip(tokenizer.convert_ids_to_tokens(ids[row].tolist()), weights[row].tolist()):
            if weight > 0:
                out[token] = out.get(token, 0.0) + weight
        return out

    first = named(0)  # a confident circle, red and small; "blue" (0.05) is below min_probability
    assert set(first) == {"circle", "red", "small"}
    assert first["circle"] == pytest.approx(0.8, abs=2e-3) and first["red"] == pytest.approx(0.9, abs=2e-3)
    # the second box is barely an object (P(foreground) = 0.05 / 0.7): its names weigh little, and those below
    # min_probability are left out
    second = named(1)
    assert sum(second.values()) < 0.15
    probs, foreground = class_probabilities(record, 2, 3)
    np.testing.assert_allclose(foreground, [1.0, 0.05 / 0.7], rtol=1e-3)
    np.testing.assert_allclose(probs[0], [0.8, 0.15, 0.05], rtol=1e-3)


def test_multi_piece_names_share_their_weight_and_argmax_only_records_work(tokenizer):
    tagger = RegionTagger(["traffic light"], ["red"], tokenizer, TagConfig(classes=1, attributes=1))
    record = {"object_ids": np.array([0]), "object_conf": np.array([0.5], np.float32),
              "attr_ids": np.array([0]), "attr_conf": np.array([0.8], np.float32)}  # no distributions stored
    ids, weights = tagger(record, 1)
    pieces = [i for i in ids[0, :tagger.pieces].tolist() if i != tokenizer.pad_id]
    assert len(pieces) > 1  # "traffic light" is several pieces of this small vocabulary
    assert weights[0, :tagger.pieces].sum() == pytest.approx(0.5)
    assert weights[0, tagger.pieces:].sum() == pytest.approx(0.8 * 0.5)  # its attribute, times P(object)
    with pytest.raises(UserError, match="model.tags needs the detector's class and attribute names"):
        RegionTagger.for_store(type("Store", (), {"meta": {}, "root": "s"})(), tokenizer, TagConfig())


def test_region_masking_hides_the_tags_and_unmasking_restores_them():
    cfg = tagged_config("uniter-tiny.yaml", "text")
    batch = with_tags(fusion_batch(cfg, [6, 6, 6, 6], [5, 5, 5, 5]), cfg)
    vocab = MaskingVocab(cfg.text.vocab_size, 4, (0, 1, 2, 3, 4))
    masked = prepare_vl_batch(batch, VLMaskingConfig(mrm_probability=0.4), vocab, torch.Generator().manual_seed(0),
                              VLBatchPlan(mask_regions=True))
    hidden = masked["mrm_mask"]
    assert hidden.any()
    assert (masked["region_tag_weights"][hidden] == 0).all()
    torch.testing.assert_close(masked["region_tag_weights"][~hidden], batch["region_tag_weights"][~hidden])
    torch.testing.assert_close(unmask_batch(masked)["region_tag_weights"], batch["region_tag_weights"])
