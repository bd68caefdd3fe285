"""A Hugging Face LXMERT VQA checkpoint (``LxmertForQuestionAnswering``, or any LXMERT directory with its
``answer_head``) and its answer list as a VQA run of ours: ``vl convert --from-hf HF_DIR --answers ANSWERS.json
--out RUN``.

The run is what ``vl finetune vqa`` writes (``config.yaml`` of task ``vqa``, ``model.safetensors`` with
``fusion.*`` and ``heads.answer.*``, ``answers.json``), so ``vl predict vqa``, ``vl evaluate``, ``vl vqa``,
``vl quantize`` and ``vl distill`` take it. Hugging Face's LXMERT reads boxes divided by the image size, as our
``lxmert4`` geometry does. The answer list is a JSON list of answer strings in logit order (LXMERT's
``trainval_label2ans.json``), or ``{"answers": [...]}`` as our runs store it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vl.errors import UserError


def read_answer_list(path: str | os.PathLike) -> list[str]:
    """The answer strings of ``path`` (a JSON list, or ``{"answers": [...]}``), in logit order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"--answers {path}: cannot read it as JSON ({str(err).splitlines()[0]})") from None
    answers = data.get("answers") if isinstance(data, dict) else data
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"--answers {path}: expected a JSON list of answer strings (or {{\"answers\": [...]}})")
    if len(set(answers)) != len(answers):
        raise UserError(f"--answers {path}: the answers are not distinct")
    return answers


def convert_hf_vqa(source: str | os.PathLike, answers_path: str | os.PathLike, out: str | os.PathLike,
                   ignore_unknown: bool = False) -> tuple[int, int]:
    """Write the VQA run of ``source`` with the answers of ``answers_path`` into ``out``; returns (answers,
    parameters)."""
    from vl.checkpoints.hf_vl import LXMERT_KIND, load_hf_vl_model
    from vl.checkpoints.io import detect_checkpoint_kind, save_weights
    from vl.config import save_config
    from vl.tasks.runs import TaskRun
    from vl.tasks.vqa.answers import ANSWERS_FILE, write_answers
    from vl.tasks.vqa.config import VqaConfig
    from vl.tasks.vqa.model import VqaModel

    kind = detect_checkpoint_kind(source)
    if kind != LXMERT_KIND:
        raise UserError(f"--answers takes a Hugging Face LXMERT VQA checkpoint; --from-hf {source} is '{kind}'")
    model, _ = load_hf_vl_model(source, ignore_unknown=ignore_unknown)
    if model.heads.answer is None:
        raise UserError(f"--from-hf {source} has no answer head (answer_head.*): it is no VQA checkpoint")
    answers = read_answer_list(answers_path)
    scored = model.heads.answer.classifier.out_features
    if len(answers) != scored:
        raise UserError(f"--answers {answers_path} lists {len(answers)} answers but {source}'s answer head scores "
                        f"{scored}")
    vqa = VqaModel(model.fusion, scored)
    vqa.heads.answer.load_state_dict(model.heads.answer.state_dict())
    run = TaskRun(task="vqa", model=model.cfg, heads=VqaModel.heads_config(scored),
                  settings=VqaConfig(min_answer_count=1), init=str(Path(source).resolve()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_answers(answers, out / ANSWERS_FILE)
    save_weights(vqa.state_dict(), out / "model.safetensors")
    save_config(run.to_config(), out)  # last: a run directory with config.yaml is complete
    return scored, sum(p.numel() for p in vqa.parameters())
