"""Masked-language-model masking: which tokens to predict, and what the model sees in their place.

Selection picks ``rate`` (15%) of the maskable tokens of each sequence; special tokens ([CLS], [SEP], [PAD],
[MASK], [UNK]) and padding are never selected. The selection unit is one of

- ``token``: single word pieces (BERT);
- ``word``: whole words, a word being a piece and its ``##`` continuations (whole-word masking);
- ``span``: contiguous runs of whole words whose lengths follow a geometric distribution with parameter
  ``span_p`` clipped at ``span_max`` words, drawn until the budget is used (SpanBERT);
- ``phrase``: given spans (phrases, entities) as units, the other tokens as whole words (ERNIE 1.0).

Of the selected tokens, ``mask_prob`` (80%) become [MASK], ``random_prob`` (10%) a random non-special token, and
the rest stay unchanged; all of them are prediction targets. Masking is dynamic: the collator calls
``TextMasker`` with its own ``torch.Generator`` every time a batch is built, so a sequence gets a fresh mask each
time it is seen, reproducibly from the generator's state.

The per-sequence budget is ``rate * n`` rounded stochastically (floor, plus one with probability equal to the
fractional part), so the expected masking rate is exactly ``rate`` at every sequence length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vl.errors import UserError

IGNORE_INDEX = -100
MaskingUnit = Literal["token", "word", "span", "phrase"]
MASKING_UNITS = ("token", "word", "span", "phrase")


@dataclass(frozen=True)
class MaskingConfig:
    rate: float = 0.15  # fraction of maskable tokens selected as prediction targets
    mask_prob: float = 0.8  # of the selected: replaced by [MASK]
    random_prob: float = 0.1  # of the selected: replaced by a random token; the rest are left unchanged
    unit: MaskingUnit = "token"  # token, word (whole-word), span (SpanBERT) or phrase (ERNIE, needs spans)
    span_p: float = 0.2  # span unit: geometric parameter of the span length in words
    span_max: int = 10  # span unit: span lengths are clipped at this many words

    def __post_init__(self):
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {self.rate}")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1.0:
            raise ValueError(f"mask_prob {self.mask_prob} and random_prob {self.random_prob} must be >= 0 and sum "
                             "to at most 1")
        if self.unit not in MASKING_UNITS:
            raise ValueError(f"unit must be one of {', '.join(MASKING_UNITS)}, got {self.unit!r}")
        if not 0.0 < self.span_p <= 1.0:
            raise ValueError(f"span_p must be in (0, 1], got {self.span_p}")
        if self.span_max < 1:
            raise ValueError(f"span_max must be >= 1, got {self.span_max}")


@dataclass
class MaskedBatch:
    """input_ids: (B, T) corrupted ids; labels: (B, T) original id at targets, -100 elsewhere;
    kinds: (B, T) int8, 0 = not selected, 1 = [MASK], 2 = random token, 3 = unchanged."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    kinds: torch.Tensor


def clipped_geometric_pmf(p: float, max_len: int) -> torch.Tensor:
    """P(length = k) for k = 1..max_len: geometric(p) with the tail mass beyond ``max_len`` put on ``max_len``."""
    lengths = torch.arange(1, max_len + 1, dtype=torch.float64)
    pmf = p * (1 - p) ** (lengths - 1)
    pmf[-1] = (1 - p) ** (max_len - 1)
    return pmf


def sample_span_lengths(count: int, p: float, max_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` span lengths from the clipped geometric distribution (values in 1..max_len), as int64."""
    uniform = torch.rand(count, generator=generator, dtype=torch.float64).clamp_min(1e-12)
    if p >= 1.0:
        return torch.ones(count, dtype=torch.int64)
    lengths = torch.floor(torch.log(uniform) / math.log(1 - p)).to(torch.int64) + 1  # inverse CDF, support 1, 2, ...
    return lengths.clamp(1, max_len)


def stochastic_budget(count: int, rate: float, generator: torch.Generator | None) -> int:
    """floor(rate * count), plus one with probability equal to the fractional part."""
    expected = rate * count
    budget = int(math.floor(expected))
    if torch.rand((), generator=generator).item() < expected - budget:
        budget += 1
    return budget


class TextMasker:
    """Applies ``MaskingConfig`` to batches of token ids.

    vocab_size, mask_id: the vocabulary; special_ids: never selected and never drawn as random replacements;
    continuation_ids: ids of ``##`` word pieces, used to find word boundaries when no word ids are given.
    """

    def __init__(self, cfg: MaskingConfig, vocab_size: int, mask_id: int, special_ids: Iterable[int],
                 continuation_ids: Iterable[int] = ()):
        self.cfg = cfg
        self.mask_id = mask_id
        self.is_special = torch.zeros(vocab_size, dtype=torch.bool)
        self.is_special[list(special_ids)] = True
        self.is_special[mask_id] = True
        self.is_continuation = torch.zeros(vocab_size, dtype=torch.bool)
        continuation = list(continuation_ids)
        if continuation:
            self.is_continuation[continuation] = True
        self.replacement_ids = torch.nonzero(~self.is_special).flatten()
        if len(self.replacement_ids) == 0:
            raise ValueError("the vocabulary has no non-special token to use as a random replacement")

    @classmethod
    def from_tokenizer(cls, cfg: MaskingConfig, tokenizer) -> TextMasker:
        """Build from a ``vl.text.tokenizer.Tokenizer``: its special ids and its ``##`` pieces."""
        continuation = [index for token, index in tokenizer.vocab.items() if token.startswith("##")]
        return cls(cfg, tokenizer.vocab_size, tokenizer.mask_id, tokenizer.special_ids, continuation)

    # ----------------------------------------------------------------------------------------------------------
    def maskable(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) bool: tokens that may be selected (not special, not padding)."""
        ok = ~self.is_special[input_ids]
        if attention_mask is not None:
            ok &= attention_mask.bool()
        return ok

    def word_ids(self, input_ids: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 word index per maskable token (-1 elsewhere); a ``##`` piece joins the word before it."""
        starts = maskable & ~(self.is_continuation[input_ids] & _previous(maskable))
        ids = torch.cumsum(starts.long(), dim=1) - 1
        return torch.where(maskable, ids, torch.full_like(ids, -1))

    def select(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator,
        attention_mask: torch.Tensor | None = None,
        word_ids: torch.Tensor | None = None,
        spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> torch.Tensor:
        """(B, T) bool: the prediction targets. ``spans[b]`` lists (start, end) token ranges for the phrase unit."""
        maskable = self.maskable(input_ids, attention_mask)
        unit = self.cfg.unit
        if unit == "token":
            return self._select_tokens(maskable, generator)
        if word_ids is None:
            word_ids = self.word_ids(input_ids, maskable)
        else:
            word_ids = torch.where(maskable, word_ids, torch.full_like(word_ids, -1))
        selected = torch.zeros_like(maskable)
        for row in range(input_ids.shape[0]):
            units = _word_units(word_ids[row])
            if unit == "phrase":
                units = _phrase_units(units, spans[row] if spans is not None else (), maskable[row])
            count = sum(len(u) for u in units)
            budget = stochastic_budget(count, self.cfg.rate, generator)
            if budget == 0:
                continue
            if unit == "span":
                chosen = self._select_spans(units, budget, generator)
            else:
                chosen = _fill_budget(units, budget, generator)
            if chosen:
                selected[row, torch.tensor(chosen, dtype=torch.long)] = True
        return selected

    def _select_tokens(self, maskable: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        counts = maskable.sum(dim=1)  # (B,)
        expected = counts.double() * self.cfg.rate
        budgets = torch.floor(expected)
        budgets += (torch.rand(len(counts), generator=generator, dtype=torch.float64) < expected - budgets).double()
        scores = torch.rand(maskable.shape, generator=generator)
        scores = scores.masked_fill(~maskable, -1.0)
        ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)  # (B, T): 0 = highest score
        return (ranks < budgets.long()[:, None]) & maskable

    def _select_spans(self, units: list[list[int]], budget: int, generator: torch.Generator) -> list[int]:
        """SpanBERT: draw a span length in words, then a start among the places where a span of that length fits
        without touching a chosen span (so the lengths keep their distribution); the last span is cut at the
        budget. Spans never merge: every run of selected words is one drawn span."""
        count = len(units)
        taken = torch.zeros(count + 2, dtype=torch.bool)  # padded by one word on both sides
        chosen: list[int] = []
        failures = 0
        while len(chosen) < budget and failures < 20:
            length = int(sample_span_lengths(1, self.cfg.span_p, self.cfg.span_max, generator)[0])
            if length > count:
                failures += 1
                continue
            near = taken[:-2] | taken[1:-1] | taken[2:]  # (count,) a word that is, or touches, a chosen word
            blocked = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(near.long(), dim=0)])
            fits = (blocked[length:] - blocked[:-length]) == 0  # (count - length + 1,) start s is free
            starts = torch.nonzero(fits).flatten()
            if len(starts) == 0:
                failures += 1
                continue
            start = int(starts[torch.randint(len(starts), (1,), generator=generator)])
            for index in range(start, start + length):
                if len(chosen) + len(units[index]) > budget:
                    return chosen  # the budget cuts this last span
                taken[index + 1] = True
                chosen.extend(units[index])
        return chosen

    # ----------------------------------------------------------------------------------------------------------
    def corrupt(self, input_ids: torch.Tensor, selected: torch.Tensor, generator: torch.Generator) -> MaskedBatch:
        """Apply 80/10/10 to the ``selected`` positions; labels hold the original ids there."""
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = selected & (draw < self.cfg.mask_prob)
        to_random = selected & (draw >= self.cfg.mask_prob) & (draw < self.cfg.mask_prob + self.cfg.random_prob)
        random_index = torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator)
        corrupted = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        corrupted = torch.where(to_random, self.replacement_ids[random_index], corrupted)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        kinds = selected.to(torch.int8) * 3
        kinds[to_mask] = 1
        kinds[to_random] = 2
        return MaskedBatch(input_ids=corrupted, labels=labels, kinds=kinds)

    def __call__(
        self,
        input_ids: torch.Tensor,
        generator: torch.Generator,
        attention_mask: torch.Tensor | None = None,
        word_ids: torch.Tensor | None = None,
        spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> MaskedBatch:
        """Select targets and corrupt them: input_ids (B, T) -> ``MaskedBatch``."""
        selected = self.select(input_ids, generator, attention_mask, word_ids, spans)
        return self.corrupt(input_ids, selected, generator)


def _previous(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> the value at t - 1 (False at t = 0)."""
    shifted = torch.zeros_like(mask)
    shifted[:, 1:] = mask[:, :-1]
    return shifted


def _word_units(word_ids: torch.Tensor) -> list[list[int]]:
    """Token positions grouped by word id (positions with id -1 dropped), in order."""
    units: list[list[int]] = []
    last = None
    for position, word in enumerate(word_ids.tolist()):
        if word < 0:
            last = None
            continue
        if word != last:
            units.append([])
            last = word
        units[-1].append(position)
    return units


def _phrase_units(words: list[list[int]], spans: Sequence[tuple[int, int]], maskable: torch.Tensor) -> list[list[int]]:
    """Units for phrase masking: each given span (its maskable tokens) is one unit; words outside spans stay units."""
    in_span: dict[int, int] = {}
    units: list[list[int]] = []
    for start, end in sorted(spans):
        tokens = [t for t in range(start, end) if t < len(maskable) and bool(maskable[t]) and t not in in_span]
        if tokens:
            for t in tokens:
                in_span[t] = len(units)
            units.append(tokens)
    for word in words:
        rest = [t for t in word if t not in in_span]
        if len(rest) == len(word):
            units.append(word)
        elif rest:
            units.append(rest)
    return sorted(units)


def _fill_budget(units: list[list[int]], budget: int, generator: torch.Generator) -> list[int]:
    """Visit the units in random order and take each one that still fits in the budget (BERT's whole-word rule)."""
    order = torch.randperm(len(units), generator=generator).tolist()
    chosen: list[int] = []
    for index in order:
        unit = units[index]
        if len(chosen) + len(unit) <= budget:
            chosen.extend(unit)
            if len(chosen) == budget:
                break
    return chosen


class PhraseMatcher:
    """Finds known phrases (token-id sequences) in a sequence: longest match first, left to right, no overlap.

    Gives the ``spans`` of ERNIE-style phrase/entity masking from a list of phrases (one per line of a file).
    """

    def __init__(self, phrases: Iterable[Sequence[int]]):
        by_first: dict[int, set[tuple[int, ...]]] = {}
        for phrase in phrases:
            phrase = tuple(int(i) for i in phrase)
            if phrase:
                by_first.setdefault(phrase[0], set()).add(phrase)
        self.by_first = {first: sorted(group, key=len, reverse=True) for first, group in by_first.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer) -> PhraseMatcher:
        """Phrases from a text file, one per line, tokenized without special tokens."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"phrases file not found: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise UserError(f"phrases file {path} holds no phrases")
        encoded = tokenizer.backend.encode_batch(lines, add_special_tokens=False)
        return cls(encoding.ids for encoding in encoded)

    def __len__(self) -> int:
        return sum(len(group) for group in self.by_first.values())

    def find(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(start, end) token ranges of the phrases found in ``ids``."""
        ids = list(ids)
        spans: list[tuple[int, int]] = []
        position = 0
        while position < len(ids):
            for phrase in self.by_first.get(ids[position], ()):
                if tuple(ids[position:position + len(phrase)]) == phrase:
                    spans.append((position, position + len(phrase)))
                    position += len(phrase)
                    break
            else:
                position += 1
        return spans
