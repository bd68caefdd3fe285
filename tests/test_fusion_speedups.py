"""Speed paths of the fusion models give the numbers of the plain computation.

- The last layer computed at the rows the heads read only (``OutputRows`` / ``head_rows``): the same losses and
  gradients as the full forward pass, for every family, with padding in both modalities, hard negatives and
  batches without masked positions.
- The cheaper dropout mask: its drop rate, scaling, backward and evaluation mode.
"""

from __future__ import annotations


import pytest
import torch

from vl.data.vl_masking import VLBatchPlan, VLMaskingConfig, prepare_vl_batch
from vl.encoders.cpu_kernels import Dropout
from vl.encoders.transformer import TransformerEncoder, row_positions
from vl.fusion import build_fusion, load_fusion_config
from vl.fusion.base import OutputRows
from vl.fusion.pretraining import HeadsConfig, VLPretrainingModel, head_rows
from vl.objectives import build_objective
from vl.train.pretrainer import VLPretrainer

from support import CONFIGS, FEATURE_DIM, NUM_ANSWERS, NUM_CLASSES, VOCAB, pretraining_batch

CASES = {
    "uniter-tiny.yaml": ("mlm", "mrc", "mrc_kl", "mrfr", "itm"),
    "visualbert-tiny.yaml": ("mlm", "itm"),
    "lxmert-tiny.yaml": ("mlm", "mrc", "mrfr", "itm", "qa"),
    "vilbert-tiny.yaml": ("mlm", "mrc_kl", "itm"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_pretrainer(config: str, names: tuple[str, ...], restrict_rows: bool, **cross) -> VLPretrainer:
    path = CONFIGS / config
    overrides = ["model.text.dropout=0.0", "model.text.attn_dropout=0.0"]
    overrides += [f"model.cross.{key}={value}" for key, value in cross.items()]
    cfg = load_fusion_config(path, overrides)
    heads = HeadsConfig(region_outputs={"obj": NUM_CLASSES, "feat": FEATURE_DIM}, num_answers=NUM_ANSWERS)
    torch.manual_seed(0)
    model = VLPretrainingModel(build_fusion(cfg), heads)
    objectives = {name: build_objective(name, model, {"loss": "smooth_l1"} if name == "mrfr" else {})
                  for name in names}
    return VLPretrainer(model, objectives, {"all": names}, restrict_rows=restrict_rows)


def prepared(names: tuple[str, ...], pretrainer: VLPretrainer, seed: int = 0) -> dict:
    plan = VLBatchPlan.for_objectives([pretrainer.objectives[name] for name in names])
    batch = prepare_vl_batch(pretraining_batch(seed=seed), VLMaskingConfig(), VOCAB,
                             torch.Generator().manual_seed(seed + 1), plan)
    return {**batch, "task": "all"}


def losses_and_grads(pretrainer: VLPretrainer, batch: dict) -> tuple[dict, dict]:
    pretrainer.zero_grad(set_to_none=True)
    losses = pretrainer(batch)
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in pretrainer.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("config", list(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_last_layer_at_head_rows_gives_the_full_losses_and_gradients(config, mode):
    names = CASES[config]
    full = make_pretrainer(config, names, restrict_rows=False)
    fast = make_pretrainer(config, names, restrict_rows=True)
    fast.load_state_dict(full.state_dict())
    full.train(mode == "train")
    fast.train(mode == "train")
    batch = prepared(names, full)
    rows = head_rows(batch, names)
    assert rows is not None and 0 < int(rows.text.sum()) < rows.text.numel()
    expected_losses, expected_grads = losses_and_grads(full, batch)
    got_losses, got_grads = losses_and_grads(fast, batch)
    assert set(got_losses) == set(expected_losses) == {name for name in names}
    for name in names:
        torch.testing.assert_close(got_losses[name], expected_losses[name], rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cross", [{"num_layers": 0}, {"num_layers": 1}])
def test_lxmert_with_no_or_one_cross_layer_and_rows_matches_full(cross):
    names = CASES["lxmert-tiny.yaml"]
    full = make_pretrainer("lxmert-tiny.yaml", names, restrict_rows=False, **cross)
    fast = make_pretrainer("lxmert-tiny.yaml", names, restrict_rows=True, **cross)
    fast.load_state_dict(full.state_dict())
    batch = prepared(names, full, seed=2)
    expected_losses, expected_grads = losses_and_grads(full, batch)
    got_losses, got_grads = losses_and_grads(fast, batch)
    for name in names:
        torch.testing.assert_close(got_losses[name], expected_losses[name], rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rows_without_masked_positions_and_exact_hidden_states_at_the_rows():
    names = CASES["lxmert-tiny.yaml"]
    pretrainer = make_pretrainer("lxmert-tiny.yaml", names, restrict_rows=True).eval()
    batch = prepared(names, pretrainer)
    fusion = pretrainer.fusion
    full = fusion(batch)
    none = OutputRows(text=torch.zeros_like(batch["input_ids"], dtype=torch.bool),
                      regions=torch.zeros(batch["region_feats"].shape[:2], dtype=torch.bool))
    restricted = fusion(batch, none)  # only [CLS]: the pooled output is still exact
    torch.testing.assert_close(restricted.pooled, full.pooled, rtol=1e-5, atol=1e-6)
    assert restricted.pooled_text is None and restricted.pooled_region is None
    rows = head_rows(batch, names)
    out = fusion(batch, rows)
    text_rows = rows.text.clone()
    text_rows[:, 0] = True
    torch.testing.assert_close(out.text_hidden[text_rows], full.text_hidden[text_rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.region_hidden[rows.regions], full.region_hidden[rows.regions], rtol=1e-5,
                               atol=1e-6)


def test_head_rows_are_none_when_an_objective_may_read_any_row():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "region_feats": torch.zeros(2, 3, 4),
             "mlm_labels": torch.tensor([[-100, 7, -100, -100, -100], [-100] * 5]),
             "mrm_mask": torch.tensor([[True, False, False], [False, False, True]])}
    rows = head_rows(batch, ("mlm", "mrfr", "itm"))
    assert rows.text.tolist() == [[False, True, False, False, False], [False] * 5]
    assert rows.regions.tolist() == [[True, False, False], [False, False, True]]
    assert head_rows(batch, ("mlm", "wra")) is None
    assert head_rows({k: v for k, v in batch.items() if k != "mrm_mask"}, ("mrfr",)) is None
    assert head_rows(batch, ("itm",)).text.sum() == 0


def test_encoder_rows_with_a_causal_mask_and_pre_ln_match_full():
    torch.manual_seed(0)
    encoder = TransformerEncoder(2, 16, 4, 32, dropout=0.0, attn_dropout=0.0, pre_ln=True).eval()
    x = torch.randn(3, 7, 16)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(3, 1, 7, 7)
    rows = torch.rand(3, 7) < 0.4
    rows[1] = False
    full = encoder(x, causal)
    out = encoder(x, causal, rows=rows)
    torch.testing.assert_close(out[rows], full[rows])
    positions = row_positions(rows)
    assert positions.shape == (3, max(int(rows.sum(1).max()), 1))
    assert all(len(set(row.tolist())) == len(row) for row in positions)


def test_dropout_rate_scale_backward_and_eval():
    torch.manual_seed(0)
    dropout = Dropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    odd = torch.randn(3, 5, 7).bfloat16()  # numel not a multiple of 4, bf16
    assert dropout(odd).dtype == torch.bfloat16 and dropout(odd).shape == odd.shape
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_pretraining_with_train_compile_runs_on_cpu(world, tmp_path, precision):
    """``train.compile: true`` trains (fp32 and bf16 autocast) and writes the usual state dict names."""
    from vl.checkpoints.io import load_state_file
    from vl.world.features import write_world_features
    from vl.text.tokenizer import Tokenizer
    from vl.config import load_config
    from vl.train.pretrain_config import VLPretrainConfig
    from vl.train.pretrain_vl import pretrain_vl

    features = write_world_features(world, tmp_path / "store", splits=("train",))
    Tokenizer.train([world.corpus_split("train")], 300).save(tmp_path / "tokenizer")
    cfg = load_config(VLPretrainConfig, CONFIGS / "pretrain-lxmert-tiny.yaml", [
        "train.steps=3", "train.batch_size=8", "train.log_every=1", "data.num_workers=0", "data.shuffle_buffer=16",
        "train.compile=true", f"train.precision='{precision}'"])
    result = pretrain_vl(cfg, tmp_path / "run", str(features), shards=world.shard_pattern("train"),
                         tokenizer_dir=str(tmp_path / "tokenizer"), plot=False)
    assert result.step == 3
    assert all(torch.isfinite(torch.tensor(value)) for row in result.history for value in row.values())
    state = load_state_file(tmp_path / "run" / "model.safetensors")
    assert not any("_orig_mod" in key for key in state) and any(key.startswith("fusion.") for key in state)
