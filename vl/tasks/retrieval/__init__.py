"""Image-text retrieval on a Karpathy split: fine-tuning, Recall@K, and a two-stage evaluator.

Modules: ``config`` (the ``retrieval:`` section and the config file), ``model`` (``RetrievalModel``, its losses,
``RETRIEVAL_RUN``), ``data`` (splits, training examples, batches), ``metrics`` (Recall@K, re-ranking,
RANKINGS.json), ``index`` (``RetrievalIndex`` and its evaluation), ``commands`` (``vl finetune retrieval``,
``vl evaluate retrieval``).

**Model** (``RetrievalModel``): a fusion model with

- the ITM head (``heads.itm``, Linear(H, 2) on the pooled output; the pretrained one when ``--init`` has it). A
  pair's score is logit(matched) - logit(mismatched) (``vl.objectives.itm.match_scores``);
- unimodal encodings for a cheap first stage (``contrastive``): the SAME fusion model run with one modality only.
  A *text-only pass* feeds the caption with one all-masked dummy region; a *regions-only pass* feeds the image's
  regions with an all-masked ``[CLS] [SEP]``. In a single-stream model the masked part is never attended, so the
  pass is a pure text (or region) encoder through the shared layers; in a dual-stream model the stream attends to
  a constant placeholder, so its output still depends on its own modality only. The per-stream summaries
  (``VLOutput.pooled_text`` / ``pooled_region``: masked means, or ViLBERT's stream poolers) are projected to
  ``embed_dim`` and L2-normalised (``ContrastiveHead``). Embeddings of a caption and of an image can therefore be
  computed once and cached, independently of each other.

**Training** (``vl finetune retrieval``): each batch holds B images, each with one of its captions (drawn anew every
epoch), so in-batch pairs are true negatives. Losses: ``contrastive``: symmetric InfoNCE over the B x B cosine
similarities with a learned temperature (CLIP / ALBEF); ``itm``: UNITER's hard-negative objective. The current model
scores every wrong (caption, image) pair of the batch without gradients; for each caption and for each image its
``hard_negatives`` highest-scoring wrong partners are kept, and the loss is the softmax cross-entropy of the matched
pair's ITM score against theirs (one group per anchor). A binary loss over 1 positive and 2k hard negatives tends to
collapse to "never matched"; the ranking form cannot. ``hard_negative_source: contrastive`` takes the hardest by
first-stage similarity instead, which costs no extra forward passes; ``sampled`` draws them with probability
softmax(similarity / temperature) over the wrong partners, as ALBEF does: near-random while the embeddings are
untrained, harder as they learn, and a near-duplicate caption is not always the one drawn. ``hard_negatives: 0``
ranks each caption's image against one random wrong image.

**Evaluation** (``vl evaluate retrieval``, ``RetrievalIndex``): the split's captions and images are embedded once
(first stage, O(N) passes); for each caption the top ``k`` images by cosine similarity, and for each image the top
``k`` captions, are re-ranked by the pair score of the full model (O(N k) pair passes instead of O(N^2)). The pair
score (``pair_score``) is the ITM score (logit matched - logit mismatched); by default that plus the pair's
first-stage cosine similarity, as BLIP re-ranks, so that a well-trained ITM head dominates it; or
``itm+contrastive``, that plus the contrastive logit (cosine / temperature): two log-odds added, so that the ITM
head moves a pair only as far as it is confident, and a weak one cannot undo a good first stage. ``--full`` gives
every pair the same score instead. Recall@K (``recall_at_k``): text->image counts a caption as found when its image
is in the top K; image->text counts an image as found when any of its captions is in the top K.

A retrieval run directory holds ``config.yaml`` (a ``vl.tasks.runs.TaskRun``), ``model.safetensors`` (``fusion.*``,
``heads.itm.*``, ``contrastive.*``), ``vocab.txt`` + ``tokenizer_config.json``, ``val_metrics.json`` and what the
training loop writes.
"""
