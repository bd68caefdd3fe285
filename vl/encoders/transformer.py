"""The shared transformer core: BERT-style embeddings, attention, a post-/pre-LN layer, mask modes.

Attention runs on SDPA, except when training on CPU (``vl.encoders.cpu_kernels.attention``); a layer can compute
its output at a subset of rows only (``positions``, ``row_positions``) for callers that read a few positions of
the last layer.

Every model in the project, text-only and vision-language, is built from these blocks. Blocks take their widths
positionally and everything else by keyword; the models that assemble them take their config.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vl.encoders.cpu_kernels import Dropout, attention

MaskMode = Literal["bidirectional", "causal", "prefix"]
MASK_MODES = ("bidirectional", "causal", "prefix")


def activation_fn(name: str):
    """BERT's activations by their Hugging Face names."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_tanh", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu" or name == "swish":
        return F.silu
    raise ValueError(f"unknown activation '{name}' (known: gelu, gelu_new, relu, silu)")


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    mode: MaskMode = "bidirectional",
    prefix_len: torch.Tensor | int | None = None,
    seq_len: int | None = None,
) -> torch.Tensor | None:
    """A boolean mask for ``scaled_dot_product_attention``: True where a query may attend to a key.

    padding_mask: (B, T), 1/True at real tokens, or None for no padding.
    mode: "bidirectional" (BERT), "causal" (GPT) or "prefix" (UniLM: bidirectional over the first ``prefix_len``
        tokens, causal after them; ``prefix_len`` is an int or a (B,) tensor).
    Returns (B, 1, T, T), or None when nothing is masked (which lets SDPA pick its fastest kernel).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown attention mask mode '{mode}' (known: {', '.join(MASK_MODES)})")
    if padding_mask is None and mode == "bidirectional":
        return None
    if padding_mask is not None:
        batch, seq = padding_mask.shape
        device = padding_mask.device
    else:
        if seq_len is None:
            raise ValueError("build_attention_mask needs padding_mask or seq_len")
        batch, seq, device = 1, seq_len, None
        if isinstance(prefix_len, torch.Tensor):
            batch, device = prefix_len.shape[0], prefix_len.device
    positions = torch.arange(seq, device=device)
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=device)
    if mode in ("causal", "prefix"):
        causal = positions[None, :] <= positions[:, None]  # (T_q, T_k)
        mask = mask & causal
        if mode == "prefix":
            if prefix_len is None:
                raise ValueError("mask mode 'prefix' needs prefix_len")
            prefix = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)  # (B|1, 1, 1, 1)
            key_in_prefix = positions.view(1, 1, 1, seq) < prefix  # (B|1, 1, 1, T_k)
            # Every query sees the whole prefix; after the prefix, attention is causal.
            mask = mask | key_in_prefix
    if padding_mask is not None:
        keys = padding_mask.bool()[:, None, None, :]  # (B, 1, 1, T_k)
        mask = mask & keys
        # A query row with no visible key (e.g. left padding in causal mode) would give NaN; let only such a row see
        # itself. Every other row, padded queries included, sees exactly the real keys, as in BERT.
        blind = ~mask.any(dim=-1, keepdim=True)  # (B, 1, T_q, 1)
        mask = mask | (blind & torch.eye(seq, dtype=torch.bool, device=device)[None, None])
    return mask


def row_positions(rows: torch.Tensor) -> torch.Tensor:
    """bool (B, T) -> long (B, M): each row's selected positions in ascending order, M = the most selected in a row.

    A row with fewer than M selected positions is padded with unselected ones, so that every row of the result holds
    distinct positions (``scatter_rows`` writes them back without collisions). M >= 1.
    """
    most = max(int(rows.sum(dim=1).max()), 1) if rows.numel() else 1
    order = torch.sort((~rows).to(torch.uint8), dim=1, stable=True).indices  # (B, T): selected positions first
    return order[:, :most]


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), positions (B, M) -> (B, M, D)."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def scatter_rows(rows: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
    """rows (B, M, D) at ``positions`` (B, M) -> (B, length, D), zero at every other position."""
    out = rows.new_zeros(rows.shape[0], length, rows.shape[-1])
    return out.scatter(1, positions[..., None].expand(-1, -1, rows.shape[-1]), rows)


def gather_mask_rows(attn_mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """The query rows ``positions`` (B, M) of a (B, 1|nh, T|1, S) attention mask -> (B, 1|nh, M|1, S)."""
    if attn_mask is None or attn_mask.shape[-2] == 1:
        return attn_mask
    index = positions[:, None, :, None].expand(attn_mask.shape[0], attn_mask.shape[1], -1, attn_mask.shape[-1])
    return attn_mask.expand(positions.shape[0], -1, -1, -1).gather(2, index)


def cross_attention_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T_k) padding mask of the attended sequence -> (B, 1, 1, T_k) bool, or None."""
    if key_padding_mask is None:
        return None
    return key_padding_mask.bool()[:, None, None, :]


class TextEmbeddings(nn.Module):
    """Token + segment + learned position embeddings, then LayerNorm and dropout (BERT)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        max_position: int = 512,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)
        self.max_position = max_position

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, H)."""
        seq = input_ids.shape[1]
        if seq > self.max_position:
            raise ValueError(f"sequence of {seq} tokens is longer than max_position={self.max_position}")
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)[None, :]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """Multi-head attention; self-attention, or cross-attention to ``context``. Training on CPU (under gradient or
    with dropout) runs ``cpu_kernels.attention``, SDPA's CPU fallback with a cheaper dropout mask; else SDPA.

    ``kv_dim`` is the width of the attended sequence when it differs from ``dim`` (ViLBERT's streams).
    Returns the projected output, before residual and normalisation.
    """

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, attn_dropout: float = 0.0,
                 inner_dim: int | None = None):
        super().__init__()
        inner_dim = inner_dim or dim
        if inner_dim % num_heads:
            raise ValueError(f"attention width {inner_dim} is not divisible by {num_heads} heads")
        kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.head_dim = inner_dim // num_heads
        self.query = nn.Linear(dim, inner_dim)
        self.key = nn.Linear(kv_dim, inner_dim)
        self.value = nn.Linear(kv_dim, inner_dim)
        self.out = nn.Linear(inner_dim, dim)
        self.attn_dropout = attn_dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), context (B, S, D_kv) or None, attn_mask bool (B, 1, T|1, S) -> (B, T, D)."""
        context = x if context is None else context
        batch, seq, _ = x.shape
        q = self.query(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.key(context).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        v = self.value(context).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        return self.out(self._attend(q, k, v, attn_mask))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
                ) -> torch.Tensor:
        """q (B, nh, T, hd), k and v (B, nh, S, hd) -> the heads' outputs side by side, (B, T, nh*hd)."""
        dropout_p = self.attn_dropout if self.training else 0.0
        training = dropout_p > 0.0 or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
        if training and q.device.type == "cpu":
            y = attention(q, k, v, attn_mask, dropout_p)  # (B, nh, T, hd)
        else:  # inference, and GPUs: SDPA's fused kernels
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(q.dtype)  # SDPA takes an additive mask of the queries' dtype
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.num_heads * self.head_dim)  # (B, T, nh*hd)

    def both_ways(self, a: torch.Tensor, a_mask: torch.Tensor | None, b: torch.Tensor, b_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` attending to ``b`` and ``b`` attending to ``a`` with these same weights (LXMERT's cross-attention),
        each projection one matrix product over both sequences' rows.

        a (B, T, D), b (B, S, D), masks bool (B, 1, 1, T|S) or None -> (``self(a, b, b_mask)`` (B, T, D),
        ``self(b, a, a_mask)`` (B, S, D)). Equals the two calls; one product per weight instead of two also means
        one weight gradient, not two summed.
        """
        batch, t, s = a.shape[0], a.shape[1], b.shape[1]
        rows = torch.cat([a.reshape(batch * t, -1), b.reshape(batch * s, -1)])  # (B*T + B*S, D)

        # ``split``, not slicing: the backward of a slice writes its gradient into a zero-filled tensor of the
        # whole, and autograd then sums the two; that of ``split`` concatenates the parts once.
        def heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B*T + B*S, nh*hd) -> per sequence
            x_a, x_b = x.split([batch * t, batch * s])
            return (x_a.view(batch, t, self.num_heads, self.head_dim).transpose(1, 2),
                    x_b.view(batch, s, self.num_heads, self.head_dim).transpose(1, 2))

        (q_a, q_b), (k_a, k_b), (v_a, v_b) = heads(self.query(rows)), heads(self.key(rows)), heads(self.value(rows))
        y_a = self._attend(q_a, k_b, v_b, b_mask)  # (B, T, nh*hd)
        y_b = self._attend(q_b, k_a, v_a, a_mask)  # (B, S, nh*hd)
        y = self.out(torch.cat([y_a.reshape(batch * t, -1), y_b.reshape(batch * s, -1)]))  # (B*T + B*S, D)
        y_a, y_b = y.split([batch * t, batch * s])
        return y_a.view(batch, t, -1), y_b.view(batch, s, -1)


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> activation -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, *, activation: str = "gelu"):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden_dim)
        self.fc_out = nn.Linear(hidden_dim, dim)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Residual(nn.Module):
    """One sublayer's residual wrapper: post-LN ``norm(x + drop(f(x)))`` (BERT) or pre-LN ``x + drop(f(norm(x)))``.

    ``adapter`` (None by default) is a module applied to the sublayer's output before the residual sum, where
    ``vl.encoders.adapters.add_adapters`` puts bottleneck adapters: ``norm(x + adapter(drop(f(x))))``.
    """

    def __init__(self, dim: int, *, dropout: float = 0.1, layer_norm_eps: float = 1e-12, pre_ln: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)
        self.pre_ln = pre_ln
        self.adapter: nn.Module | None = None

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        y = self.dropout(y)
        return y if self.adapter is None else self.adapter(y)

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.pre_ln:
            return x + self._branch(sublayer(self.norm(x)))
        return self.norm(x + self._branch(sublayer(x)))


class TransformerLayer(nn.Module):
    """Self-attention then feed-forward, each in a residual; optionally a cross-attention between them.

    With ``cross_attention=True`` the layer is a decoder-style / LXMERT-style block that attends to a second
    sequence (width ``context_dim``) after attending to itself.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        activation: str = "gelu",
        pre_ln: bool = False,
        cross_attention: bool = False,
        context_dim: int | None = None,
    ):
        super().__init__()
        residual = dict(dropout=dropout, layer_norm_eps=layer_norm_eps, pre_ln=pre_ln)
        self.attention = Attention(dim, num_heads, attn_dropout=attn_dropout)
        self.attention_residual = Residual(dim, **residual)
        self.cross_attention = None
        if cross_attention:
            self.cross_attention = Attention(dim, num_heads, kv_dim=context_dim, attn_dropout=attn_dropout)
            self.cross_residual = Residual(dim, **residual)
        self.ffn = FeedForward(dim, ffn_dim, activation=activation)
        self.ffn_residual = Residual(dim, **residual)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D); attn_mask bool (B, 1, T, T) from ``build_attention_mask``; context (B, S, D_c) -> (B, T, D).

        With ``positions`` (B, M) long (``row_positions``), only those rows are computed: their queries attend to
        keys and values of every position of ``x``, and the result is (B, M, D), equal to rows ``positions`` of
        the full output. A last layer whose outputs are read at a few positions costs a fraction of a layer then.
        """
        if positions is None:
            x = self.attention_residual(x, lambda h: self.attention(h, attn_mask=attn_mask))
        else:
            keys = self.attention_residual.norm(x) if self.attention_residual.pre_ln else x  # what f(.) sees
            x = self.attention_residual(gather_rows(x, positions), lambda h: self.attention(
                h, keys, attn_mask=gather_mask_rows(attn_mask, positions)))  # (B, M, D)
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("this layer has cross-attention and needs a context sequence")
            if positions is not None:
                context_mask = gather_mask_rows(context_mask, positions)
            x = self.cross_residual(x, lambda h: self.cross_attention(h, context, attn_mask=context_mask))
        return self.ffn_residual(x, self.ffn)


class TransformerEncoder(nn.Module):
    """A stack of ``TransformerLayer``; pre-LN stacks end with a final LayerNorm."""

    def __init__(
        self,
        num_layers: int,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        activation: str = "gelu",
        pre_ln: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, ffn_dim, dropout=dropout, attn_dropout=attn_dropout,
                             layer_norm_eps=layer_norm_eps, activation=activation, pre_ln=pre_ln)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=layer_norm_eps) if pre_ln else nn.Identity()

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, return_all: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """x (B, T, D) -> (B, T, D); with ``return_all``, the embeddings and every layer's output (L + 1 tensors).

        ``rows`` (bool (B, T), not with ``return_all``): the positions whose output the caller reads. The last layer
        then runs its queries, feed-forward and final norm at those rows only (``TransformerLayer``'s
        ``positions``); the output is exact there and zero or exact elsewhere.
        """
        if rows is not None and self.layers and not return_all:
            for layer in self.layers[:-1]:
                x = layer(x, attn_mask)
            positions = row_positions(rows)  # (B, M)
            selected = self.final_norm(self.layers[-1](x, attn_mask, positions=positions))  # (B, M, D)
            return scatter_rows(selected, positions, x.shape[1])
        hidden = [x]
        for layer in self.layers:
            x = layer(x, attn_mask)
            hidden.append(x)
        x = self.final_norm(x)
        if return_all:
            hidden[-1] = x
            return hidden
        return x


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

