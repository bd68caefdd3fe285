"""Retrieval metrics and rankings: Recall@K (``recall_at_k``), two-stage re-ranking of first-stage candidates
(``rerank``) and the RANKINGS.json document (``rankings_json``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vl.tasks.retrieval.data import RetrievalSplit

RECALL_KS = (1, 5, 10)


def recall_at_k(rankings: torch.Tensor, positives: Sequence[Sequence[int]],
                ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K in percent: the share of queries with a positive among their first K ranked candidates.

    rankings: (Q, L) candidate indices, best first (L >= max(ks) or all candidates); positives: per query, the
    indices of its correct candidates.
    """
    if rankings.shape[0] != len(positives):
        raise ValueError(f"{rankings.shape[0]} rankings for {len(positives)} queries")
    if rankings.shape[0] == 0:
        return {f"R@{k}": 0.0 for k in ks}
    hit_rank = torch.full((rankings.shape[0],), rankings.shape[1], dtype=torch.long)
    for query, correct in enumerate(positives):
        found = torch.isin(rankings[query], torch.tensor(list(correct), dtype=rankings.dtype))
        if bool(found.any()):
            hit_rank[query] = int(found.nonzero()[0, 0])
    return {f"R@{k}": 100.0 * float((hit_rank < k).float().mean()) for k in ks}


def rerank(first_stage: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           keep: int, query_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage ranking: each query's top ``k`` candidates by ``first_stage`` (Q, N) re-ranked by
    ``score_pairs(query_index (P,), candidate_index (P,)) -> (P,)``, followed by the rest in first-stage order.

    Returns the first ``keep`` ranked candidate indices (Q, keep) and their scores: the ITM score for re-ranked
    candidates, ``-inf`` for the others (which always rank below every re-ranked one).
    """
    num_queries, num_candidates = first_stage.shape
    k = min(k, num_candidates)
    keep = min(keep, num_candidates)
    depth = max(k, keep)
    order = first_stage.topk(depth, dim=1).indices  # (Q, depth), first-stage order
    rankings = torch.empty(num_queries, keep, dtype=torch.long)
    scores = torch.full((num_queries, keep), float("-inf"))
    for start in range(0, num_queries, query_chunk):
        stop = min(start + query_chunk, num_queries)
        candidates = order[start:stop, :k]  # (q, k)
        queries = torch.arange(start, stop)[:, None].expand_as(candidates)
        itm = score_pairs(queries.reshape(-1), candidates.reshape(-1)).view(stop - start, k)  # (q, k)
        itm_sorted, position = itm.sort(dim=1, descending=True, stable=True)
        ranked = torch.cat([candidates.gather(1, position), order[start:stop, k:]], dim=1)  # (q, depth)
        rankings[start:stop] = ranked[:, :keep]
        width = min(k, keep)
        scores[start:stop, :width] = itm_sorted[:, :width]
    return rankings, scores


def rankings_json(split: RetrievalSplit, text_to_image: torch.Tensor, image_to_text: torch.Tensor
                  ) -> dict[str, list[dict[str, Any]]]:
    """The RANKINGS.json document (docs/cli.md) from (N_t, L) image rankings and (N_i, L) caption rankings."""
    return {
        "text_to_image": [{"sentid": sentid, "ranked_image_ids": [split.image_ids[i] for i in row]}
                          for sentid, row in zip(split.sentids, text_to_image.tolist())],
        "image_to_text": [{"image_id": image_id, "ranked_sentids": [split.sentids[t] for t in row]}
                          for image_id, row in zip(split.image_ids, image_to_text.tolist())],
    }
