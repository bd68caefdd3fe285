"""Batches for text-only pretraining: examples and the collator that masks them (streamed by
``vl.data.epochs.EpochBatchStream``).

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

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
