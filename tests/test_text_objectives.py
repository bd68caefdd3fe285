"""Text pretraining objectives: every objective gives finite losses and gradients on the world's corpus; heads run
only at predicted positions; ELECTRA shares embeddings; LM labels and objective plans are right."""

import dataclasses

import pytest
import torch

from vl.text.corpus import read_documents, tokenize_documents
from vl.text.masking import MaskingConfig
from vl.encoders.text import TextEncoderConfig
from vl.errors import UserError
from vl.text.objectives import (
    ElectraConfig,
    TextPretrainingModel,
    objective_loss_weights,
    plan_objectives,
    sample_tokens,
)
from vl.text.tokenizer import Tokenizer
from vl.text.pretrain import TextDataConfig, TextPretrainConfig, build_text_stream

TINY = TextEncoderConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position=64)


@pytest.fixture(scope="module")
def corpus(world):
    tokenizer = Tokenizer.train([world.corpus_split("train")], 300)
    documents = tokenize_documents(read_documents([world.corpus_split("train")]), tokenizer, progress=False)
    return tokenizer, documents


def batch_for(objectives, corpus, masking=None, batch_size=6):
    tokenizer, documents = corpus
    masking = masking or MaskingConfig()
    cfg = TextPretrainConfig(model=dataclasses.replace(TINY, vocab_size=tokenizer.vocab_size),
                             objectives=objectives, masking=masking, data=TextDataConfig(max_len=48))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))
    stream = build_text_stream(cfg, documents, tokenizer)
    return cfg, next(iter(stream))


@pytest.mark.parametrize("objectives, unit", [
    ({"mlm": 1.0, "sop": 1.0}, "word"),
    ({"mlm": 1.0, "nsp": 1.0}, "token"),
    ({"mlm": 1.0}, "span"),
    ({"electra": 1.0}, "token"),
    ({"clm": 1.0}, "token"),
    ({"prefix_lm": 1.0}, "token"),
])
def test_objective_losses_are_finite_and_train_every_head(objectives, unit, corpus):
    torch.manual_seed(0)
    cfg, batch = batch_for(objectives, corpus, MaskingConfig(unit=unit))
    model = TextPretrainingModel(cfg.model, objectives, ElectraConfig())
    losses = model(batch)
    weights = objective_loss_weights(objectives, ElectraConfig())
    assert set(weights) <= set(losses)
    for name, value in losses.items():
        assert torch.isfinite(value), name
    total = sum(weights[name] * losses[name] for name in weights)
    total.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None and not name.startswith("nsp.")
               and not (name.startswith("mlm.") and "electra" in objectives)
               and not name.startswith("text_encoder.pooler.")]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_mlm_head_runs_only_at_masked_positions(corpus):
    cfg, batch = batch_for({"mlm": 1.0}, corpus)
    model = TextPretrainingModel(cfg.model, {"mlm": 1.0})
    seen = []
    model.mlm.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model(batch)
    assert seen == [((batch["mlm_labels"] != -100).sum().item(), cfg.model.vocab_size)]


def test_electra_generator_shares_embeddings_and_labels_replacements(corpus):
    torch.manual_seed(1)
    cfg, batch = batch_for({"electra": 1.0}, corpus, MaskingConfig(mask_prob=1.0, random_prob=0.0))
    model = TextPretrainingModel(cfg.model, {"electra": 1.0}, ElectraConfig())
    word = model.text_encoder.embeddings.word_embeddings.weight
    assert model.generator.mlm.decoder.weight is word
    assert model.generator.encoder.layers[0].attention.query.out_features == cfg.model.hidden_size // 4
    gen_seen = []
    model.generator.mlm.register_forward_hook(lambda module, inputs, output: gen_seen.append(output.shape[0]))
    losses = model(batch)
    assert gen_seen == [(batch["mlm_labels"] != -100).sum().item()]  # generator logits at masked positions only
    real = batch["attention_mask"].sum().item()
    replaced_max = (batch["mlm_labels"] != -100).sum().item() / real
    assert 0 < losses["replaced_rate"].item() <= replaced_max + 1e-6  # only masked positions can be replaced
    assert losses["disc_baseline_acc"].item() == pytest.approx(1 - losses["replaced_rate"].item())
    assert objective_loss_weights({"electra": 1.0}, ElectraConfig()) == {"gen_mlm": 1.0, "rtd": 50.0}
    assert "generator.encoder.layers.0.attention.query.weight" not in model.bert_state_dict()


def test_gumbel_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    counts = torch.bincount(sample_tokens(logits, generator=torch.Generator().manual_seed(0)), minlength=3)
    assert torch.allclose(counts / 20000.0, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)


def test_causal_and_prefix_lm_labels(corpus):
    _, causal = batch_for({"clm": 1.0}, corpus)
    ids, labels, mask = causal["input_ids"], causal["lm_labels"], causal["attention_mask"]
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        assert torch.equal(labels[row, :length - 1], ids[row, 1:length])
        assert (labels[row, length - 1:] == -100).all()
    _, prefix = batch_for({"prefix_lm": 1.0}, corpus)
    ids, labels, mask = prefix["input_ids"], prefix["lm_labels"], prefix["attention_mask"]
    for row in range(ids.shape[0]):
        length, start = int(mask[row].sum()), int(prefix["prefix_len"][row])
        assert (labels[row, :start - 1] == -100).all()  # the source is read, not predicted
        assert torch.equal(labels[row, start - 1:length - 1], ids[row, start:length])
        assert (prefix["token_type_ids"][row, start:length] == 1).all()


def test_prefix_lm_does_not_see_the_future(corpus):
    cfg, batch = batch_for({"prefix_lm": 1.0}, corpus, batch_size=1)
    model = TextPretrainingModel(cfg.model, {"prefix_lm": 1.0}).eval()
    start = int(batch["prefix_len"][0])
    changed = batch["input_ids"].clone()
    changed[0, -2] = (changed[0, -2] + 1) % cfg.model.vocab_size  # a target token near the end
    kwargs = dict(mask_mode="prefix", prefix_len=batch["prefix_len"])
    before = model.text_encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **kwargs)
    after = model.text_encoder(changed, batch["attention_mask"], batch["token_type_ids"], **kwargs)
    assert torch.allclose(before.hidden[0, :-2], after.hidden[0, :-2], atol=1e-6)
    assert start < batch["input_ids"].shape[1] - 2


def test_objective_plans_reject_incompatible_sets():
    assert plan_objectives({"mlm": 1, "sop": 1}).pairs == "sop"
    with pytest.raises(UserError, match="different inputs"):
        plan_objectives({"mlm": 1, "clm": 1})
    with pytest.raises(UserError, match="nsp and sop"):
        plan_objectives({"mlm": 1, "nsp": 1, "sop": 1})
    with pytest.raises(UserError, match="electra"):
        plan_objectives({"mlm": 1, "electra": 1})
    with pytest.raises(UserError, match="unknown text objective 'mask'"):
        plan_objectives({"mask": 1})
