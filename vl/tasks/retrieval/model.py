"""The retrieval model (``RetrievalModel``): a fusion model with the ITM head, single-modality passes for the
first-stage (contrastive) embeddings, and the training losses; how a retrieval run directory loads
(``RETRIEVAL_RUN``, for ``vl.tasks.runs.load_task_run``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vl.fusion import build_fusion
from vl.fusion.base import FusionConfig, VLOutput
from vl.fusion.pretraining import HeadsConfig, VLHeads
from vl.compress.losses import soft_choice_loss
from vl.objectives.itm import hardest_wrong_pairs, pair_batch, sampled_wrong_pairs, score_all_pairs
from vl.tasks.retrieval.config import TASK_NAME, RetrievalConfig
from vl.tasks.runs import TaskFormat
from vl.tasks.vl_finetune import FinetuneModeMixin

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


REGION_KEYS = ("region_feats", "region_boxes", "region_mask", "region_tag_ids", "region_tag_weights")


class ContrastiveHead(nn.Module):
    """Projections of the per-stream summaries to ``embed_dim`` (L2-normalised) and a learned temperature.

    ``logit_scale`` = 1 / temperature, kept in [1, 100] (CLIP).
    """

    def __init__(self, text_dim: int, region_dim: int, embed_dim: int, temperature: float = 0.07):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.region_proj = nn.Linear(region_dim, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()

    def embed_text(self, pooled_text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled_text).float(), dim=-1)  # (B, E)

    def embed_regions(self, pooled_region: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.region_proj(pooled_region).float(), dim=-1)  # (B, E)


def contrastive_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor,
                     image_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over (B, E) x (B, E) normalised embeddings; pair i is (text i, image i).

    Pairs sharing an image id are all positives (the target spreads evenly over them). Returns the loss and the
    text->image top-1 accuracy.
    """
    logits = logit_scale * text_emb @ image_emb.t()  # (B, B)
    if image_ids is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        positives = image_ids[:, None] == image_ids[None, :]
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    loss_t2i = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_i2t = -(targets.t() * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    accuracy = positives.gather(1, logits.detach().argmax(dim=1, keepdim=True)).float().mean()
    return (loss_t2i + loss_i2t) / 2, accuracy


class RetrievalModel(FinetuneModeMixin, nn.Module):
    """``fusion`` + ``heads.itm`` + ``contrastive`` (see the ``vl.tasks.retrieval`` docstring).

    ``embed_texts(text batch)`` / ``embed_images(region batch)`` -> (B, E) first-stage embeddings;
    ``pair_scores(pair batch)`` -> (B,) ITM scores; ``forward(batch)`` -> the training losses
    ``{"itm", "contrastive"}`` and logged values ``itm_acc``, ``contrastive_acc``, ``temperature``.
    """

    def __init__(self, fusion: nn.Module, cfg: RetrievalConfig, itm_head: nn.Linear | None = None):
        super().__init__()
        self.fusion = fusion
        self.heads = VLHeads(fusion, self.heads_config())
        if itm_head is not None:
            self.heads.itm.load_state_dict(itm_head.state_dict())
        if fusion.cfg.pooling == "text_cls":  # pooled_text / pooled_region are masked means of each stream
            text_dim, region_dim = fusion.text_hidden_size, fusion.region_hidden_size
        else:  # ViLBERT: the streams' poolers, both of the pooled width
            text_dim = region_dim = fusion.hidden_size
        self.contrastive = ContrastiveHead(text_dim, region_dim, cfg.embed_dim, cfg.temperature)
        self.rcfg = cfg

    @staticmethod
    def heads_config() -> HeadsConfig:
        return HeadsConfig(mlm=False, itm=True, region_outputs={}, num_answers=0)

    @property
    def cfg(self) -> FusionConfig:
        return self.fusion.cfg

    # single-modality passes ------------------------------------------------------------------------------------
    def text_only(self, batch: dict[str, torch.Tensor]) -> VLOutput:
        """The fusion model on the captions of ``batch`` with one all-masked dummy region each."""
        input_ids = batch["input_ids"]
        rows, device = input_ids.shape[0], input_ids.device
        inputs = {key: batch[key] for key in TEXT_KEYS if key in batch}
        inputs["region_feats"] = torch.zeros(rows, 1, self.cfg.region.feature_dim, device=device)
        inputs["region_boxes"] = torch.zeros(rows, 1, 4, device=device)
        inputs["region_mask"] = torch.zeros(rows, 1, dtype=torch.long, device=device)
        if self.cfg.tags is not None:  # the dummy region's empty tag
            inputs["region_tag_ids"] = torch.zeros(rows, 1, 1, dtype=torch.long, device=device)
            inputs["region_tag_weights"] = torch.zeros(rows, 1, 1, device=device)
        return self.fusion(inputs)

    def regions_only(self, batch: dict[str, torch.Tensor]) -> VLOutput:
        """The fusion model on the regions of ``batch`` with an all-masked ``[CLS] [SEP]`` text each (ids 0: the
        text is never attended, so its ids do not matter)."""
        region_feats = batch["region_feats"]
        rows, device = region_feats.shape[0], region_feats.device
        inputs = {key: batch[key] for key in REGION_KEYS if key in batch}
        inputs["input_ids"] = torch.zeros(rows, 2, dtype=torch.long, device=device)
        inputs["attention_mask"] = torch.zeros(rows, 2, dtype=torch.long, device=device)
        inputs["token_type_ids"] = torch.zeros(rows, 2, dtype=torch.long, device=device)
        return self.fusion(inputs)

    def embed_texts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.contrastive.embed_text(self.text_only(batch).pooled_text)  # (B, E)

    def embed_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.contrastive.embed_regions(self.regions_only(batch).pooled_region)  # (B, E)

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.heads.itm(self.pooled_output(batch))  # (B, 2)
        return (logits[:, 1] - logits[:, 0]).float()  # (B,): as match_scores

    # training -------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], teacher: RetrievalModel | None = None,
                temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """With a ``teacher`` (``vl distill``), also ``distill``: the mean of the KL divergences, at
        ``temperature``, of this model's in-batch similarity distributions (caption->images, image->captions) and
        of its ITM rankings (each anchor's matched and mismatched pairs) from the teacher's on the same pairs."""
        inputs = {key: batch[key] for key in (*TEXT_KEYS, *REGION_KEYS) if key in batch}
        image_ids = batch.get("image_ids")
        text_emb, image_emb = self.embed_texts(inputs), self.embed_images(inputs)
        scale = self.contrastive.logit_scale
        contrastive, contrastive_acc = contrastive_loss(text_emb, image_emb, scale, image_ids)
        losses = {"contrastive": contrastive, "contrastive_acc": contrastive_acc, "temperature": (1.0 / scale).detach()}
        losses.update(self._itm_losses(inputs, text_emb, image_emb, image_ids, teacher, temperature))
        if teacher is not None:
            with torch.no_grad():
                teacher_similarity = teacher.contrastive.logit_scale * (teacher.embed_texts(inputs)
                                                                        @ teacher.embed_images(inputs).t())
            similarity = scale * text_emb @ image_emb.t()
            losses["distill"] = (soft_choice_loss(similarity, teacher_similarity, temperature)
                                 + soft_choice_loss(similarity.t(), teacher_similarity.t(), temperature)
                                 + 2 * losses.pop("itm_distill")) / 4
        return losses

    def _itm_losses(self, inputs: dict[str, torch.Tensor], text_emb: torch.Tensor, image_emb: torch.Tensor,
                    image_ids: torch.Tensor | None, teacher: RetrievalModel | None = None,
                    temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """UNITER's hard-negative ITM loss: per anchor (caption, and image), softmax cross-entropy of the matched
        pair's score against its mismatched pairs' scores. ``itm_acc``: share of anchors whose matched pair wins.
        With a ``teacher``, ``itm_distill``: the KL divergence of those rankings from the teacher's."""
        size, device = inputs["input_ids"].shape[0], inputs["input_ids"].device
        positives = torch.arange(size, device=device)
        groups = self._negatives(inputs, text_emb, image_emb, image_ids)  # [(anchor kind, (N, 2) pairs)]
        if not groups:  # a single image: nothing to rank against
            zero = self.heads.itm.weight.sum() * 0.0
            return {"itm": zero, "itm_acc": torch.ones((), device=device),
                    **({"itm_distill": zero} if teacher is not None else {})}
        text_index = torch.cat([positives] + [pairs[:, 0] for _, pairs in groups])
        region_index = torch.cat([positives] + [pairs[:, 1] for _, pairs in groups])
        pairs_batch = pair_batch(inputs, text_index, region_index)
        scores = self.pair_scores(pairs_batch)  # (B + N,)
        teacher_scores = None
        if teacher is not None:
            with torch.no_grad():
                teacher_scores = teacher.pair_scores(pairs_batch)
        losses, wins, distilled = [], [], []
        offset = size
        for anchor, pairs in groups:
            rows = torch.arange(offset, offset + len(pairs), device=device)
            offset += len(pairs)
            anchors = pairs[:, 0] if anchor == "text" else pairs[:, 1]
            counts = torch.bincount(anchors, minlength=size)
            slot = torch.arange(len(pairs), device=device) - (counts.cumsum(0) - counts)[anchors]
            where = (anchors, counts, slot, rows)
            ranked = _ranking(scores, *where)
            losses.append(F.cross_entropy(ranked, torch.zeros(len(ranked), dtype=torch.long, device=device)))
            wins.append((ranked.detach().argmax(dim=1) == 0).float())
            if teacher_scores is not None:
                distilled.append(soft_choice_loss(ranked, _ranking(teacher_scores, *where), temperature))
        out = {"itm": torch.stack(losses).mean(), "itm_acc": torch.cat(wins).mean()}
        if distilled:
            out["itm_distill"] = torch.stack(distilled).mean()
        return out

    def _negatives(self, inputs: dict[str, torch.Tensor], text_emb: torch.Tensor, image_emb: torch.Tensor,
                   image_ids: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
        """Mismatched pairs as (anchor, (N, 2) rows of (caption index, image index)), rows grouped by anchor:
        ``hard_negatives`` per caption ("text") and per image ("regions"), or one random wrong image per caption."""
        size, device = inputs["input_ids"].shape[0], inputs["input_ids"].device
        if size < 2:
            return []
        if self.rcfg.hard_negatives == 0:
            captions = torch.arange(size, device=device)
            pairs = torch.stack([captions, (captions + torch.randint(1, size, (), device=device)) % size], dim=1)
            if image_ids is not None:
                pairs = pairs[image_ids[pairs[:, 0]] != image_ids[pairs[:, 1]]]
            return [("text", pairs)] if len(pairs) else []
        k = min(self.rcfg.hard_negatives, size - 1)
        source = self.rcfg.hard_negative_source
        if source == "itm":
            scores = score_all_pairs(self.fusion, self.heads.itm, inputs)  # (B, B), no gradients
        else:
            scores = (text_emb @ image_emb.t()).detach()
        groups = []
        for anchor in ("text", "regions"):
            if source == "sampled":  # ALBEF: drawn in proportion to softmax(similarity / temperature)
                pairs = sampled_wrong_pairs(scores * self.contrastive.logit_scale.detach(), k, anchor, image_ids)
            else:
                pairs = hardest_wrong_pairs(scores, k, anchor, image_ids)
            if len(pairs):
                groups.append((anchor, pairs))
        return groups


def _ranking(scores: torch.Tensor, anchors: torch.Tensor, counts: torch.Tensor, slot: torch.Tensor,
             rows: torch.Tensor) -> torch.Tensor:
    """(anchors with negatives, 1 + k) pair scores: the matched pair's (``scores[:B]``) first, then the anchor's
    mismatched pairs' (``scores[rows]``, at ``slot``), -inf where an anchor has fewer."""
    size = counts.shape[0]
    table = scores.new_full((size, int(counts.max()) + 1), float("-inf"))
    table[:, 0] = scores[:size]
    table[anchors, slot + 1] = scores[rows]
    return table[counts > 0]


RETRIEVAL_RUN = TaskFormat(task=TASK_NAME, title="retrieval", settings=RetrievalConfig,
                           build=lambda run: RetrievalModel(build_fusion(run.model), run.settings),
                           extra={"karpathy": str})
