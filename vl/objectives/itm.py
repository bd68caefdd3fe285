"""Image-text matching: binary matched / mismatched from the pooled output, and in-batch hard-negative mining.

Random negatives are made by the collator (``vl.data.vl_masking.make_itm_negatives``). Hard negatives are the
highest-scoring wrong pairs of a batch under the current model: ``mine_hard_negatives`` scores all B x B
(caption, regions) pairs without gradients and returns the hardest ones as a batch of mismatched pairs, to be
concatenated with the batch (``vl.data.vl_masking.concat_batches``) before the training forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vl.data.vl_masking import IGNORE_INDEX, TEXT_KEYS, unmask_batch
from vl.errors import UserError
from vl.fusion.base import VLOutput
from vl.objectives.common import empty_loss, require_keys


class ImageTextMatching(nn.Module):
    """Cross-entropy of ``itm_head`` (Linear(H, 2)) on ``output.pooled``: ``{"itm": loss}``.

    Batch keys: ``itm_labels (B,)`` long, 1 = matched, 0 = mismatched (random negatives from the collator, hard
    negatives from ``mine_hard_negatives``). ``hard_negatives`` is the number of mined negatives per caption
    that the training loop adds to each batch (0: random negatives only).
    """

    name = "itm"
    needs_masking = None
    needs_negatives = True
    batch_keys = ("itm_labels",)

    def __init__(self, hidden_size: int, head: nn.Linear | None = None, hard_negatives: int = 0):
        super().__init__()
        self.head = head if head is not None else nn.Linear(hidden_size, 2)
        if self.head.in_features != hidden_size or self.head.out_features != 2:
            raise UserError(f"objective 'itm': the ITM head maps {self.head.in_features} -> "
                            f"{self.head.out_features}, expected {hidden_size} -> 2")
        if hard_negatives < 0:
            raise UserError(f"objective 'itm': hard_negatives must be >= 0, got {hard_negatives}")
        self.hard_negatives = hard_negatives

    def forward(self, output: VLOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        require_keys(self.name, batch, self.batch_keys)
        logits = self.head(output.pooled)  # (B, 2)
        if logits.shape[0] == 0:
            return {self.name: empty_loss(logits)}
        return {self.name: F.cross_entropy(logits.float(), batch["itm_labels"].long())}


def match_scores(itm_head: nn.Module, output: VLOutput) -> torch.Tensor:
    """(B,) matching score of each pair: logit(matched) - logit(mismatched) of ``itm_head(output.pooled)``."""
    logits = itm_head(output.pooled)  # (B, 2)
    return logits[:, 1] - logits[:, 0]


def pair_batch(batch: dict[str, torch.Tensor], text_index: torch.Tensor,
               region_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of pairs (caption ``text_index[n]``, regions ``region_index[n]``) built from ``batch``.

    Text keys and every other per-sample key come from the caption's sample; ``region_*`` keys from the regions'
    sample.
    """
    out = {}
    for key, value in batch.items():
        out[key] = value[region_index] if key.startswith("region_") else value[text_index]
    return out


@torch.no_grad()
def score_all_pairs(model: Callable[[dict[str, torch.Tensor]], VLOutput], itm_head: nn.Module,
                    batch: dict[str, torch.Tensor], chunk_size: int = 256) -> torch.Tensor:
    """Match scores of every (caption i, regions j) pair of the batch: (B, B), row = caption, column = regions.

    Runs the model in eval mode (no dropout) on chunks of at most ``chunk_size`` pairs, without gradients, and
    restores the previous training mode of ``model`` and ``itm_head``.
    """
    inputs = {key: value for key, value in unmask_batch(batch).items()
              if key in TEXT_KEYS or key.startswith("region_")}
    batch_size, device = inputs["input_ids"].shape[0], inputs["input_ids"].device
    text_index = torch.arange(batch_size, device=device).repeat_interleave(batch_size)  # (B * B,) caption per pair
    region_index = torch.arange(batch_size, device=device).repeat(batch_size)  # (B * B,) regions per pair
    modules = [m for m in (model, itm_head) if isinstance(m, nn.Module)]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        scores = []
        for start in range(0, batch_size * batch_size, chunk_size):
            stop = start + chunk_size
            pairs = pair_batch(inputs, text_index[start:stop], region_index[start:stop])
            scores.append(match_scores(itm_head, model(pairs)).float())
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)
    return torch.cat(scores).view(batch_size, batch_size)  # (B, B)


def hardest_wrong_pairs(scores: torch.Tensor, k: int, anchor: str = "text",
                        image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The k highest-scoring wrong pairs per anchor: (N, 2) long rows of (caption index, regions index).

    ``scores`` (B, B): row = caption, column = regions; the diagonal is the matched pairs. ``anchor`` "text":
    for each caption, its k highest-scoring wrong regions; "regions": for each image, its k highest-scoring
    wrong captions. Pairs whose ``image_ids`` (B,) are equal are not wrong and never chosen; an anchor with fewer
    than k wrong partners contributes the ones it has. Rows are ordered by anchor, then by descending score.
    """
    batch_size = scores.shape[0]
    if scores.shape != (batch_size, batch_size):
        raise UserError(f"hardest_wrong_pairs: scores must be square (B, B), got {tuple(scores.shape)}")
    if anchor not in ("text", "regions"):
        raise UserError(f"hard negative anchor must be text or regions, got {anchor!r}")
    if not 1 <= k <= batch_size - 1:
        raise UserError(f"hard negatives per sample must be in [1, B - 1 = {batch_size - 1}], got {k}")
    wrong = ~torch.eye(batch_size, dtype=torch.bool, device=scores.device)
    if image_ids is not None:
        wrong &= image_ids[:, None] != image_ids[None, :]
    oriented = scores if anchor == "text" else scores.t()  # (anchor, partner)
    oriented_wrong = wrong if anchor == "text" else wrong.t()
    masked = oriented.float().masked_fill(~oriented_wrong, float("-inf"))
    top_scores, partners = masked.topk(k, dim=1)  # (B, k)
    anchors = torch.arange(batch_size, device=scores.device)[:, None].expand(-1, k)
    keep = top_scores > float("-inf")
    anchors, partners = anchors[keep], partners[keep]  # (N,)
    if anchor == "text":
        return torch.stack([anchors, partners], dim=1)
    return torch.stack([partners, anchors], dim=1)


def sampled_wrong_pairs(logits: torch.Tensor, k: int, anchor: str = "text",
                        image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """k wrong pairs per anchor drawn without replacement, each with probability softmax(``logits``) over the
    anchor's wrong partners (ALBEF's negatives); the rows and rules of ``hardest_wrong_pairs``.

    Drawn as the k largest of ``logits`` + Gumbel noise (the Gumbel-top-k trick), from torch's global generator.
    """
    uniform = torch.rand(logits.shape, device=logits.device).clamp_(min=1e-20)
    return hardest_wrong_pairs(logits.float() - torch.log(-torch.log(uniform)), k, anchor, image_ids)


def mine_hard_negatives(model: Callable[[dict[str, torch.Tensor]], VLOutput], itm_head: nn.Module,
                        batch: dict[str, torch.Tensor], k: int, anchor: str = "text",
                        chunk_size: int = 256) -> dict[str, torch.Tensor]:
    """A batch of the hardest mismatched pairs of ``batch``: k per caption (``anchor="text"``) or per image.

    Scores all pairs with ``score_all_pairs`` (no gradients), picks them with ``hardest_wrong_pairs`` (same-image
    pairs excluded when ``image_ids`` is in the batch) and builds the pairs from the unmasked inputs. The result
    has the keys of ``batch``: ``itm_labels`` 0, masking targets empty (``mlm_labels`` -100, ``mrm_mask``
    False), ``has_answer`` False; it can be concatenated with the batch by ``concat_batches``.
    """
    if "input_ids" not in batch:
        raise UserError(f"mine_hard_negatives: the batch lacks input_ids (has: {', '.join(sorted(batch))})")
    scores = score_all_pairs(model, itm_head, batch, chunk_size)
    pairs = hardest_wrong_pairs(scores, k, anchor, batch.get("image_ids"))
    negatives = pair_batch(unmask_batch(batch), pairs[:, 0], pairs[:, 1])
    num_pairs, device = pairs.shape[0], pairs.device
    negatives["itm_labels"] = torch.zeros(num_pairs, dtype=torch.long, device=device)
    if "mlm_labels" in batch:
        negatives["mlm_labels"] = torch.full_like(negatives["input_ids"], IGNORE_INDEX)
    if "mrm_mask" in batch:
        negatives["mrm_mask"] = torch.zeros(negatives["region_feats"].shape[:2], dtype=torch.bool, device=device)
    if "mrm_feat_targets" in batch:
        negatives["mrm_feat_targets"] = negatives["region_feats"]
    if "mrm_class_targets" in batch:
        negatives["mrm_class_targets"] = torch.full(negatives["region_feats"].shape[:2], IGNORE_INDEX,
                                                    dtype=batch["mrm_class_targets"].dtype, device=device)
    if "mrm_class_probs" in batch:
        negatives["mrm_class_probs"] = batch["mrm_class_probs"][pairs[:, 1]]
    if "has_answer" in batch:
        negatives["has_answer"] = torch.zeros(num_pairs, dtype=batch["has_answer"].dtype, device=device)
    return {key: negatives[key] for key in dict.fromkeys([*batch, "itm_labels"])}
