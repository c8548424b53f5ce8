"""The distillation losses as plain tensor functions (``docs/methods/distill.md``).

Every function takes logits or codes and returns a scalar; the ``distill`` pass's module
calls them on the tensors of the last forward. Conventions:

* Class dimension ``class_dim``: 1 (logits ``(N, K)`` or ``(N, K, ...)``, the default) or -1
  (classes last: language-model logits ``(B, S, V)``, Hugging Face's layout).
* ``class_dim=1``: ``reduction="batchmean"``: the KL summed over classes (and positions),
  divided by the batch size N: the mathematical KL per sample, Hinton's convention.
  ``reduction="mean"``: divided by every element (``N * K * ...``), what
  ``nn.KLDivLoss()`` does by default and what the Tf-KD authors' code uses; it is the
  batchmean value divided by K (times the positions), which their ``multiplier`` makes up for.
* ``class_dim=-1``: every position of the leading dims is a sample (for ``(B, S, V)``: every
  token of every sequence), and positions whose label is ``ignore_index`` (-100, Hugging
  Face's padding label) do not count: ``batchmean`` is the KL summed over the vocabulary and
  averaged over the counted tokens (mean over tokens and batch, the same tokens
  ``F.cross_entropy(..., ignore_index=-100)`` averages over); ``mean`` divides that by V too.
  Without labels (``targets=None``) every position counts. For 2-D logits ``(N, K)`` the two
  class dims agree when no label is ``ignore_index``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["batchmean", "mean"]

CORRECT_PROB = 0.99
"""Tf-KD reg: the virtual teacher's probability of the true class before the temperature."""


IGNORE_INDEX = -100
"""The label of positions that do not count (Hugging Face's and ``F.cross_entropy``'s default)."""


def check_class_dim(class_dim: int) -> None:
    if class_dim not in (1, -1):
        raise ValueError(f"class_dim must be 1 or -1, got {class_dim!r}")


def kl_divergence(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
    *,
    class_dim: int = 1,
    weights: Tensor | None = None,
) -> Tensor:
    """``KL(target || softmax(student / T))`` over ``class_dim`` with the given reduction.

    ``class_dim=1``: the module docstring's per-sample convention (``weights`` unused).
    ``class_dim=-1``: every leading position is a sample; ``weights`` (0/1 per position, the
    leading shape) says which count, the KL is averaged over the counted positions.
    """
    check_class_dim(class_dim)
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")
    log_p = F.log_softmax(student_logits / temperature, dim=class_dim)
    terms = torch.special.xlogy(target_probs, target_probs) - target_probs * log_p
    if class_dim == 1:
        if reduction == "batchmean":
            return terms.sum() / student_logits.shape[0]
        return terms.mean()
    per_position = terms.sum(-1)
    if weights is None:
        count = per_position.new_tensor(float(per_position.numel()))
    else:
        weights = weights.to(per_position.dtype)
        per_position = per_position * weights
        count = weights.sum().clamp_min(1.0)
    loss = per_position.sum() / count
    return loss / student_logits.shape[-1] if reduction == "mean" else loss


def counted(
    targets: Tensor | None, logits: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor | None:
    """The 0/1 weights of the positions of classes-last ``logits`` whose label counts.

    ``targets`` of the leading shape of ``logits`` (``(B, S)`` for ``(B, S, V)``) or of as many
    elements (flattened); ``None`` gives ``None`` (every position counts).
    """
    if targets is None:
        return None
    lead = logits.shape[:-1]
    if targets.shape != lead:
        if targets.numel() != lead.numel():
            raise ValueError(
                f"labels of shape {tuple(targets.shape)} do not fit logits of shape "
                f"{tuple(logits.shape)} with the classes last: expected {tuple(lead)}"
            )
        targets = targets.reshape(lead)
    return targets != ignore_index


def kd_term(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: Reduction = "batchmean",
    *,
    class_dim: int = 1,
    targets: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``: the soft-target term of Hinton KD and Tf-KD self.

    With ``class_dim=-1``, positions labelled ``ignore_index`` in ``targets`` do not count.
    """
    target = F.softmax(teacher_logits.detach() / temperature, dim=class_dim)
    weights = counted(targets, student_logits, ignore_index) if class_dim == -1 else None
    kl = kl_divergence(
        student_logits, target, temperature, reduction, class_dim=class_dim, weights=weights
    )
    return temperature**2 * kl


def cross_entropy(
    logits: Tensor, targets: Tensor, *, class_dim: int = 1, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The mean cross-entropy over the counted positions (``F.cross_entropy``'s convention)."""
    check_class_dim(class_dim)
    if class_dim == 1:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    weights = counted(targets, logits, ignore_index)
    assert weights is not None
    flat = targets.reshape(weights.shape).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=ignore_index)


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
    student_logits: Tensor,
    targets: Tensor,
    temperature: float,
    reduction: Reduction = "batchmean",
    *,
    class_dim: int = 1,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``KL(virtual_teacher || softmax(s))``: the student is not temperature-scaled, no T^2.

    With ``class_dim=-1`` the virtual teacher is built per token; positions labelled
    ``ignore_index`` do not count.
    """
    check_class_dim(class_dim)
    if class_dim == 1:
        classes = student_logits.shape[1]
        target = virtual_teacher(targets, classes, temperature).to(student_logits.dtype)
        return kl_divergence(student_logits, target, 1.0, reduction)
    weights = counted(targets, student_logits, ignore_index)
    assert weights is not None
    labels = torch.where(weights, targets.reshape(weights.shape), 0)
    # virtual_teacher puts the classes at dim 1; move them last again
    target = virtual_teacher(labels, student_logits.shape[-1], temperature).movedim(1, -1)
    return kl_divergence(
        student_logits, target.to(student_logits.dtype), 1.0, reduction,
        class_dim=-1, weights=weights,
    )  # fmt: skip


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
