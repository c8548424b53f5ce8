"""The ``distill`` pass: formulas against independent references, structure, frozen teacher,
options and errors, save/load, IE-KD and IE-DML, property and compile tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter import zoo
from rewriter.passes.distill import (
    Distill,
    Distiller,
    distiller,
    self_teacher,
    strip,
)
from rewriter.passes.distill import losses as L
from rewriter.testing import check_pass, random_models

K = 5
N = 6

# ---------------------------------------------------------------------------
# Fixed tensors and tiny models whose logits are known exactly
# ---------------------------------------------------------------------------


def fixed() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    s = torch.randn(N, K, generator=g) * 2
    t = torch.randn(N, K, generator=g) * 3
    y = torch.randint(0, K, (N,), generator=g)
    return s, t, y


class Identity(nn.Module):
    """logits = x W^T with W = I: the student's logits are its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(K, K, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(K))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def teacher_and_logits() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    s, _, y = fixed()
    teacher = nn.Linear(K, K, bias=True)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(K, K, generator=torch.Generator().manual_seed(3)))
        teacher.bias.copy_(torch.linspace(-1, 1, K))
        t = teacher(s)
    return teacher, s, t, y


def distilled(method: str = "hinton", **options) -> tuple[fx.GraphModule, Tensor, Tensor, Tensor]:
    teacher, s, t, y = teacher_and_logits()
    spec = (
        Distill.with_teacher(teacher, method=method, **options)
        if method != "tf_reg"
        else (
            "distill",
            {"method": method, **options},
        )
    )
    gm = rw.rewrite(Identity(), [spec], (s,))
    return gm, s, t, y


# ---------------------------------------------------------------------------
# Independent references (written with loops and explicit sums)
# ---------------------------------------------------------------------------


def ref_log_softmax(z: list[float]) -> list[float]:
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def ref_ce(s: Tensor, y: Tensor) -> float:
    return sum(-ref_log_softmax(s[i].tolist())[int(y[i])] for i in range(len(s))) / len(s)


def ref_kl(target_rows: list[list[float]], s: Tensor, temperature: float) -> list[float]:
    """Per-sample KL(target || softmax(s / T))."""
    out = []
    for i, q in enumerate(target_rows):
        logp = ref_log_softmax([v / temperature for v in s[i].tolist()])
        out.append(sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, logp, strict=True) if qk > 0))
    return out


def ref_softmax(z: list[float]) -> list[float]:
    return [math.exp(v) for v in ref_log_softmax(z)]


def ref_hinton(s: Tensor, t: Tensor, y: Tensor, a: float, T: float) -> float:
    q = [ref_softmax([v / T for v in row]) for row in t.tolist()]
    kl = sum(ref_kl(q, s, T)) / len(s)  # batch mean
    return (1 - a) * ref_ce(s, y) + a * T * T * kl


def ref_virtual(y: Tensor, T: float) -> list[list[float]]:
    rows = []
    for label in y.tolist():
        p = [(1 - 0.99) / (K - 1)] * K
        p[label] = 0.99
        rows.append(ref_softmax([v / T for v in p]))
    return rows


# ---------------------------------------------------------------------------
# Formula tests: ce + aux_losses == the paper's loss
# ---------------------------------------------------------------------------


def total(gm: fx.GraphModule, s: Tensor, y: Tensor) -> Tensor:
    out = gm(s)
    return F.cross_entropy(out, y) + rw.aux_losses(gm, targets=y)


def test_hinton_matches_independent_formula() -> None:
    gm, s, t, y = distilled("hinton", alpha=0.7, temperature=3.0)
    assert total(gm, s, y).item() == pytest.approx(ref_hinton(s, t, y, 0.7, 3.0), rel=1e-5)


def test_hinton_defaults_are_alpha_09_temperature_4() -> None:
    gm, s, t, y = distilled("hinton")
    d = distiller(gm)
    assert (d.alpha, d.temperature, d.multiplier, d.reduction) == (0.9, 4.0, 1.0, "batchmean")
    assert total(gm, s, y).item() == pytest.approx(ref_hinton(s, t, y, 0.9, 4.0), rel=1e-5)


def test_tf_self_uses_the_authors_reduction_and_multiplier() -> None:
    gm, s, t, y = distilled("tf_self")
    d = distiller(gm)
    assert (d.alpha, d.temperature, d.multiplier, d.reduction) == (0.95, 6.0, 50.0, "mean")
    # the authors' code: nn.KLDivLoss() (mean over batch x classes) * T^2 * multiplier
    kd = nn.KLDivLoss()(F.log_softmax(s / 6, dim=1), F.softmax(t / 6, dim=1)) * 36 * 50
    expected = 0.05 * F.cross_entropy(s, y) + 0.95 * kd
    torch.testing.assert_close(total(gm, s, y), expected)
    # and the same thing from the loop reference: mean = batchmean / K
    q = [ref_softmax([v / 6 for v in row]) for row in t.tolist()]
    kl_mean = sum(ref_kl(q, s, 6.0)) / (N * K)
    assert expected.item() == pytest.approx(
        0.05 * ref_ce(s, y) + 0.95 * 36 * 50 * kl_mean, rel=1e-5
    )


def test_tf_reg_matches_the_authors_loop() -> None:
    gm, s, _, y = distilled("tf_reg", alpha=0.3, temperature=20.0, multiplier=2.0, reduction="mean")
    # the authors' construction, row by row
    soft = torch.ones(N, K) * (1 - 0.99) / (K - 1)
    for i in range(N):
        soft[i, y[i]] = 0.99
    reg = nn.KLDivLoss()(F.log_softmax(s, dim=1), F.softmax(soft / 20, dim=1)) * 2.0
    expected = 0.7 * F.cross_entropy(s, y) + 0.3 * reg
    torch.testing.assert_close(total(gm, s, y), expected)
    kl = sum(ref_kl(ref_virtual(y, 20.0), s, 1.0)) / (N * K)
    assert expected.item() == pytest.approx(0.7 * ref_ce(s, y) + 0.3 * 2.0 * kl, rel=1e-5)


@pytest.mark.parametrize(("reduction", "multiplier"), [("batchmean", 1.0), ("mean", 3.0)])
def test_tf_reg_is_scaled_label_smoothing(reduction: str, multiplier: float) -> None:
    """Same gradient as c * CE with label smoothing eps = K w q_off / c, w the soft weight."""
    a, T = 0.2, 20.0
    gm, s, _, y = distilled(
        "tf_reg", alpha=a, temperature=T, multiplier=multiplier, reduction=reduction
    )
    w = a * multiplier / (K if reduction == "mean" else 1)
    c = (1 - a) + w
    q_off = ref_virtual(torch.tensor([0]), T)[0][1]
    eps = K * w * q_off / c

    x = s.clone().requires_grad_(True)
    total(gm, x, y).backward()
    z = s.clone().requires_grad_(True)
    (c * F.cross_entropy(z, y, label_smoothing=eps)).backward()
    torch.testing.assert_close(x.grad, z.grad, rtol=1e-5, atol=1e-7)
    # ... but the losses differ (by a constant: the virtual teacher's entropy term)
    smoothing = c * F.cross_entropy(s, y, label_smoothing=eps)
    assert abs(total(gm, s, y).item() - smoothing.item()) > 1e-3
    if reduction == "batchmean" and multiplier == 1.0:
        assert eps == pytest.approx(K * a * q_off / 1.0)  # c = 1: plain label smoothing


def test_kl_reductions() -> None:
    s, t, _ = fixed()
    p = F.softmax(t, dim=1)
    batchmean = L.kl_divergence(s, p, 1.0, "batchmean")
    assert batchmean.item() == pytest.approx(sum(ref_kl(p.tolist(), s, 1.0)) / N, rel=1e-5)
    torch.testing.assert_close(L.kl_divergence(s, p, 1.0, "mean"), batchmean / K)
    torch.testing.assert_close(batchmean, F.kl_div(F.log_softmax(s, 1), p, reduction="batchmean"))


def test_ie_losses_match_loops() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    rows_a, rows_b = a.flatten(1).tolist(), b.flatten(1).tolist()
    l1 = (
        sum(
            sum(abs(p - q) for p, q in zip(unit(ra), unit(rb), strict=True))
            for ra, rb in zip(rows_a, rows_b, strict=True)
        )
        / a.numel()
    )
    cos = (
        sum(
            abs(sum(p * q for p, q in zip(unit(ra), unit(rb), strict=True)))
            for ra, rb in zip(rows_a, rows_b, strict=True)
        )
        / 3
    )
    assert L.normalized_l1(a, b).item() == pytest.approx(l1, rel=1e-5)
    assert L.exploration_loss(a, b, "neg_l1").item() == pytest.approx(-l1, rel=1e-5)
    assert L.exploration_loss(a, b, "abs_cos").item() == pytest.approx(cos, rel=1e-5)


# ---------------------------------------------------------------------------
# Structure: Before/Expected, what fired, outputs unchanged
# ---------------------------------------------------------------------------


def student_and_teacher() -> tuple[nn.Module, nn.Module, Tensor]:
    torch.manual_seed(0)
    return (
        zoo.create("digits_cnn", width=4),
        zoo.create("digits_cnn", width=8),
        torch.randn(4, 1, 8, 8),
    )


def test_structure_before_expected() -> None:
    student, teacher, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    record = rw.report(gm).passes[-1]
    assert record.matches == {"distill": 1}
    assert record.modules_added == ["fc_distill"]
    assert record.params_added == 0  # the teacher is buffers only
    assert record.buffers_added == sum(t.numel() for t in teacher.state_dict().values())

    before = [n.op + ":" + str(n.target) for n in rw.trace(student).graph.nodes]
    after = [n.op + ":" + str(n.target) for n in gm.graph.nodes]
    # Expected: the student's graph, plus one call_module before the output
    assert after == before[:-1] + ["call_module:fc_distill", "output:output"]
    node = next(n for n in gm.graph.nodes if n.target == "fc_distill")
    x_node, fc = next(iter(gm.graph.nodes)), next(n for n in gm.graph.nodes if n.target == "fc")
    assert node.args == ((x_node,), fc, ())
    assert list(gm.graph.nodes)[-1].args == (node,)


def test_outputs_unchanged_in_train_and_eval() -> None:
    student, teacher, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    for mode in (True, False):
        student.train(mode)
        gm.train(mode)
        torch.testing.assert_close(gm(x), student(x))


def test_teacher_is_frozen() -> None:
    student, teacher, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    d = distiller(gm)
    assert isinstance(d, Distiller)
    student_params = {n for n, _ in student.named_parameters()}
    assert {n for n, _ in gm.named_parameters()} == student_params  # no teacher parameter
    assert all(
        k.startswith("fc_distill.teacher.")
        for k in set(gm.state_dict()) - set(student.state_dict())
    )
    gm.train()
    assert gm.training and not d.teacher.training
    assert not any(m.training for m in d.teacher.modules())
    assert not any(t.requires_grad for t in d.teacher.state_dict().values())
    frozen = copy.deepcopy(d.teacher.state_dict())
    opt = torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9)
    y = torch.arange(4)
    for _ in range(3):
        loss = F.cross_entropy(gm(x), y) + rw.aux_losses(gm, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # weights and BN running stats unchanged
    assert not torch.equal(gm.fc.weight, student.fc.weight)  # the student did train
    # the user's teacher module is untouched: still parameters, still its own tensors
    assert {n for n, _ in teacher.named_parameters()} and teacher.fc.weight.requires_grad


def test_teacher_output_gets_no_gradient_path() -> None:
    student, teacher, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    gm(x)
    assert not distiller(gm).last_teacher_logits.requires_grad


def test_running_twice_is_a_noop() -> None:
    student, teacher, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    again = rw.rewrite(gm, [Distill.with_teacher(teacher)], x)
    assert rw.report(again).passes[-1].fired == 0
    assert sum(isinstance(m, Distiller) for m in again.modules()) == 1


def test_strip_gives_the_plain_student() -> None:
    student, teacher, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    plain = strip(gm)
    assert not any(isinstance(m, Distiller) for m in plain.modules())
    assert set(plain.state_dict()) == set(student.state_dict())
    student.eval()
    plain.eval()
    torch.testing.assert_close(plain(x), student(x))
    assert any(isinstance(m, Distiller) for m in gm.modules())  # strip copies


def test_self_teacher_is_a_frozen_copy() -> None:
    student, teacher, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    t = self_teacher(gm)
    assert not list(t.parameters()) and not t.training
    assert not any(isinstance(m, Distiller) for m in t.modules())
    student.eval()
    torch.testing.assert_close(t(x), student(x))
    gm2 = rw.rewrite(student, [Distill.with_teacher(t, method="tf_self")], x)
    gm2(x)
    assert rw.aux_losses(gm2, targets=torch.arange(4)).isfinite()


# ---------------------------------------------------------------------------
# Property test on random graphs
# ---------------------------------------------------------------------------

PROPERTY = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(rm=random_models())
def test_property_preserves_outputs_and_freezes_teacher(rm) -> None:
    teacher = copy.deepcopy(rm.model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)  # a different teacher of the same architecture
    result = check_pass(Distill.with_teacher(teacher), rm)
    assert result.fired == 1
    gm = result.gm
    d = distiller(gm)
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in rm.model.named_parameters()}
    gm.train()
    assert not any(m.training for m in d.teacher.modules())
    frozen = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    out = gm(*rm.example_inputs)
    logits = out[0] if isinstance(out, tuple) else out
    loss = logits.float().square().mean() + rw.aux_losses(
        gm, targets=torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.long)
    )
    loss.backward()
    assert any(p.grad is not None for p in gm.parameters())
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, frozen[k]) and v.grad is None, k
