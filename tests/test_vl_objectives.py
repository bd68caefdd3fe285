"""VL pretraining objectives and the collator-side masking they rely on.

Masking statistics, finite named losses, gradient flow (own head + fusion, nothing on unused heads), a fixed-seed
overfit run per objective, the IPOT plan of WRA, and hard-negative mining against brute force. Parametrised over
the tiny single-stream (UNITER) and dual-stream (LXMERT) configs.
"""

from __future__ import annotations

import math

import pytest
import torch

from vl.data.vl_masking import (
    IGNORE_INDEX,
    MaskingVocab,
    VLBatchPlan,
    VLMaskingConfig,
    concat_batches,
    grounded_token_ids,
    make_itm_negatives,
    mask_region_features,
    mask_text_tokens,
    prepare_vl_batch,
    unmask_batch,
)
from vl.errors import UserError
from vl.fusion import build_fusion, load_fusion_config
from vl.fusion.pretraining import HeadsConfig, VLPretrainingModel
from vl.objectives import OBJECTIVE_REGISTRY, build_objective
from vl.objectives.itm import (hardest_wrong_pairs, match_scores, mine_hard_negatives, pair_batch, sampled_wrong_pairs,
                              score_all_pairs)
from support import (CONFIGS, VOCAB, make_model,
                     pretraining_batch)
from vl.objectives.wra import WordRegionAlignment, cosine_cost, ipot_plan, ot_distance

FAMILIES = {"single_stream": "uniter-tiny.yaml", "dual_stream": "lxmert-tiny.yaml"}
OBJECTIVES = list(OBJECTIVE_REGISTRY)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def prepared_batch(objective: torch.nn.Module, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    cfg = VLMaskingConfig(**overrides)
    plan = VLBatchPlan.for_objectives([objective])
    return prepare_vl_batch(pretraining_batch(seed=seed), cfg, VOCAB, torch.Generator().manual_seed(seed + 1), plan)


# ----------------------------------------------------------------------------------------------- masking


def test_text_masking_rate_and_80_10_10_never_specials_or_padding():
    batch = pretraining_batch(batch_size=64, text_len=40, vocab_size=5000)
    vocab = MaskingVocab(5000, 4, (0, 1, 2, 3, 4))
    gen = torch.Generator().manual_seed(0)
    candidates = batch["attention_mask"].bool() & (batch["input_ids"] > 4)
    selected = masked = randomised = kept = total = 0
    for _ in range(30):
        ids, labels = mask_text_tokens(batch["input_ids"], batch["attention_mask"], vocab, gen, 0.15,
                                       ensure_one_masked=False)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~candidates).any(), "a special token or padding was selected"
        assert torch.equal(labels[chosen], batch["input_ids"][chosen])
        assert torch.equal(ids[~chosen], batch["input_ids"][~chosen]), "an unselected token changed"
        assert not torch.isin(ids[chosen & (ids != 4)], torch.tensor([0, 1, 2, 3])).any(), "random token is special"
        selected += int(chosen.sum())
        total += int(candidates.sum())
        masked += int((chosen & (ids == 4)).sum())
        kept += int((chosen & (ids == batch["input_ids"])).sum())
        randomised += int((chosen & (ids != 4) & (ids != batch["input_ids"])).sum())
    assert abs(selected / total - 0.15) < 0.01
    assert abs(masked / selected - 0.8) < 0.02
    assert abs(randomised / selected - 0.1) < 0.015
    assert abs(kept / selected - 0.1) < 0.015


def test_every_sample_chosen_for_masking_gets_at_least_one_token_and_region():
    batch = pretraining_batch(batch_size=32, text_len=6, num_regions=4)
    gen = torch.Generator().manual_seed(1)
    _, labels = mask_text_tokens(batch["input_ids"], batch["attention_mask"], VOCAB, gen, probability=0.01)
    assert ((labels != IGNORE_INDEX).sum(dim=1) >= 1).all()
    _, mrm_mask = mask_region_features(batch["region_feats"], batch["region_mask"], gen, probability=0.01)
    assert (mrm_mask.sum(dim=1) >= 1).all()
    assert not (mrm_mask & ~batch["region_mask"].bool()).any()


def test_region_masking_rate_zeroes_features_and_keeps_targets():
    cfg = VLMaskingConfig(ensure_one_masked=False)
    plan = VLBatchPlan(mask_regions=True)
    gen = torch.Generator().manual_seed(0)
    selected = total = 0
    for seed in range(40):
        batch = pretraining_batch(batch_size=32, num_regions=20, seed=seed)
        out = prepare_vl_batch(batch, cfg, VOCAB, gen, plan)
        mrm = out["mrm_mask"]
        assert not (mrm & ~batch["region_mask"].bool()).any(), "a padded region was masked"
        assert (out["region_feats"][mrm] == 0).all(), "masked features are not zeroed"
        assert torch.equal(out["region_feats"][~mrm], batch["region_feats"][~mrm])
        assert torch.equal(out["region_boxes"], batch["region_boxes"]), "boxes must be kept"
        assert torch.equal(out["mrm_feat_targets"], batch["region_feats"])
        assert torch.equal(out["mrm_class_targets"][mrm], batch["region_class_probs"].argmax(-1)[mrm])
        assert (out["mrm_class_targets"][~mrm] == IGNORE_INDEX).all()
        assert torch.equal(out["mrm_class_probs"], batch["region_class_probs"])
        assert torch.equal(out["input_ids"], batch["input_ids"]) and "mlm_labels" not in out
        selected += int(mrm.sum())
        total += int(batch["region_mask"].sum())
    assert abs(selected / total - 0.15) < 0.015


def test_conditional_masking_masks_one_modality_per_sample_and_never_negatives():
    cfg = VLMaskingConfig(itm_negative_ratio=0.5, itm_negative_swap="either")
    plan = VLBatchPlan(mask_text=True, mask_regions=True, itm_negatives=True)
    gen = torch.Generator().manual_seed(0)
    text_samples = region_samples = negatives = samples = 0
    for seed in range(30):
        batch = pretraining_batch(batch_size=16, seed=seed)
        batch["image_ids"] = torch.arange(16) + 100 * seed
        out = prepare_vl_batch(batch, cfg, VOCAB, gen, plan)
        text_masked = (out["mlm_labels"] != IGNORE_INDEX).any(dim=1)
        region_masked = out["mrm_mask"].any(dim=1)
        negative = out["itm_labels"] == 0
        assert not (text_masked & region_masked).any(), "a sample has both modalities masked"
        assert not (text_masked | region_masked)[negative].any(), "a mismatched pair has masking targets"
        assert (out["mrm_class_targets"][negative] == IGNORE_INDEX).all()
        assert (text_masked | region_masked)[~negative].all(), "a matched pair was left unmasked"
        # a sample with masked text keeps its regions intact, and vice versa
        assert torch.equal(out["region_feats"][text_masked], out["mrm_feat_targets"][text_masked])
        assert (out["mlm_labels"][region_masked] == IGNORE_INDEX).all()
        text_samples += int(text_masked.sum())
        region_samples += int(region_masked.sum())
        negatives += int(negative.sum())
        samples += 16
    assert negatives == samples // 2
    assert abs(text_samples / (text_samples + region_samples) - 0.5) < 0.08


def test_itm_negatives_swap_regions_or_text_from_another_sample():
    batch = pretraining_batch(batch_size=10)
    gen = torch.Generator().manual_seed(3)
    out = make_itm_negatives(batch, gen, negative_ratio=0.3, swap="regions")
    negative = out["itm_labels"] == 0
    assert int(negative.sum()) == 3
    assert torch.equal(out["input_ids"], batch["input_ids"]), "swap=regions must keep every caption"
    for row in range(10):
        same = torch.equal(out["region_feats"][row], batch["region_feats"][row])
        assert same != bool(negative[row])
        if negative[row]:  # the regions come, whole, from one other sample
            donors = [j for j in range(10) if torch.equal(out["region_feats"][row], batch["region_feats"][j])]
            assert len(donors) == 1 and donors[0] != row
            donor = donors[0]
            for key in ("region_boxes", "region_mask", "region_class_probs"):
                assert torch.equal(out[key][row], batch[key][donor])
    out = make_itm_negatives(batch, gen, negative_ratio=0.5, swap="text")
    negative = out["itm_labels"] == 0
    assert torch.equal(out["region_feats"], batch["region_feats"])
    changed = (out["input_ids"] != batch["input_ids"]).any(dim=1)
    assert torch.equal(changed, negative)


def test_itm_negative_of_the_same_image_stays_matched_and_masked_batches_are_refused():
    batch = pretraining_batch(batch_size=6)
    batch["image_ids"] = torch.zeros(6, dtype=torch.long)  # six captions of one image
    out = make_itm_negatives(batch, torch.Generator().manual_seed(0), negative_ratio=1.0, swap="text")
    assert (out["itm_labels"] == 1).all()
    masked = prepare_vl_batch(pretraining_batch(), VLMaskingConfig(), VOCAB, torch.Generator().manual_seed(0),
                              VLBatchPlan(mask_text=True))
    with pytest.raises(UserError, match="already masked"):
        make_itm_negatives(masked, torch.Generator().manual_seed(0))
    restored = unmask_batch(masked)
    assert torch.equal(restored["input_ids"], pretraining_batch()["input_ids"]) and "mlm_labels" not in restored


def test_preparation_is_deterministic_given_the_generator():
    cfg = VLMaskingConfig()
    plan = VLBatchPlan(mask_text=True, mask_regions=True, itm_negatives=True)
    first = prepare_vl_batch(pretraining_batch(), cfg, VOCAB, torch.Generator().manual_seed(7), plan)
    second = prepare_vl_batch(pretraining_batch(), cfg, VOCAB, torch.Generator().manual_seed(7), plan)
    third = prepare_vl_batch(pretraining_batch(), cfg, VOCAB, torch.Generator().manual_seed(8), plan)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], third[key]) for key in first)


def test_masking_vocab_from_the_project_tokenizer():
    from vl.text.tokenizer import Tokenizer

    words = ["a", "red", "circle", "blue", "square"]
    tokenizer = Tokenizer({token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                        *words])})
    vocab = MaskingVocab.from_tokenizer(tokenizer)
    assert vocab == MaskingVocab(10, tokenizer.mask_id, (0, 1, 2, 3, 4))


def test_grounded_tokens_are_the_detector_names_and_their_plurals_that_are_one_token():
    from vl.text.tokenizer import Tokenizer

    words = ["a", "red", "circle", "circles", "box", "boxes", "tennis", "racket", "##s", "blue"]
    tokenizer = Tokenizer({token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                        *words])})
    # "tennis racket" gives both words; "rackets" is two pieces (racket ##s) and stays out; "star" is unknown
    ids = grounded_token_ids(tokenizer, ["circle", "Box", "tennis racket", "red", "star"])
    assert tokenizer.convert_ids_to_tokens(ids) == ["red", "circle", "circles", "box", "boxes", "tennis", "racket"]


def test_grounded_probability_masks_the_grounded_tokens_at_their_own_rate():
    batch = pretraining_batch(batch_size=64, text_len=40, vocab_size=40)
    grounded = (10, 11, 12)
    vocab = MaskingVocab(40, 4, (0, 1, 2, 3, 4), grounded)
    candidates = batch["attention_mask"].bool() & (batch["input_ids"] > 4)
    is_grounded = candidates & torch.isin(batch["input_ids"], torch.tensor(grounded))
    assert is_grounded.sum() > 100 and (candidates & ~is_grounded).sum() > 1000
    gen = torch.Generator().manual_seed(0)
    _, labels = mask_text_tokens(batch["input_ids"], batch["attention_mask"], vocab, gen, probability=0.0,
                                 ensure_one_masked=False, grounded_probability=1.0)
    assert torch.equal(labels != IGNORE_INDEX, is_grounded), "exactly the grounded tokens are selected"
    hits = {True: 0, False: 0}
    for _ in range(20):
        _, labels = mask_text_tokens(batch["input_ids"], batch["attention_mask"], vocab, gen, probability=0.15,
                                     ensure_one_masked=False, grounded_probability=0.5)
        chosen = labels != IGNORE_INDEX
        hits[True] += int((chosen & is_grounded).sum())
        hits[False] += int((chosen & candidates & ~is_grounded).sum())
    assert abs(hits[True] / (20 * is_grounded.sum()) - 0.5) < 0.04
    assert abs(hits[False] / (20 * (candidates & ~is_grounded).sum()) - 0.15) < 0.01
    # unset, grounded tokens are ordinary: the same draws as without grounded ids
    plain = mask_text_tokens(batch["input_ids"], batch["attention_mask"], MaskingVocab(40, 4, (0, 1, 2, 3, 4)),
                             torch.Generator().manual_seed(3))
    unset = mask_text_tokens(batch["input_ids"], batch["attention_mask"], vocab, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(plain, unset))


def test_wra_runs_in_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    text, regions = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 4, 32, generator=gen)
    valid_text, valid_regions = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    reference, _ = ot_distance(text, regions, valid_text, valid_regions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance, plan = ot_distance(text, regions, valid_text, valid_regions)
    assert distance.dtype == torch.float32 and plan.dtype == torch.float32
    torch.testing.assert_close(distance, reference)


def test_masking_config_and_batch_errors():
    with pytest.raises(ValueError, match="mlm_probability"):
        VLMaskingConfig(mlm_probability=1.5)
    with pytest.raises(ValueError, match="itm_negative_swap"):
        VLMaskingConfig(itm_negative_swap="captions")
    with pytest.raises(ValueError, match="grounded_probability"):
        VLMaskingConfig(grounded_probability=-0.1)
    with pytest.raises(UserError, match="region_feats"):
        prepare_vl_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, VLMaskingConfig(), VOCAB,
                         torch.Generator(), VLBatchPlan(mask_text=True))


def test_batch_plan_follows_the_objectives():
    model = make_model(FAMILIES["single_stream"])
    objectives = [build_objective(name, model) for name in ("mlm", "mrfr")]
    assert VLBatchPlan.for_objectives(objectives) == VLBatchPlan(True, True, False)
    itm = build_objective("itm", model)
    assert VLBatchPlan.for_objectives([itm]) == VLBatchPlan(False, False, True)


# -------------------------------------------------------------------------------------------- objectives


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_returns_its_named_finite_scalar_loss(family, name):
    model = make_model(FAMILIES[family], dropout=0.1)
    objective = build_objective(name, model)
    batch = prepared_batch(objective)
    losses = objective(model(batch), batch)
    assert list(losses) == [name]
    assert losses[name].dim() == 0 and torch.isfinite(losses[name])
    assert losses[name].requires_grad


@pytest.mark.parametrize("name", ["mlm", "mrc", "mrc_kl", "mrfr", "qa"])
def test_objectives_without_targets_give_a_zero_loss(name):
    model = make_model(FAMILIES["dual_stream"])
    objective = build_objective(name, model)
    batch = pretraining_batch()
    batch.update(mlm_labels=torch.full_like(batch["input_ids"], IGNORE_INDEX),
                 mrm_mask=torch.zeros(8, 10, dtype=torch.bool),
                 mrm_class_targets=torch.full((8, 10), IGNORE_INDEX), mrm_feat_targets=batch["region_feats"],
                 mrm_class_probs=batch["region_class_probs"], has_answer=torch.zeros(8, dtype=torch.bool))
    loss = objective(model(batch), batch)[name]
    assert loss.item() == 0.0
    loss.backward()  # stays in the graph: DDP sees every parameter


def _used_parameters(model: VLPretrainingModel, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The head parameters objective ``name`` must train (not counting weights shared with the fusion model)."""
    heads = model.heads
    if name == "mlm":
        return [(f"mlm.{n}", p) for n, p in heads.mlm.named_parameters() if n != "decoder.weight"]
    if name in ("mrc", "mrc_kl", "mrfr"):
        decoder = "feat" if name == "mrfr" else "obj"
        return ([(f"region.transform.{n}", p) for n, p in heads.region.transform.named_parameters()]
                + [(f"region.decoders.{decoder}.{n}", p) for n, p in heads.region.decoders[decoder].named_parameters()])
    if name == "itm":
        return list(heads.itm.named_parameters(prefix="itm"))
    if name == "qa":
        return list(heads.answer.named_parameters(prefix="answer"))
    return []  # wra has no head


GRADIENT_CASES = [(config, name) for config in [*FAMILIES.values(), "vilbert-tiny.yaml"] for name in OBJECTIVES
                  if not (config == "vilbert-tiny.yaml" and name == "wra")]  # ViLBERT's widths differ: no WRA


@pytest.mark.parametrize(("config", "name"), GRADIENT_CASES)
def test_gradients_reach_own_head_and_fusion_and_no_other_head(config, name):
    model = make_model(config)
    objective = build_objective(name, model)
    batch = prepared_batch(objective)
    model.zero_grad(set_to_none=True)
    objective(model(batch), batch)[name].backward()

    used = _used_parameters(model, name)
    for param_name, param in used:
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}: no gradient on {param_name}"
    fusion = model.fusion
    for part in ("text_embeddings", "region_embeddings"):
        grads = [p.grad for p in getattr(fusion, part).parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, f"{name}: no gradient reaches fusion.{part}"

    fusion_ids = {id(p) for p in fusion.parameters()}
    used_ids = {id(p) for _, p in used}
    for param_name, param in model.heads.named_parameters():
        if id(param) in fusion_ids or id(param) in used_ids:
            continue
        assert param.grad is None or param.grad.abs().sum() == 0, f"{name}: gradient leaked into {param_name}"


@pytest.mark.parametrize("name", OBJECTIVES)
def test_fixed_seed_overfit_drives_each_loss_down(family, name):
    model = make_model(FAMILIES[family], seed=1)
    objective = build_objective(name, model)
    batch = prepared_batch(objective, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        loss = objective(model(batch), batch)[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if name == "wra":  # a signed distance in [-2, 2]: matched pairs pulled together, mismatched pushed apart
        assert losses[-1] < losses[0] - 0.2, losses
    else:
        assert losses[-1] < 0.5 * losses[0], losses


def test_build_objective_errors_name_the_problem():
    model = make_model(FAMILIES["single_stream"])
    with pytest.raises(UserError, match="no option gamma"):
        build_objective("mrfr", model, {"gamma": 1})
    with pytest.raises(UserError, match="not one of"):
        build_objective("nsp_vl", model)
    with pytest.raises(UserError, match="smooth_l1"):
        build_objective("mrfr", model, {"loss": "l1"})
    visualbert = load_fusion_config(CONFIGS / "visualbert-tiny.yaml")
    bare = VLPretrainingModel(build_fusion(visualbert), HeadsConfig(region_outputs={}, num_answers=0))
    with pytest.raises(UserError, match="heads.region"):
        build_objective("mrc", bare)
    with pytest.raises(UserError, match="heads.answer"):
        build_objective("qa", bare)
    vilbert = VLPretrainingModel(build_fusion(load_fusion_config(CONFIGS / "vilbert-tiny.yaml")))
    with pytest.raises(UserError, match="equal widths"):
        build_objective("wra", vilbert)
    with pytest.raises(UserError, match="mlm_labels"):
        build_objective("mlm", model)(model(pretraining_batch()), pretraining_batch())


def test_objective_options_and_their_heads():
    model = make_model(FAMILIES["dual_stream"])
    mrfr = build_objective("mrfr", model, {"loss": "smooth_l1"})
    itm = build_objective("itm", model, {"hard_negatives": 2})
    wra = build_objective("wra", model, {"beta": 0.2, "iterations": 20})
    assert mrfr.loss == "smooth_l1" and itm.hard_negatives == 2 and wra.beta == 0.2 and wra.iterations == 20
    assert mrfr.head is model.heads.region and itm.head is model.heads.itm  # heads live in the model only


# ---------------------------------------------------------------------------------------------------- WRA


def test_ipot_plan_has_the_uniform_marginals_and_ignores_padding():
    gen = torch.Generator().manual_seed(0)
    text, regions = torch.randn(3, 7, 16, generator=gen), torch.randn(3, 5, 16, generator=gen)
    text_valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] + [1] * 6]).bool()
    region_valid = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5]).bool()
    cost = cosine_cost(text, regions)
    plan = ipot_plan(cost, text_valid, region_valid, beta=0.5, iterations=50)
    assert plan.shape == (3, 7, 5)
    assert (plan >= 0).all()
    assert (plan[~text_valid] == 0).all() and (plan.transpose(1, 2)[~region_valid] == 0).all()
    text_marginal = text_valid.float() / text_valid.sum(1, keepdim=True)
    region_marginal = region_valid.float() / region_valid.sum(1, keepdim=True)
    torch.testing.assert_close(plan.sum(dim=1), region_marginal, atol=1e-6, rtol=0)  # exact after the last step
    torch.testing.assert_close(plan.sum(dim=2), text_marginal, atol=1e-3, rtol=0)  # converging
    torch.testing.assert_close(plan.sum(dim=(1, 2)), torch.ones(3), atol=1e-6, rtol=0)
    longer = ipot_plan(cost, text_valid, region_valid, beta=0.5, iterations=400)
    error, longer_error = ((p.sum(dim=2) - text_marginal).abs().max() for p in (plan, longer))
    assert longer_error < error / 10 and longer_error < 1e-5


def test_ot_distance_is_lower_for_aligned_than_for_shuffled_pairs():
    gen = torch.Generator().manual_seed(0)
    words = torch.randn(6, 8, 32, generator=gen)  # (B, M, H)
    permutation = torch.randperm(8, generator=gen)
    regions = words[:, permutation] + 0.05 * torch.randn(6, 8, 32, generator=gen)  # each word has its region
    valid = torch.ones(6, 8, dtype=torch.bool)
    aligned, plan = ot_distance(words, regions, valid, valid, beta=0.1, iterations=100)
    shuffled, _ = ot_distance(words, regions.roll(1, dims=0), valid, valid, beta=0.1, iterations=100)
    assert (aligned < 0.1).all() and (shuffled > 0.5).all(), (aligned, shuffled)
    # the plan sends each word to its own region
    assert torch.equal(plan.argmax(dim=2), permutation.argsort().expand(6, -1))


def test_wra_loss_signs_matched_and_mismatched_pairs_and_padding_does_not_matter():
    gen = torch.Generator().manual_seed(0)
    text_hidden, region_hidden = torch.randn(4, 6, 32, generator=gen), torch.randn(4, 5, 32, generator=gen)
    output = type("Out", (), {"text_hidden": text_hidden, "region_hidden": region_hidden})()
    batch = {"attention_mask": torch.ones(4, 6), "region_mask": torch.ones(4, 5),
             "itm_labels": torch.tensor([1, 1, 0, 0])}
    wra = WordRegionAlignment(32, 32)
    distance, _ = ot_distance(text_hidden, region_hidden, torch.ones(4, 6).bool().index_fill(1, torch.tensor(0), False),
                              torch.ones(4, 5).bool())
    expected = (distance[:2].sum() - distance[2:].sum()) / 4
    torch.testing.assert_close(wra(output, batch)["wra"], expected)
    # extra padded tokens / regions with garbage values change nothing
    padded = type("Out", (), {"text_hidden": torch.cat([text_hidden, 9 * torch.ones(4, 2, 32)], 1),
                              "region_hidden": torch.cat([region_hidden, -9 * torch.ones(4, 3, 32)], 1)})()
    padded_batch = dict(batch, attention_mask=torch.cat([torch.ones(4, 6), torch.zeros(4, 2)], 1),
                        region_mask=torch.cat([torch.ones(4, 5), torch.zeros(4, 3)], 1))
    torch.testing.assert_close(wra(padded, padded_batch)["wra"], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- hard negatives


def _brute_force_scores(model, itm_head, batch) -> torch.Tensor:
    """Score every pair one at a time (batch of one), the slow way."""
    size = batch["input_ids"].shape[0]
    scores = torch.empty(size, size)
    model.eval()
    with torch.no_grad():
        for i in range(size):
            for j in range(size):
                pair = pair_batch(batch, torch.tensor([i]), torch.tensor([j]))
                scores[i, j] = match_scores(itm_head, model(pair))[0]
    return scores


def test_mined_hard_negatives_are_the_highest_scoring_wrong_pairs(family):
    model = make_model(FAMILIES[family], seed=2, dropout=0.1)
    batch = prepared_batch(build_objective("mlm", model), seed=5)  # mining must see through the masking
    batch["itm_labels"] = torch.ones(8, dtype=torch.long)
    inputs = {k: v for k, v in unmask_batch(batch).items()
              if k in ("input_ids", "attention_mask", "token_type_ids") or k.startswith("region_")}
    model.train()
    scores = score_all_pairs(model, model.heads.itm, batch, chunk_size=10)
    assert model.training, "score_all_pairs must restore training mode"
    brute = _brute_force_scores(model, model.heads.itm, inputs)
    torch.testing.assert_close(scores, brute, atol=1e-4, rtol=1e-4)

    k = 2
    mined = mine_hard_negatives(model, model.heads.itm, batch, k)
    assert set(mined) == set(batch)
    assert (mined["itm_labels"] == 0).all() and mined["input_ids"].shape[0] == 8 * k
    assert (mined["mlm_labels"] == IGNORE_INDEX).all() and not mined["has_answer"].any()
    for i in range(8):
        wrong = [j for j in range(8) if j != i]
        expected = sorted(wrong, key=lambda j: -brute[i, j].item())[:k]
        for rank, j in enumerate(expected):
            row = i * k + rank
            assert torch.equal(mined["input_ids"][row], inputs["input_ids"][i])  # unmasked caption i
            assert torch.equal(mined["region_feats"][row], inputs["region_feats"][j])  # regions j
            assert torch.equal(mined["region_mask"][row], inputs["region_mask"][j])
    combined = concat_batches([batch, mined])
    assert combined["input_ids"].shape[0] == 8 + 8 * k
    itm = build_objective("itm", model)
    assert torch.isfinite(itm(model(combined), combined)["itm"])


def test_hardest_wrong_pairs_per_image_and_excluding_same_image_pairs():
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0],
                           [2.0, 9.0, 7.0, 8.0],
                           [6.0, 4.0, 9.0, 0.0],
                           [1.0, 0.5, 0.2, 9.0]])
    assert hardest_wrong_pairs(scores, 1, "text").tolist() == [[0, 2], [1, 3], [2, 0], [3, 0]]
    assert hardest_wrong_pairs(scores, 2, "regions").tolist() == [[2, 0], [1, 0], [2, 1], [0, 1],
                                                                  [1, 2], [0, 2], [1, 3], [0, 3]]
    same_image = torch.tensor([0, 1, 1, 2])  # captions 1 and 2 describe the same image
    assert hardest_wrong_pairs(scores, 1, "text", same_image).tolist() == [[0, 2], [1, 3], [2, 0], [3, 0]]
    assert hardest_wrong_pairs(scores, 3, "text", same_image).tolist()[3:5] == [[1, 3], [1, 0]]
    with pytest.raises(UserError, match="B - 1"):
        hardest_wrong_pairs(scores, 4)


def test_sampled_wrong_pairs_follow_the_softmax_and_never_pick_a_matched_pair():
    torch.manual_seed(0)
    same_image = torch.tensor([0, 1, 1, 2])  # captions 1 and 2 describe the same image
    logits = torch.tensor([[0.0, 0.0, math.log(3.0), -1e4],  # caption 0: images 1 and 2 at 1:3, image 3 never
                           [0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0]])
    counts = torch.zeros(4)
    for _ in range(2000):
        pairs = sampled_wrong_pairs(logits, 1, "text", same_image)
        assert len(pairs) == 4 and all(same_image[c] != same_image[i] for c, i in pairs.tolist())
        counts[pairs[0, 1]] += 1
    assert counts[0] == 0 and counts[3] == 0  # the matched image, and one with probability ~0
    assert abs(counts[2] / 2000 - 0.75) < 0.04
    both = sampled_wrong_pairs(logits, 2, "regions", same_image)  # each image: 2 distinct wrong captions
    assert len(both) == 8 and len({tuple(row) for row in both.tolist()}) == 8
