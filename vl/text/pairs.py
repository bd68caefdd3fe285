"""Sentence pairs from documents for NSP, SOP and sequence-to-sequence (prefix-LM) training.

BERT's recipe: walk through each document collecting consecutive sentences until a target length is reached
(shorter with probability ``short_seq_prob``), then split the collected chunk at a random sentence boundary into
segment A and segment B. Then, by task:

- ``nsp`` (BERT): with probability 1/2 segment B is replaced by text from a random other document (label 1,
  "not next"); otherwise B is the real continuation (label 0). The unused sentences go back to the pool.
- ``sop`` (ALBERT, StructBERT): with probability 1/2 the two segments are swapped (label 1, "swapped");
  otherwise they stay in order (label 0). A negative is exactly its positive with A and B exchanged.
- ``next``: always the real continuation (label 0); the pairs of prefix-LM training.

A chunk of one sentence is cut at a random token for ``sop`` and ``next``. Pairs longer than the budget lose
tokens at the outer ends (the front of A, the back of B), so the A|B junction that the label is about stays.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PairTask = Literal["nsp", "sop", "next"]
PAIR_TASKS = ("nsp", "sop", "next")


@dataclass(frozen=True)
class SentencePair:
    """Segments A and B (word-piece ids, no special tokens) and the label: 0 = in order / next, 1 = negative."""

    tokens_a: tuple[int, ...]
    tokens_b: tuple[int, ...]
    label: int


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int) -> None:
    """Shorten the longer segment until both fit in ``max_tokens``: A loses its front, B its back."""
    keep_a, keep_b = len(tokens_a), len(tokens_b)
    while keep_a + keep_b > max_tokens:
        if keep_a > keep_b:
            keep_a -= 1
        else:
            keep_b -= 1
    del tokens_a[:len(tokens_a) - keep_a]
    del tokens_b[keep_b:]


def _concat(sentences: Sequence[Sequence[int]]) -> list[int]:
    return [token for sentence in sentences for token in sentence]


def build_sentence_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    max_tokens: int,
    task: PairTask,
    rng: random.Random,
    short_seq_prob: float = 0.1,
) -> list[SentencePair]:
    """Pairs from tokenized documents (lists of sentences of ids); ``max_tokens`` excludes [CLS]/[SEP]/[SEP]."""
    if task not in PAIR_TASKS:
        raise ValueError(f"unknown pair task '{task}' (known: {', '.join(PAIR_TASKS)})")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    pairs: list[SentencePair] = []
    for doc_index, document in enumerate(documents):
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = rng.randint(2, max_tokens)
        chunk: list[Sequence[int]] = []
        length = 0
        index = 0
        while index < len(document):
            chunk.append(document[index])
            length += len(document[index])
            if index == len(document) - 1 or length >= target:
                pair, unused = _pair_from_chunk(chunk, documents, doc_index, target, max_tokens, task, rng)
                index -= unused
                if pair is not None:
                    pairs.append(pair)
                chunk, length = [], 0
                target = max_tokens
                if rng.random() < short_seq_prob:
                    target = rng.randint(2, max_tokens)
            index += 1
    return pairs


def _pair_from_chunk(
    chunk: list[Sequence[int]],
    documents: Sequence[Sequence[Sequence[int]]],
    doc_index: int,
    target: int,
    max_tokens: int,
    task: PairTask,
    rng: random.Random,
) -> tuple[SentencePair | None, int]:
    """One pair from a chunk of consecutive sentences, and how many of its sentences go back unused."""
    unused = 0
    if len(chunk) >= 2:
        a_end = rng.randint(1, len(chunk) - 1)
        tokens_a = _concat(chunk[:a_end])
        rest = chunk[a_end:]
    else:
        tokens = list(chunk[0])
        if task == "nsp" and len(documents) > 1:
            tokens_a, rest = tokens, []
        elif len(tokens) >= 2:
            cut = rng.randint(1, len(tokens) - 1)
            tokens_a, rest = tokens[:cut], [tokens[cut:]]
        else:
            return None, 0
    label = 0
    if task == "nsp" and (not rest or rng.random() < 0.5) and len(documents) > 1:
        label = 1
        other = rng.randrange(len(documents) - 1)
        other += other >= doc_index  # any document but this one
        other_doc = documents[other]
        start = rng.randrange(len(other_doc))
        tokens_b: list[int] = []
        for sentence in other_doc[start:]:
            tokens_b.extend(sentence)
            if len(tokens_a) + len(tokens_b) >= target:
                break
        unused = len(rest)  # the real continuation was not used: it starts the next chunk
    else:
        tokens_b = _concat(rest)
        if not tokens_b:
            return None, 0
        if task == "sop" and rng.random() < 0.5:
            label = 1
    tokens_a, tokens_b = list(tokens_a), list(tokens_b)
    truncate_pair(tokens_a, tokens_b, max_tokens)
    if not tokens_a or not tokens_b:
        return None, unused
    if label == 1 and task == "sop":
        tokens_a, tokens_b = tokens_b, tokens_a
    return SentencePair(tuple(tokens_a), tuple(tokens_b), label), unused
