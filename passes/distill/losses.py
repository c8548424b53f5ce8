"""The distillation losses as plain tensor functions (``docs/methods/distill.md``).

Every function takes logits or codes and returns a scalar; the ``distill`` pass's module
calls them on the tensors of the last forward. Conventions:

* Class dimension: 1 (logits ``(N, K)`` or ``(N, K, ...)``).
* ``reduction="batchmean"``: the KL summed over classes (and positions), divided by the
  batch size N: the mathematical KL per sample, Hinton's convention.
  ``reduction="mean"``: divided by every element (``N * K * ...``), what
  ``nn.KLDivLoss()`` does by default and what the Tf-KD authors' code uses; it is the
  batchmean value divided by K (times the positions), which their ``multiplier`` makes up for.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["batchmean", "mean"]

CORRECT_PROB = 0.99
"""Tf-KD reg: the virtual teacher's probability of the true class before the temperature."""


def kl_divergence(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
) -> Tensor:
    """``KL(target || softmax(student / T))`` over dim 1 with the given reduction."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    terms = torch.special.xlogy(target_probs, target_probs) - target_probs * log_p
    if reduction == "batchmean":
        return terms.sum() / student_logits.shape[0]
    if reduction == "mean":
        return terms.mean()
    raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")


def kd_term(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: Reduction = "batchmean",
) -> Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``: the soft-target term of Hinton KD and Tf-KD self."""
    target = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return temperature**2 * kl_divergence(student_logits, target, temperature, reduction)


def virtual_teacher(
    targets: Tensor, num_classes: int, temperature: float, correct_prob: float = CORRECT_PROB
) -> Tensor:
    """Tf-KD reg's target: ``softmax(p_d / T)`` with ``p_d`` 0.99 on the true class, the rest even.

    ``targets`` are class indices ``(N, ...)``; the result has the class in dim 1.
    """
    rest = (1.0 - correct_prob) / (num_classes - 1)
    one_hot = F.one_hot(targets, num_classes).movedim(-1, 1).to(torch.float32)
    p_d = rest + (correct_prob - rest) * one_hot
    return F.softmax(p_d / temperature, dim=1)


def tf_reg_term(
    student_logits: Tensor, targets: Tensor, temperature: float, reduction: Reduction = "batchmean"
) -> Tensor:
    """``KL(virtual_teacher || softmax(s))``: the student is not temperature-scaled, no T^2."""
    target = virtual_teacher(targets, student_logits.shape[1], temperature).to(student_logits.dtype)
    return kl_divergence(student_logits, target, 1.0, reduction)


def normalized_l1(a: Tensor, b: Tensor) -> Tensor:
    """``mean |a/||a|| - b/||b|||``, each sample's code flattened and L2-normalised (IE-KD L_inh)."""
    a = F.normalize(a.flatten(1), dim=1)
    b = F.normalize(b.flatten(1), dim=1)
    return (a - b).abs().mean()


def abs_cosine(a: Tensor, b: Tensor) -> Tensor:
    """``mean |cos(a, b)|`` over the batch, codes flattened per sample (IE-KD L_exp, variant 2)."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).abs().mean()


def exploration_loss(
    code: Tensor, teacher_code: Tensor, variant: Literal["neg_l1", "abs_cos"]
) -> Tensor:
    """IE-KD ``L_exp``: ``-L_inh`` (``"neg_l1"``) or ``mean |cos|`` (``"abs_cos"``)."""
    if variant == "neg_l1":
        return -normalized_l1(code, teacher_code)
    if variant == "abs_cos":
        return abs_cosine(code, teacher_code)
    raise ValueError(f"exploration variant must be 'neg_l1' or 'abs_cos', got {variant!r}")
