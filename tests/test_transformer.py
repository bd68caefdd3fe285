"""The shared core: mask modes, post-/pre-LN, padding invariance, SDPA equivalence to explicit attention."""

import math

import pytest
import torch

from vl.encoders.text import TextEncoder, TextEncoderConfig
from vl.encoders.transformer import Attention, TransformerLayer, build_attention_mask

TINY = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=32,
            dropout=0.0, attn_dropout=0.0)


def encoder(**overrides):
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(**{**TINY, **overrides})).eval()


def test_mask_shapes_and_semantics():
    pad = torch.tensor([[1, 1, 1, 0]])
    causal = build_attention_mask(pad, "causal")[0, 0]
    assert causal.shape == (4, 4)
    assert causal[1].tolist() == [True, True, False, False]
    assert not causal[2, 3]  # padding key never attended
    prefix = build_attention_mask(None, "prefix", prefix_len=2, seq_len=4)[0, 0]
    assert prefix.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    assert build_attention_mask(None, "bidirectional") is None
    with pytest.raises(ValueError, match="unknown attention mask mode"):
        build_attention_mask(pad, "sideways")


@pytest.mark.parametrize("pre_ln", [False, True])
def test_causal_output_at_t_ignores_later_tokens(pre_ln):
    model = encoder(pre_ln=pre_ln)
    ids = torch.randint(5, 50, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(5, 50, (2, 4))
    with torch.no_grad():
        a = model(ids, mask_mode="causal").hidden
        b = model(changed, mask_mode="causal").hidden
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_bidirectional_output_sees_later_tokens():
    model = encoder()
    ids = torch.randint(5, 50, (2, 10))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 45 + 5
    with torch.no_grad():
        a, b = model(ids).hidden, model(changed).hidden
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_prefix_lm_is_bidirectional_inside_the_prefix_and_causal_after():
    model = encoder()
    prefix_len = torch.tensor([4, 6])
    ids = torch.randint(5, 50, (2, 12))
    with torch.no_grad():
        base = model(ids, mask_mode="prefix", prefix_len=prefix_len).hidden
        # Changing a token after position 8 leaves positions <= 8 unchanged in both samples.
        late = ids.clone()
        late[:, 9:] = torch.randint(5, 50, (2, 3))
        out = model(late, mask_mode="prefix", prefix_len=prefix_len).hidden
        torch.testing.assert_close(base[:, :9], out[:, :9])
        # Changing the last prefix token changes the first token's output (bidirectional prefix).
        inside = ids.clone()
        inside[0, 3] = (inside[0, 3] + 1) % 45 + 5
        inside[1, 5] = (inside[1, 5] + 1) % 45 + 5
        out = model(inside, mask_mode="prefix", prefix_len=prefix_len).hidden
    assert not torch.allclose(base[:, 0], out[:, 0])


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_padding_does_not_change_real_positions(mode):
    model = encoder()
    ids = torch.randint(5, 50, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    with torch.no_grad():
        alone = model(ids, mask_mode=mode).hidden
        with_pad = model(padded, attention_mask=mask, mask_mode=mode).hidden
    torch.testing.assert_close(alone, with_pad[:, :7], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(with_pad).all()


def test_sdpa_attention_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    mask = build_attention_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), "causal")
    with torch.no_grad():
        out = attn(x, attn_mask=mask)
        q = attn.query(x).view(2, 5, 4, 4).transpose(1, 2)
        k = attn.key(x).view(2, 5, 4, 4).transpose(1, 2)
        v = attn.value(x).view(2, 5, 4, 4).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(4)
        scores = scores.masked_fill(~mask, float("-inf"))
        ref = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_post_ln_and_pre_ln_differ_and_both_train():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    for pre_ln in (False, True):
        layer = TransformerLayer(16, 4, 32, dropout=0.0, attn_dropout=0.0, pre_ln=pre_ln)
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.pow(2).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    post = TransformerLayer(16, 4, 32, dropout=0.0, attn_dropout=0.0, pre_ln=False)
    pre = TransformerLayer(16, 4, 32, dropout=0.0, attn_dropout=0.0, pre_ln=True)
    pre.load_state_dict(post.state_dict())
    assert not torch.allclose(post(x), pre(x))


def test_cross_attention_layer_attends_to_context_and_respects_its_padding():
    torch.manual_seed(0)
    layer = TransformerLayer(16, 4, 32, dropout=0.0, attn_dropout=0.0, cross_attention=True, context_dim=24).eval()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 24)
    padded_context = torch.cat([context, torch.randn(2, 2, 24)], dim=1)
    context_mask = torch.tensor([[1, 1, 1, 0, 0]] * 2).bool()[:, None, None, :]
    with torch.no_grad():
        a = layer(x, context=context)
        b = layer(x, context=padded_context, context_mask=context_mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context"):
        layer(x)


def test_encoder_returns_every_layer_and_rejects_long_inputs():
    model = encoder()
    out = model(torch.randint(5, 50, (2, 8)), return_all=True)
    assert len(out.all_hidden) == TINY["num_layers"] + 1
    assert out.pooled.shape == (2, 32)
    with pytest.raises(ValueError, match="max_position"):
        model(torch.randint(5, 50, (1, 40)))


@pytest.mark.parametrize("training", [True, False])  # the explicit CPU attention (under gradient) and SDPA
def test_attention_both_ways_equals_the_two_calls_with_their_gradients(training):
    torch.manual_seed(0)
    attention = Attention(32, 4).train(training)
    a, b = torch.randn(3, 5, 32, requires_grad=True), torch.randn(3, 7, 32, requires_grad=True)
    a_mask = torch.ones(3, 1, 1, 5, dtype=torch.bool)
    b_mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    a_mask[0, ..., 3:] = False
    b_mask[2, ..., 1:] = False
    with torch.set_grad_enabled(training):
        a_out, b_out = attention.both_ways(a, a_mask, b, b_mask)
        a_ref, b_ref = attention(a, b, attn_mask=b_mask), attention(b, a, attn_mask=a_mask)
    torch.testing.assert_close(a_out, a_ref)
    torch.testing.assert_close(b_out, b_ref)
    if not training:
        return
    weights = torch.randn_like(a_out), torch.randn_like(b_out)
    inputs = [a, b, *attention.parameters()]
    ours = torch.autograd.grad((a_out * weights[0]).sum() + (b_out * weights[1]).sum(), inputs)
    reference = torch.autograd.grad((a_ref * weights[0]).sum() + (b_ref * weights[1]).sum(), inputs)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected)
