"""Visual question answering (VQA v2): answer vocabulary, soft targets, the model, fine-tuning and prediction.

- ``config``: the ``vqa:`` section (``VqaConfig``) and the fine-tuning config file (``VqaFinetuneConfig``).
- ``answers``: the answer vocabulary (``build_answer_vocab``): the answers given at least ``min_answer_count``
  times in the training annotations, after the official normalisation (``metric.normalize_answer``: punctuation,
  number words to digits, articles, contractions). Counted over each question's ``multiple_choice_answer`` (the
  bottom-up-attention / UNITER / LXMERT rule; k = 9 gives VQA v2's 3,129 answers) or, with
  ``answer_counting: all``, over every annotator answer. Ordered by count, then alphabetically. Targets
  (``soft_targets``): for every vocabulary answer an annotator gave, its official score: for each of the 10
  annotators left out in turn, min(1, matches among the other 9 / 3), averaged (0.3 / 0.6 / 0.9 / 1.0 for
  1 / 2 / 3 / 4+ matches). That is exactly the accuracy the official metric gives that answer, so a model that
  predicts the highest-target answer scores the maximum achievable accuracy.
- ``metric``: the official VQA accuracy.
- ``data``: questions joined with their image's regions from a feature store by image id (``vqa_examples``,
  ``VqaCollator``). Training skips (and counts) questions whose image has no features; prediction refuses them.
- ``model``: ``VqaModel``: any fusion model + ``AnswerHead`` (Linear(H, 2H) -> GELU -> LayerNorm -> Linear(2H, A),
  LXMERT's) over the pooled output; loss = binary cross-entropy with logits against the soft targets, averaged
  over (questions x answers) and multiplied by the vocabulary size (UNITER / LXMERT), i.e. summed over answers.
  ``VQA_RUN``: how a VQA run directory loads (``vl.tasks.runs.load_task_run``).
- ``commands``: ``vl finetune vqa``, ``vl predict vqa``, ``vl evaluate vqa``.
- ``one_image``: ``vl vqa``: one question about one image file.

A VQA run directory holds ``config.yaml`` (a ``vl.tasks.runs.TaskRun``: ``model:`` and ``heads:`` sections, so
``vl.checkpoints.vl_run.load_vl_run`` also loads it, with its answer head), ``model.safetensors`` (``fusion.*``,
``heads.answer.*``), ``answers.json`` (the vocabulary), ``vocab.txt`` + ``tokenizer_config.json``,
``val_metrics.json`` and what the training loop writes.
"""
