"""The retrieval index (``RetrievalIndex``): a split's cached inputs and first-stage embeddings for one model, with
pair scoring and single queries (``vl serve``); its evaluation (``evaluate_index``: first stage, two-stage and full
Recall@K with wall times) and the report's printed lines (``format_report``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from vl.data.tags import region_tagger
from vl.errors import UserError
from vl.progress import progress_bar
from vl.tasks.retrieval.config import PAIR_SCORES, PairScore, RetrievalConfig
from vl.tasks.retrieval.data import RetrievalSplit
from vl.tasks.retrieval.metrics import RECALL_KS, recall_at_k, rerank
from vl.tasks.retrieval.model import RetrievalModel
from vl.tasks.vl_finetune import encode_texts, model_device, read_regions, region_batch, text_batch
from vl.text.tokenizer import Tokenizer


class RetrievalIndex:
    """A split's captions (tokenised) and regions (in memory), with their first-stage embeddings, for one model.

    Built once (``time_embed_s`` says how long the embeddings took); ``score_pairs`` runs the full model on
    (caption, image) index pairs and gives their pair score (``pair_score``: the ITM score, or the ITM score plus
    the pair's first-stage cosine similarity, as BLIP re-ranks); ``search`` and ``captions_for_image`` answer single
    queries (``vl serve``).
    """

    def __init__(self, model: RetrievalModel, tokenizer: Tokenizer, split: RetrievalSplit, store: Any,
                 cfg: RetrievalConfig, batch_size: int | None = None, progress: bool | None = None,
                 pair_score: PairScore | None = None):
        self.model = model.eval()
        self.pair_score = pair_score or cfg.pair_score
        if self.pair_score not in PAIR_SCORES:
            raise UserError(f"--score must be one of {', '.join(PAIR_SCORES)}, got {self.pair_score!r}")
        self.tokenizer = tokenizer
        self.split = split
        self.cfg = cfg
        self.logit_scale = float(model.contrastive.logit_scale.detach())  # 1 / the learned temperature
        self.batch_size = batch_size or cfg.eval_batch_size
        self.device = model_device(model)
        self.feature_dim = model.cfg.region.feature_dim
        self.progress = progress
        token_ids = encode_texts(tokenizer, split.texts, cfg.max_text_len)
        text = text_batch(token_ids, tokenizer.pad_id)
        self.text_ids, self.text_mask = text["input_ids"], text["attention_mask"]  # (N_t, T)
        tagger = region_tagger(store, tokenizer, model.cfg)
        bank = region_batch([read_regions(store, image_id, cfg.max_regions, tagger) for image_id in split.image_ids],
                            self.feature_dim)
        bank["region_feats"] = bank["region_feats"].to(torch.float16)  # (N_i, R, D), as the store keeps them
        self.region_bank = bank  # region_feats, region_boxes (N_i, R, 4), region_mask (N_i, R) [, tags (N_i, R, L)]
        self.region_mask = bank["region_mask"]
        start = time.perf_counter()
        self.text_emb = self._embed(len(split.texts), self._texts, model.embed_texts, "embed captions")
        self.image_emb = self._embed(len(split.image_ids), self._images, model.embed_images, "embed images")
        self.time_embed_s = time.perf_counter() - start

    # batches ------------------------------------------------------------------------------------------------------
    def _texts(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = self.text_mask[index]
        length = max(1, int(mask.sum(dim=1).max()))
        ids = self.text_ids[index, :length]
        return {"input_ids": ids, "attention_mask": mask[:, :length], "token_type_ids": torch.zeros_like(ids)}

    def _images(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        count = max(1, int(self.region_mask[index].sum(dim=1).max()))
        batch = {key: value[index, :count] for key, value in self.region_bank.items()}
        batch["region_feats"] = batch["region_feats"].float()
        return batch

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    @torch.no_grad()
    def _embed(self, count: int, make: Callable, encode: Callable, desc: str) -> torch.Tensor:
        chunks = []
        show = False if self.progress is False else None
        for start in progress_bar(range(0, count, self.batch_size), desc=desc, show=show, leave=False):
            index = torch.arange(start, min(start + self.batch_size, count))
            chunks.append(encode(self._to_device(make(index))).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.cfg.embed_dim)

    # scoring ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_pairs(self, text_index: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """(P,) pair scores of the (caption ``text_index[p]``, image ``image_index[p]``) pairs."""
        scores = []
        for start in range(0, len(text_index), self.batch_size):
            texts = text_index[start:start + self.batch_size]
            images = image_index[start:start + self.batch_size]
            batch = {**self._texts(texts), **self._images(images)}
            scores.append(self.model.pair_scores(self._to_device(batch)).cpu())
        itm = torch.cat(scores) if scores else torch.zeros(0)
        return self._with_similarity(itm, (self.text_emb[text_index] * self.image_emb[image_index]).sum(dim=1))

    def _with_similarity(self, itm: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """The pair score from the ITM scores and the pairs' first-stage cosine similarities (both (P,))."""
        if self.pair_score == "itm+similarity":
            return itm + similarity
        if self.pair_score == "itm+contrastive":  # two log-odds: ITM's and the contrastive logit (cosine / temp)
            return itm + similarity * self.logit_scale
        return itm

    def first_stage(self) -> torch.Tensor:
        """(N_t, N_i) cosine similarities of the cached caption and image embeddings."""
        return self.text_emb @ self.image_emb.t()

    @torch.no_grad()
    def query_embedding(self, text: str) -> torch.Tensor:
        """(E,) first-stage embedding of a new caption."""
        ids = encode_texts(self.tokenizer, [text], self.cfg.max_text_len)
        return self.model.embed_texts(self._to_device(text_batch(ids, self.tokenizer.pad_id)))[0].float().cpu()

    @torch.no_grad()
    def search(self, text: str, top: int = 10, k: int | None = None) -> list[dict[str, Any]]:
        """The ``top`` images for a caption: first-stage top ``k`` re-ranked by the pair score. Each result:
        ``image_index``, ``image_id``, ``score`` (the pair score; None beyond the re-ranked ones), ``similarity``
        (first stage)."""
        k = min(k or self.cfg.rerank_k, len(self.split.image_ids))
        similarity = self.image_emb @ self.query_embedding(text)  # (N_i,)
        candidates = similarity.topk(max(k, min(top, len(similarity)))).indices
        ids = encode_texts(self.tokenizer, [text], self.cfg.max_text_len)
        text_part = text_batch(ids * len(candidates[:k]), self.tokenizer.pad_id)
        batch = {**text_part, **self._images(candidates[:k])}
        itm = self._with_similarity(self.model.pair_scores(self._to_device(batch)).cpu(), similarity[candidates[:k]])
        order = itm.argsort(descending=True, stable=True)
        ranked = [(int(candidates[i]), float(itm[i])) for i in order.tolist()]
        ranked += [(int(index), None) for index in candidates[k:].tolist()]
        return [{"image_index": index, "image_id": self.split.image_ids[index], "score": score,
                 "similarity": float(similarity[index])} for index, score in ranked[:top]]

    @torch.no_grad()
    def captions_for_image(self, image_index: int, top: int = 10, k: int | None = None) -> list[dict[str, Any]]:
        """The ``top`` captions of the split for one image (first stage, then the top ``k`` re-ranked)."""
        k = min(k or self.cfg.rerank_k, len(self.split.texts))
        similarity = self.text_emb @ self.image_emb[image_index]  # (N_t,)
        candidates = similarity.topk(max(k, min(top, len(similarity)))).indices
        itm = self.score_pairs(candidates[:k], torch.full((len(candidates[:k]),), image_index, dtype=torch.long))
        order = itm.argsort(descending=True, stable=True)
        ranked = [(int(candidates[i]), float(itm[i])) for i in order.tolist()]
        ranked += [(int(index), None) for index in candidates[k:].tolist()]
        return [{"text_index": index, "sentid": self.split.sentids[index], "text": self.split.texts[index],
                 "score": score, "similarity": float(similarity[index]),
                 "matches": self.split.text_image[index] == image_index} for index, score in ranked[:top]]


def evaluate_index(index: RetrievalIndex, k: int, full: bool = False, keep: int = 10) -> tuple[dict[str, Any],
                                                                                               dict[str, torch.Tensor]]:
    """Recall@1/5/10 both ways for the first stage, the two-stage ranking (top ``k`` re-ranked) and, with
    ``full``, ITM on every pair; with wall times. Returns (report, rankings) where rankings holds the ``keep``
    best of the two-stage (or, with ``full``, the full) ranking: ``text_to_image`` (N_t, L), ``image_to_text``."""
    split = index.split
    image_positives = [[image] for image in split.text_image]
    text_positives = index.split.captions_of_image
    keep = max(keep, max(RECALL_KS))
    start = time.perf_counter()
    similarity = index.first_stage()  # (N_t, N_i)
    depth_i = min(max(keep, k), similarity.shape[1])
    depth_t = min(max(keep, k), similarity.shape[0])
    first_t2i = similarity.topk(depth_i, dim=1).indices
    first_i2t = similarity.t().topk(depth_t, dim=1).indices
    first_s = time.perf_counter() - start
    report: dict[str, Any] = {
        "num_images": len(split.image_ids), "num_captions": len(split.texts), "k": k,
        "pair_score": index.pair_score,
        "first_stage": {"text_to_image": recall_at_k(first_t2i, image_positives),
                        "image_to_text": recall_at_k(first_i2t, text_positives),
                        "seconds": round(index.time_embed_s + first_s, 4)},
    }
    start = time.perf_counter()
    two_t2i, _ = rerank(similarity, k, index.score_pairs, keep)
    two_i2t, _ = rerank(similarity.t(), k, lambda images, texts: index.score_pairs(texts, images), keep)
    rerank_s = time.perf_counter() - start
    report["two_stage"] = {"text_to_image": recall_at_k(two_t2i, image_positives),
                           "image_to_text": recall_at_k(two_i2t, text_positives),
                           "seconds": round(index.time_embed_s + first_s + rerank_s, 4),
                           "rerank_seconds": round(rerank_s, 4)}
    rankings = {"text_to_image": two_t2i, "image_to_text": two_i2t}
    if full:
        start = time.perf_counter()
        num_texts, num_images = len(split.texts), len(split.image_ids)
        all_scores = all_pair_scores(index)  # (N_t, N_i): every pair through the fusion model
        full_t2i = all_scores.topk(min(keep, num_images), dim=1).indices
        full_i2t = all_scores.t().topk(min(keep, num_texts), dim=1).indices
        full_s = time.perf_counter() - start
        report["full"] = {"text_to_image": recall_at_k(full_t2i, image_positives),
                          "image_to_text": recall_at_k(full_i2t, text_positives), "seconds": round(full_s, 4)}
        rankings = {"text_to_image": full_t2i, "image_to_text": full_i2t}
    return report, rankings


def all_pair_scores(index: RetrievalIndex, query_chunk: int = 64) -> torch.Tensor:
    """(N_t, N_i) ITM scores of every (caption, image) pair of the index's split."""
    num_texts, num_images = len(index.split.texts), len(index.split.image_ids)
    rows = []
    for start in progress_bar(range(0, num_texts, query_chunk), desc="score all pairs",
                              show=False if index.progress is False else None, leave=False):
        stop = min(start + query_chunk, num_texts)
        texts = torch.arange(start, stop).repeat_interleave(num_images)
        images = torch.arange(num_images).repeat(stop - start)
        rows.append(index.score_pairs(texts, images).view(stop - start, num_images))
    return torch.cat(rows)


def format_report(report: dict[str, Any]) -> str:
    """The lines ``vl evaluate retrieval`` prints: R@1/5/10 both ways and the wall time of each method."""
    lines = [f"{report['num_captions']} captions, {report['num_images']} images; two-stage re-ranks the top "
             f"{report['k']} by {report['pair_score']}"]
    for method in ("first_stage", "two_stage", "full"):
        if method not in report:
            continue
        part = report[method]
        recalls = "  ".join(f"{direction} " + " ".join(f"{name} {value:.2f}" for name, value in part[key].items())
                            for direction, key in (("text->image", "text_to_image"), ("image->text", "image_to_text")))
        lines.append(f"{method.replace('_', '-'):11s} {recalls}  ({part['seconds']:.2f} s)")
    return "\n".join(lines)
