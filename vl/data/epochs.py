"""``EpochBatchStream``: endless batches over epochs of examples with an exact, resumable position. Text pretraining,
text fine-tuning, VQA and retrieval fine-tuning all feed the training loop through it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from vl.data.seeds import stable_seed


class EpochBatchStream:
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
