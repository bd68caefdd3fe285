"""Batches for text-only pretraining: examples, the collator that masks them, and a resumable batch stream.

Batch keys (B sequences, T the longest in the batch):

- ``input_ids (B, T)`` long, masked when the collator has a masker; ``attention_mask (B, T)`` 1 at real tokens;
  ``token_type_ids (B, T)`` 0 for segment A, 1 for segment B;
- ``mlm_labels (B, T)`` long: the original id at the selected positions, -100 elsewhere (with a masker);
- ``sentence_labels (B,)`` long: NSP / SOP label, 0 = next / in order, 1 = random / swapped (pair examples);
- ``lm_labels (B, T)`` long: for causal and prefix LM, the next token at every position that predicts one
  (causal: all real positions but the last; prefix: from the last prefix position on), -100 elsewhere;
- ``prefix_len (B,)`` long: prefix-LM only, the tokens of [CLS] A [SEP] that every position may see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vl.data.seeds import stable_seed
from vl.text.masking import IGNORE_INDEX, PhraseMatcher, TextMasker
from vl.text.pairs import SentencePair

LMMode = Literal["none", "causal", "prefix"]


@dataclass(frozen=True)
class TextExample:
    """One training sequence: ids with [CLS]/[SEP], segment ids, and for pairs the label and the prefix length."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    sentence_label: int = -1
    prefix_len: int = 0


def single_example(ids: Sequence[int]) -> TextExample:
    return TextExample(tuple(ids), (0,) * len(ids))


def pair_example(pair: SentencePair, cls_id: int, sep_id: int) -> TextExample:
    """``[CLS] A [SEP] B [SEP]`` with segment ids 0...0 1...1; the prefix is ``[CLS] A [SEP]``."""
    ids = (cls_id, *pair.tokens_a, sep_id, *pair.tokens_b, sep_id)
    prefix = len(pair.tokens_a) + 2
    return TextExample(ids, (0,) * prefix + (1,) * (len(ids) - prefix), pair.label, prefix)


class TextPretrainCollator:
    """Pads examples into a batch and adds the targets of the configured objectives (module docstring).

    masker: MLM / ELECTRA masking, or None. lm_mode: "causal" or "prefix" adds ``lm_labels``. phrase_matcher:
    finds the spans of phrase masking in every sequence. sentence_labels: add ``sentence_labels``.
    """

    def __init__(self, pad_id: int, masker: TextMasker | None = None, lm_mode: LMMode = "none",
                 phrase_matcher: PhraseMatcher | None = None, sentence_labels: bool = False):
        self.pad_id = pad_id
        self.masker = masker
        self.lm_mode = lm_mode
        self.phrase_matcher = phrase_matcher
        self.sentence_labels = sentence_labels

    def __call__(self, examples: Sequence[TextExample], generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch_size = len(examples)
        seq_len = max(len(example.input_ids) for example in examples)
        input_ids = torch.full((batch_size, seq_len), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids)
            token_type_ids[row, :length] = torch.tensor(example.token_type_ids)
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if self.masker is not None:
            spans = None
            if self.phrase_matcher is not None:
                spans = [self.phrase_matcher.find(example.input_ids) for example in examples]
            masked = self.masker(input_ids, generator, attention_mask, spans=spans)
            batch["input_ids"] = masked.input_ids
            batch["mlm_labels"] = masked.labels
        if self.sentence_labels:
            batch["sentence_labels"] = torch.tensor([example.sentence_label for example in examples])
        if self.lm_mode != "none":
            lengths = attention_mask.sum(dim=1)  # (B,)
            positions = torch.arange(seq_len)[None, :]  # (1, T)
            first = torch.zeros_like(lengths)
            if self.lm_mode == "prefix":
                prefix_len = torch.tensor([example.prefix_len for example in examples])
                batch["prefix_len"] = prefix_len
                first = prefix_len - 1
            predicts = (positions >= first[:, None]) & (positions < (lengths - 1)[:, None])  # (B, T)
            next_ids = torch.full_like(input_ids, IGNORE_INDEX)
            next_ids[:, :-1] = input_ids[:, 1:]
            batch["lm_labels"] = torch.where(predicts, next_ids, torch.full_like(next_ids, IGNORE_INDEX))
        return batch


class TextBatchStream:
    """Endless batches over epochs of examples, with an exact, resumable position.

    examples_for_epoch(epoch): the examples of an epoch (the same list every epoch for packed sequences, freshly
    built pairs for NSP/SOP; any objects ``collate`` understands, e.g. fine-tuning features). Each epoch visits
    them in a seeded random order, ``batch_size`` at a time; with
    several processes, rank r takes every ``world_size``-th batch. Masks are drawn from the stream's own
    generator at collation, so every visit of a sequence gets a new mask. ``state_dict()`` (epoch, batch
    position, generator state) taken between batches restores the stream exactly.
    """

    def __init__(
        self,
        examples_for_epoch: Callable[[int], Sequence[Any]],
        batch_size: int,
        collate: Callable[[Sequence[Any], torch.Generator], dict[str, torch.Tensor]],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.examples_for_epoch = examples_for_epoch
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self.generator = torch.Generator().manual_seed(stable_seed(seed, 7, rank))
        self._cache: tuple[int, Sequence[Any], list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> tuple[Sequence[Any], list[list[int]]]:
        """The epoch's examples and this rank's batches of it (as example indices), built once per epoch."""
        if self._cache is None or self._cache[0] != epoch:
            examples = self.examples_for_epoch(epoch)
            if not examples:
                raise ValueError("the corpus gave no training examples")
            shuffle = torch.Generator().manual_seed(stable_seed(self.seed, epoch))
            order = torch.randperm(len(examples), generator=shuffle).tolist()
            batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
            mine = batches[self.rank::self.world_size] or batches[:1]
            self._cache = (epoch, examples, mine)
        return self._cache[1], self._cache[2]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            examples, batches = self._epoch(self.epoch)
            if self.position >= len(batches):
                self.epoch += 1
                self.position = 0
                continue
            indices = batches[self.position]
            self.position += 1
            yield self.collate([examples[i] for i in indices], self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])
