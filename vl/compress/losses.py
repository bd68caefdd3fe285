"""Knowledge-distillation losses (Hinton et al., 2015): a student's scores against a teacher's on the same inputs,
both softened by a temperature tau, times tau^2 so that the gradients keep their scale as tau changes. Each is a
KL divergence, 0 where the student scores as the teacher does. ``vl.compress.distill`` trains students with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_answer_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Independent answers (VQA's sigmoid per answer): the binary KL divergence of the student's answer
    probabilities at ``temperature`` from the teacher's, summed over answers and averaged over questions as the VQA
    loss is."""
    teacher_logits = teacher_logits.float() / temperature
    targets = torch.sigmoid(teacher_logits)
    loss = (F.binary_cross_entropy_with_logits(student_logits.float() / temperature, targets)
            - F.binary_cross_entropy_with_logits(teacher_logits, targets))
    return loss * targets.shape[1] * temperature ** 2


def soft_choice_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One choice among the last dimension's candidates (a softmax: classes, or the images of a caption): the KL
    divergence of the student's distribution at ``temperature`` from the teacher's, averaged over rows. Candidates
    that are -inf in the teacher's logits (padding) are left out; they must be -inf in the student's too."""
    teacher = teacher_logits.float() / temperature
    student = student_logits.float() / temperature
    present = torch.isfinite(teacher)
    teacher_log = teacher.log_softmax(dim=-1)
    student_log = student.log_softmax(dim=-1)
    terms = torch.where(present, teacher_log.exp() * (teacher_log - student_log), torch.zeros_like(teacher))
    return terms.sum(dim=-1).mean() * temperature ** 2


def hidden_state_loss(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """TinyBERT's hidden-state loss: for each (student, teacher, mask) of (B, N, H) states and a (B, N) mask of the
    real positions (None: all), the mean squared error over the real positions; the mean over the pairs."""
    losses = []
    for student, teacher, mask in pairs:
        error = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (B, N)
        if mask is None:
            losses.append(error.mean())
        else:
            weights = mask.to(error.dtype)
            losses.append((error * weights).sum() / weights.sum().clamp_min(1.0))
    return torch.stack(losses).mean()
