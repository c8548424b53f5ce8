"""The ``distill`` pass: formulas against independent references, structure, frozen teacher,
options and errors, save/load, IE-KD and IE-DML, property and compile tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter import zoo
from rewriter.passes.distill import (
    Distill,
    Distiller,
    distiller,
    pretrain_autoencoder,
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


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides")
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


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides")
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


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rm=random_models())
def test_property_tf_reg_and_ie_on_random_graphs(rm) -> None:
    result = check_pass(("distill", {"method": "tf_reg"}), rm)
    assert result.fired == 1 and distiller(result.gm).teacher is None
    try:
        result = check_pass(Distill.with_teacher(copy.deepcopy(rm.model), method="ie"), rm)
    except rw.PassError as exc:  # the two refusals the pass documents
        assert "no 4-D feature map" in str(exc) or "only 1 channel" in str(exc), exc
        return
    gm = result.gm
    pretrain_autoencoder(gm, [rm.example_inputs[0]], epochs=1)
    gm.train()
    gm(*rm.example_inputs)
    rw.aux_losses(gm).backward()
    d = distiller(gm)
    assert d.inherit[0].weight.grad is not None and d.explore[0].weight.grad is not None
    assert not any(m.training for m in d.teacher.modules())


# ---------------------------------------------------------------------------
# IE-KD and feature KD: shapes may differ, gradients, frozen auto-encoder
# ---------------------------------------------------------------------------


def ie_model(method: str = "ie", **options) -> tuple[fx.GraphModule, Tensor, Tensor]:
    torch.manual_seed(0)
    student = zoo.create("digits_cnn", width=4)  # tapped map 4 x 8 x 8
    teacher = zoo.create("resnet8", in_channels=1, width=4)  # tapped map 16 x 2 x 2
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    gm = rw.rewrite(student, [Distill.with_teacher(teacher, method=method, **options)], x)
    return gm, x, y


def test_ie_taps_default_to_the_last_map_before_pooling() -> None:
    gm, x, _ = ie_model()
    notes = rw.report(gm).passes[-1].notes
    assert notes == ["taps: student block.relu2 (8, 4, 8, 8), teacher (8, 16, 2, 2)"]
    d = distiller(gm)
    assert d.split == (2, 2)
    assert d.autoencoder.encoder[0].in_channels == 16 and d.inherit[-3].out_channels == 8
    # the student's encoders are parameters, the teacher and the auto-encoder are not
    names = {n for n, _ in gm.named_parameters()}
    assert any(n.startswith("fc_distill.inherit.") for n in names)
    assert any(n.startswith("fc_distill.explore.") for n in names)
    assert not any(n.startswith(("fc_distill.teacher.", "fc_distill.autoencoder.")) for n in names)


def test_ie_needs_a_pretrained_autoencoder() -> None:
    gm, x, y = ie_model()
    gm(x)
    with pytest.raises(rw.RewriterError, match="pretrain_autoencoder"):
        rw.aux_losses(gm, targets=y)
    history = pretrain_autoencoder(gm, [(x, y)], epochs=15, lr=1e-2)
    assert len(history) == 15 and history[-1] < 0.5 * history[0]
    assert bool(distiller(gm).autoencoder_trained)


@pytest.mark.parametrize("exploration", ["neg_l1", "abs_cos"])
def test_ie_loss_and_gradients(exploration: str) -> None:
    gm, x, y = ie_model(inherit_weight=0.7, explore_weight=0.3, exploration=exploration)
    pretrain_autoencoder(gm, [x], epochs=2)
    d = distiller(gm)
    frozen = copy.deepcopy(d.autoencoder.state_dict())
    gm.train()
    gm(x)
    inherit, explore = d.last_codes
    code = d.last_teacher_code
    assert inherit.shape == explore.shape == code.shape == (8, 8, 2, 2)
    assert not code.requires_grad
    # independent reference: per-sample unit vectors
    ua, ub, ut = (F.normalize(t.reshape(8, -1), dim=1) for t in (inherit, explore, code))
    l_inh = (ua - ut).abs().mean()
    l_exp = -(ub - ut).abs().mean() if exploration == "neg_l1" else (ub * ut).sum(1).abs().mean()
    aux = rw.aux_losses(gm, targets=y)
    torch.testing.assert_close(aux, 0.7 * l_inh + 0.3 * l_exp)
    aux.backward()
    assert gm.block.conv2.weight.grad.abs().sum() > 0  # the student learns from both halves
    assert d.inherit[0].weight.grad.abs().sum() > 0 and d.explore[0].weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    opt.step()
    for k, v in d.autoencoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_feature_kd_is_l_inh_of_one_encoder() -> None:
    gm, x, y = ie_model("feature", inherit_weight=2.0)
    pretrain_autoencoder(gm, [x], epochs=1)
    gm(x)
    d = distiller(gm)
    (code,) = d.last_codes
    torch.testing.assert_close(
        rw.aux_losses(gm, targets=y), 2.0 * L.normalized_l1(code, d.last_teacher_code)
    )
    assert d.encoder[0].in_channels == 4 and not hasattr(d, "inherit")


def test_taps_by_name() -> None:
    gm, _, _ = ie_model(student_tap="stem.5", teacher_tap="layer2.0.relu2")
    assert rw.report(gm).passes[-1].notes == [
        "taps: student stem.5 (8, 4, 8, 8), teacher (8, 8, 4, 4)"
    ]
    assert distiller(gm).autoencoder.encoder[0].in_channels == 8
    with pytest.raises(rw.PassError, match="no node or module named 'nope'"):
        ie_model(student_tap="nope")
    with pytest.raises(rw.PassError, match="not a 4-D feature map"):
        ie_model(student_tap="fc")


def test_mutual_ie_both_students_learn_from_the_mutual_terms() -> None:
    from rewriter.passes.distill.dml import MutualIE

    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    a, b = zoo.create("digits_cnn", width=4), zoo.create("resnet8", in_channels=1, width=4)
    pair = MutualIE(a, b, x, kl_weight=0.0)
    out_a, out_b = pair(x)
    torch.testing.assert_close(out_a, a(x))
    torch.testing.assert_close(out_b, b(x))
    pair.mutual_loss().backward()
    for side in (pair.a, pair.b):
        grads = [p.grad for p in side.student.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0
        assert all(p.grad is None for p in side.autoencoder.parameters())  # peer codes detached
    pair.zero_grad()
    pair(x)
    pair.reconstruction_loss().backward()
    assert all(p.grad is None for p in pair.a.student.parameters())  # features detached
    assert pair.a.autoencoder.encoder[0].weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(pair.parameters(), lr=0.05)
    losses_seen = []
    for _ in range(5):
        pair(x)
        loss = pair.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses_seen.append(loss.item())
    assert losses_seen[-1] < losses_seen[0]
    plain = pair.strip_a().eval()
    a.eval()
    assert not isinstance(plain(x), tuple) and plain(x).shape == (8, 10)


def test_mutual_ie_loss_matches_formula() -> None:
    from rewriter.passes.distill.dml import MutualIE

    torch.manual_seed(1)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    pair = MutualIE(
        zoo.create("digits_cnn", width=4),
        zoo.create("digits_cnn", width=6),
        x,
        inherit_weight=0.5,
        explore_weight=2.0,
        exploration="abs_cos",
        kl_weight=0.3,
        reconstruction_weight=0.7,
    )
    pair(x)

    def unit(t: Tensor) -> Tensor:
        flat = t.reshape(t.shape[0], -1)
        return flat / flat.square().sum(1, keepdim=True).sqrt()

    expected = torch.zeros(())
    for key, peer in (("a", "b"), ("b", "a")):
        s, p = pair._last[key], pair._last[peer]
        code = p["code"]
        assert s["inherit"].shape == code.shape  # each student maps into its peer's code
        expected = expected + 0.5 * (unit(s["inherit"]) - unit(code)).abs().mean()
        expected = expected + 2.0 * (unit(s["explore"]) * unit(code)).sum(1).abs().mean()
        q = F.softmax(p["logits"], dim=1)
        kl = (q * (q.log() - F.log_softmax(s["logits"], dim=1))).sum() / 4
        expected = expected + 0.3 * kl
    torch.testing.assert_close(pair.mutual_loss(), expected)
    recon = sum(
        ((pair._last[k]["reconstruction"] - pair._last[k]["target"]) ** 2).mean() for k in "ab"
    )
    ce = F.cross_entropy(pair._last["a"]["logits"], y) + F.cross_entropy(
        pair._last["b"]["logits"], y
    )
    torch.testing.assert_close(pair.loss(y), ce + expected + 0.7 * recon)


# ---------------------------------------------------------------------------
# Options and errors
# ---------------------------------------------------------------------------


def test_bad_options_are_option_errors() -> None:
    with pytest.raises(rw.OptionError, match="alpha"):
        rw.make_pass(("distill", {"alpha": 1.5}))
    with pytest.raises(rw.OptionError, match="temperature"):
        rw.make_pass(("distill", {"temperature": 0}))
    with pytest.raises(rw.OptionError, match="virtual teacher"):
        rw.make_pass(("distill", {"method": "tf_reg", "teacher": "zoo:mlp"}))
    with pytest.raises(rw.OptionError, match="method"):
        rw.make_pass(("distill", {"method": "fitnets"}))
    with pytest.raises(rw.OptionError, match="not a zoo model"):
        rw.make_pass(("distill", {"teacher": "zoo:resnet99"}))
    with pytest.raises(rw.OptionError, match="not both"):
        Distill.with_teacher(nn.Linear(2, 2), teacher="zoo:mlp")


def test_missing_or_wrong_teacher_is_a_clear_error() -> None:
    student, teacher, x = student_and_teacher()
    with pytest.raises(rw.PassError, match="Distill.with_teacher"):
        rw.rewrite(student, ["distill"], x)
    with pytest.raises(rw.OptionError, match="names a factory"):  # refused before any import
        rw.rewrite(student, [("distill", {"teacher": "os.path:join"})], x)
    with pytest.raises(rw.PassError, match=r"teacher returns \(4, 3\).*\(4, 10\)"):
        rw.rewrite(student, [Distill.with_teacher(zoo.create("digits_cnn", num_classes=3))], x)
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], x)
    gm(x)
    with pytest.raises(rw.RewriterError, match="targets=y"):
        rw.aux_losses(gm)
    fresh = copy.deepcopy(gm)  # the last forward is not copied
    with pytest.raises(rw.RewriterError, match="not run a forward"):
        rw.aux_losses(fresh, targets=torch.arange(4))


def test_zoo_teacher_with_weights(tmp_path) -> None:
    import safetensors.torch

    torch.manual_seed(1)
    trained = zoo.create("digits_cnn", width=8)
    path = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(trained.state_dict(), str(path))
    student, _, x = student_and_teacher()
    spec = ("distill", {"teacher": "zoo:digits_cnn", "teacher_weights": str(path)})
    with pytest.raises(rw.PassError, match="do not fit"):
        rw.rewrite(student, [spec], x)  # zoo:digits_cnn is width 16
    trained16 = zoo.create("digits_cnn")
    safetensors.torch.save_file(trained16.state_dict(), str(path))
    gm = rw.rewrite(student, [spec], x)
    teacher = distiller(gm).teacher
    for k, v in trained16.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k


def test_save_and_load_round_trip(tmp_path) -> None:
    student, _, x = student_and_teacher()
    gm = rw.rewrite(student, [("distill", {"teacher": "zoo:digits_cnn", "temperature": 2.0})], x)
    with (
        torch.no_grad()
    ):  # pretend training changed student and (impossible in training) the teacher
        gm.fc.weight.add_(1.0)
        distiller(gm).teacher.fc.bias.add_(3.0)
    path = tmp_path / "kd.safetensors"
    rw.save(gm, path)
    loaded = rw.load(path)
    assert set(loaded.state_dict()) == set(gm.state_dict())
    for k, v in gm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k  # the teacher is stored in the artifact
    assert distiller(loaded).temperature == 2.0 and not list(distiller(loaded).teacher.parameters())
    gm.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), gm(x))

    # a teacher given from Python is stored with the graph (artifacts store graphs as data)
    from_python = rw.rewrite(student, [Distill.with_teacher(zoo.create("digits_cnn"))], x)
    rw.save(from_python, tmp_path / "py.safetensors")
    again = rw.load(tmp_path / "py.safetensors")
    for k, v in from_python.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    again.train()
    assert not distiller(again).teacher.training and not list(distiller(again).teacher.parameters())


def test_artifact_teacher(tmp_path) -> None:
    student, teacher, x = student_and_teacher()
    saved = rw.rewrite(zoo.create("digits_cnn", width=8), ["masks"], x)
    rw.save(saved, tmp_path / "teacher.safetensors")
    gm = rw.rewrite(student, [("distill", {"teacher": str(tmp_path / "teacher.safetensors")})], x)
    saved.eval()
    torch.testing.assert_close(distiller(gm).teacher(x), saved(x))


# ---------------------------------------------------------------------------
# Command line: the pass is listed; the example pipeline checks and applies
# ---------------------------------------------------------------------------


def test_cli_lists_distill_and_runs_the_example_pipeline(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from click.testing import CliRunner

    from rewriter.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["passes"])
    assert listed.exit_code == 0, listed.output
    block = listed.output.split("distill:", 1)[1].split("\n\n", 1)[0]
    for name in ("method", "teacher", "teacher_weights", "alpha", "temperature", "multiplier"):
        assert f"    {name} " in block
    for name in ("reduction", "student_tap", "teacher_tap", "inherit_weight", "explore_weight"):
        assert f"    {name} " in block
    pipeline = Path(__file__).parent.parent / "examples" / "pipelines" / "distill.toml"
    checked = runner.invoke(cli, ["check", str(pipeline)])
    assert checked.exit_code == 0, checked.output
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "kd.safetensors"
    applied = runner.invoke(cli, ["apply", "--pipeline", str(pipeline), "-o", str(out)])
    assert applied.exit_code == 0, applied.output
    gm = rw.load(out)
    assert rw.report(gm).passes[-1].matches == {"distill": 1}
    assert type(distiller(gm).teacher).__name__ == "ResNet"  # zoo:resnet20, frozen
    assert not list(distiller(gm).teacher.parameters())


# ---------------------------------------------------------------------------
# Dict outputs and classes-last (B, S, V) logits: language models
# ---------------------------------------------------------------------------

B, S, V = 2, 4, 6


class TokenLM(nn.Module):
    """``{"logits": x W^T, "hidden": x}`` for ``x`` of shape ``(B, S, V)``; ``W = scale * I``
    (the student, scale 1: its logits are its input) or a fixed random ``W`` (a teacher)."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            if seed is None:
                self.fc.weight.copy_(torch.eye(V))
            else:
                self.fc.weight.copy_(
                    torch.randn(V, V, generator=torch.Generator().manual_seed(seed))
                )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"hidden": x * 2, "logits": self.fc(x)}


def token_batch(seed: int = 5, ignored: int = 3) -> tuple[Tensor, Tensor]:
    """Logits ``(B, S, V)`` and labels ``(B, S)`` with ``ignored`` positions at -100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, V, generator=g) * 2
    y = torch.randint(0, V, (B, S), generator=g)
    y.view(-1)[torch.randperm(B * S, generator=g)[:ignored]] = -100
    return x, y


def ref_token_loss(
    s: Tensor, y: Tensor, target_rows, a: float, T: float, scale: float, *, mean: bool = False
) -> float:
    """``(1 - a) CE + a scale KL`` with CE and KL averaged over the tokens whose label is not
    -100, written per token with Python floats; ``target_rows(b, i)`` is the token's target
    distribution; ``mean`` also divides the KL by V."""
    ce, kl, count = 0.0, 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            label = int(y[b, i])
            if label == -100:
                continue
            count += 1
            row = s[b, i].tolist()
            ce -= ref_log_softmax(row)[label]
            logp = ref_log_softmax([v / T for v in row])
            q = target_rows(b, i)
            kl += sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, logp, strict=True) if qk > 0)
    kl = kl / count / (V if mean else 1)
    return (1 - a) * ce / count + a * scale * kl


def token_total(gm: fx.GraphModule, x: Tensor, y: Tensor) -> Tensor:
    out = gm(x)
    ce = F.cross_entropy(out["logits"].flatten(0, 1), y.flatten())  # ignore_index=-100
    return ce + rw.aux_losses(gm, targets=y)


@pytest.mark.parametrize(
    ("method", "options", "mean", "multiplier"),
    [
        ("hinton", {"alpha": 0.7, "temperature": 3.0}, False, 1.0),
        ("tf_self", {"alpha": 0.6, "temperature": 2.0, "multiplier": 5.0}, True, 5.0),
    ],
)
def test_token_kd_matches_independent_formula_with_ignore_index(
    method: str, options: dict, mean: bool, multiplier: float
) -> None:
    teacher = TokenLM(seed=3)
    x, y = token_batch()
    gm = rw.rewrite(TokenLM(), [Distill.with_teacher(teacher, method=method, **options)], (x,))
    d = distiller(gm)
    assert d.class_dim == -1 and d.reduction == ("mean" if mean else "batchmean")
    with torch.no_grad():
        t = teacher(x)["logits"]
    a, T = options["alpha"], options["temperature"]

    def soft(b: int, i: int) -> list[float]:
        return ref_softmax([v / T for v in t[b, i].tolist()])

    expected = ref_token_loss(x, y, soft, a, T, T * T * multiplier, mean=mean)
    assert token_total(gm, x, y).item() == pytest.approx(expected, rel=1e-5)
    # the ignored tokens do not count: changing their logits changes nothing
    x2 = x.clone()
    x2[y == -100] = 50.0
    assert token_total(gm, x2, y).item() == pytest.approx(expected, rel=1e-5)
    # flattened labels (B * S,) are read the same way
    gm(x)
    flat = rw.aux_losses(gm, targets=y.flatten())
    assert flat.item() == pytest.approx(rw.aux_losses(gm, targets=y).item(), rel=1e-6)


def test_token_tf_reg_matches_independent_formula_with_ignore_index() -> None:
    x, y = token_batch(seed=8, ignored=2)
    a, T = 0.3, 5.0
    gm = rw.rewrite(
        TokenLM(), [("distill", {"method": "tf_reg", "alpha": a, "temperature": T})], (x,)
    )

    def virtual(b: int, i: int) -> list[float]:
        p = [(1 - 0.99) / (V - 1)] * V
        p[int(y[b, i])] = 0.99
        return ref_softmax([v / T for v in p])

    expected = ref_token_loss(x, y, virtual, a, 1.0, 1.0)  # student not scaled, no T^2
    assert token_total(gm, x, y).item() == pytest.approx(expected, rel=1e-5)


def test_token_kl_reductions_and_class_dim_agree_on_2d_logits() -> None:
    s, t, y = fixed()
    for reduction in ("batchmean", "mean"):
        by_rows = L.kd_term(s, t, 2.0, reduction)
        last = L.kd_term(s, t, 2.0, reduction, class_dim=-1, targets=y)
        torch.testing.assert_close(last, by_rows)
        torch.testing.assert_close(
            L.tf_reg_term(s, y, 3.0, reduction, class_dim=-1), L.tf_reg_term(s, y, 3.0, reduction)
        )
    torch.testing.assert_close(L.cross_entropy(s, y, class_dim=-1), F.cross_entropy(s, y))
    # (B, S, V) classes last == the same logits moved to (B, V, S) with class_dim=1, no ignores
    x, labels = token_batch(ignored=0)
    t3 = torch.randn(B, S, V, generator=torch.Generator().manual_seed(1))
    moved = L.kd_term(x.movedim(-1, 1), t3.movedim(-1, 1), 2.0)  # KL summed over tokens / B
    torch.testing.assert_close(L.kd_term(x, t3, 2.0, class_dim=-1) * S, moved)
    with pytest.raises(ValueError, match="do not fit"):
        L.kd_term(x, t3, 2.0, class_dim=-1, targets=labels[:, :2])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 7)),
    seed=st.integers(0, 2**16),
    a=st.floats(0.0, 1.0),
    T=st.floats(0.5, 8.0),
)
def test_property_token_hinton_is_the_per_token_formula(shape, seed, a, T) -> None:
    """On random (B, S, V) logits and ignore masks (at least one counted token), CE + aux of
    the distilled dict-output model is the per-token average of the unfused formula."""
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3
    y = torch.randint(0, shape[2], shape[:2], generator=g)
    keep = torch.rand(shape[:2], generator=g) < 0.7
    keep.view(-1)[0] = True
    y[~keep] = -100
    gm = rw.rewrite(
        DictLogits(shape[2]), [Distill.with_teacher(Fixed(t), alpha=a, temperature=T)], (x,)
    )
    out = gm(x)
    assert list(out) == ["logits", "extra"] and torch.equal(out["logits"], x)
    loss = F.cross_entropy(x.flatten(0, 1), y.flatten()) + rw.aux_losses(gm, targets=y)
    log_s = F.log_softmax(x[keep] / T, dim=-1)
    q = F.softmax(t[keep] / T, dim=-1)
    kl = (q * (q.log() - log_s)).sum(-1).mean()
    ce = -F.log_softmax(x[keep], dim=-1).gather(1, y[keep][:, None]).mean()
    torch.testing.assert_close(loss, (1 - a) * ce + a * T * T * kl, rtol=1e-4, atol=1e-5)


class AsDict(nn.Module):
    """A random model's logits (its first output) in a dict, next to another value."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.model(x)
        return {"features": x.mean(1), "logits": out[0] if isinstance(out, tuple) else out}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rm=random_models())
def test_property_dict_output_on_random_graphs(rm) -> None:
    """Random graphs returning a dict: distill fires once, outputs (the whole dict) are kept,
    and CE + aux is Hinton's formula over the samples whose label is not -100."""
    student = AsDict(rm.model)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    result = check_pass(Distill.with_teacher(teacher), (student, rm.example_inputs))
    assert result.fired == 1
    gm = result.gm.eval()
    x = rm.example_inputs[0]
    with torch.no_grad():
        out, ref, t = gm(x), student.eval()(x), teacher.eval()(x)["logits"]
    assert list(out) == ["features", "logits"] and all(torch.equal(out[k], ref[k]) for k in ref)
    s = out["logits"]
    assert s.dim() == 2 and distiller(gm).class_dim == -1  # a dict: classes last (2-D: the same)
    y = torch.arange(s.shape[0]) % s.shape[1]
    y[0] = -100
    total_loss = F.cross_entropy(s, y) + rw.aux_losses(gm, targets=y)
    keep = y != -100
    q, log_s = F.softmax(t[keep] / 4, dim=1), F.log_softmax(s[keep] / 4, dim=1)
    kl = (torch.special.xlogy(q, q) - q * log_s).sum(1).mean()
    expected = 0.1 * F.cross_entropy(s[keep], y[keep]) + 0.9 * 16 * kl
    torch.testing.assert_close(total_loss, expected, rtol=1e-4, atol=1e-5)


class DictLogits(nn.Module):
    """``{"logits": fc(x), "extra": x.sum(-1)}`` with ``fc`` the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(width))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.fc(x), "extra": x.sum(-1)}


class Fixed(nn.Module):
    """A teacher whose logits are a fixed tensor (as a dict output), whatever the input."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits.clone())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.logits + 0 * x}


def test_dict_output_keeps_its_keys_and_values() -> None:
    x, y = token_batch()
    student = TokenLM()
    gm = rw.rewrite(student, [Distill.with_teacher(TokenLM(seed=3))], (x,))
    record = rw.report(gm).passes[0]
    assert record.matches == {"distill": 1} and record.modules_added == ["fc_distill"]
    assert "logits: output key 'logits', class dim -1" in record.notes
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert list(output.args[0]) == ["hidden", "logits"]
    assert output.args[0]["logits"].target == "fc_distill"
    assert output.args[0]["hidden"].op == "call_function"  # the other value is untouched
    for mode in (True, False):
        gm.train(mode)
        out, ref = gm(x), student(x)
        assert type(out) is dict and list(out) == list(ref)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert distiller(gm).class_dim == -1
    plain = strip(gm)
    assert list(plain(x)) == ["hidden", "logits"] and torch.equal(plain(x)["logits"], x)
    # another key, an explicit class dim, labels of the matching shape
    gm = rw.rewrite(
        student, [Distill.with_teacher(TokenLM(seed=3), logits_key="hidden", class_dim=1)], (x,)
    )
    assert output_target(gm, "hidden") == "mul_distill" and distiller(gm).class_dim == 1
    gm(x)
    rw.aux_losses(gm, targets=torch.zeros(B, V, dtype=torch.long))  # classes at dim 1: (B, V)


def output_target(gm: fx.GraphModule, key: str) -> str:
    return str(next(n for n in gm.graph.nodes if n.op == "output").args[0][key].target)


def test_tuple_output_distills_its_first_element() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(K, K)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.fc(x), x

    s, _, y = fixed()
    gm = rw.rewrite(Pair(), [Distill.with_teacher(nn.Linear(K, K))], (s,))
    out = gm(s)
    assert isinstance(out, tuple) and len(out) == 2 and distiller(gm).class_dim == 1
    rw.aux_losses(gm, targets=y)


def test_logits_key_class_dim_errors_and_options_from_files() -> None:
    x, y = token_batch()
    with pytest.raises(rw.PassError, match=r"key 'scores'.*\['hidden', 'logits'\]"):
        rw.rewrite(TokenLM(), [Distill.with_teacher(TokenLM(), logits_key="scores")], (x,))
    with pytest.raises(rw.PassError, match="teacher's dict output has no 'hidden'"):
        rw.rewrite(TokenLM(), [Distill.with_teacher(DictLogits(V), logits_key="hidden")], (x,))
    for method in ("ie", "feature"):
        with pytest.raises(rw.PassError, match="class_dim=-1.*hinton"):
            rw.rewrite(TokenLM(), [Distill.with_teacher(TokenLM(), method=method)], (x,))
    gm = rw.rewrite(TokenLM(), [Distill.with_teacher(TokenLM(seed=1))], (x,))
    gm(x)
    with pytest.raises(rw.RewriterError, match=r"labels of shape \(2, 3\).*expected \(2, 4\)"):
        rw.aux_losses(gm, targets=y[:, :3])
    with pytest.raises(rw.OptionError, match="class_dim"):
        rw.make_pass(("distill", {"class_dim": 2}))
    with pytest.raises(rw.OptionError, match="ignore_index"):
        rw.make_pass(("distill", {"ignore_index": 0.5}))
    # as a command line gives them (strings) and as a pipeline file does
    p = rw.make_pass(("distill", {"method": "tf_reg", "class_dim": "-1", "logits_key": "out"}))
    assert (p.class_dim, p.logits_key, p.ignore_index) == (-1, "out", -100)
    from rewriter import pipeline

    text = (
        '[model]\nsource = "zoo:mlp"\n[[pass]]\nname = "distill"\n'
        'options = { method = "tf_reg", logits_key = "scores", class_dim = -1, ignore_index = 0 }\n'
    )
    (the_pass,) = pipeline.parse(text).passes
    assert (the_pass.class_dim, the_pass.logits_key, the_pass.ignore_index) == (-1, "scores", 0)


def test_ignore_index_option_changes_which_tokens_count() -> None:
    x, y = token_batch(ignored=0)
    y[0, 0] = 0  # at least one label 0: those do not count
    gm = rw.rewrite(TokenLM(), [("distill", {"method": "tf_reg", "ignore_index": 0})], (x,))
    gm(x)
    d = distiller(gm)
    keep = y != 0
    expected = d.alpha * L.tf_reg_term(x[keep], y[keep], d.temperature) - d.alpha * F.cross_entropy(
        x[keep], y[keep]
    )
    torch.testing.assert_close(rw.aux_losses(gm, targets=y), expected)


# -- a tiny Hugging Face Llama language model (tests/hf_models.py's config) -----------------


def llama_lm(seed: int = 0, layers: int = 2) -> tuple[nn.Module, dict[str, Tensor]]:
    """``LlamaForCausalLM`` with ``hf_models.llama``'s config (vocab 100) and ``layers`` layers."""
    hf_models = pytest.importorskip("hf_models")
    from transformers import LlamaForCausalLM

    base, inputs = hf_models.llama(seed)
    config = base.config.__class__.from_dict({**base.config.to_dict(), "num_hidden_layers": layers})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), inputs


@pytest.fixture(scope="module")
def distilled_llama() -> tuple[nn.Module, nn.Module, dict[str, Tensor], fx.GraphModule]:
    """(student, teacher, inputs, distilled student): Hinton KD from a 3-layer teacher into a
    2-layer student, both exported and lifted: the student with a static export, as
    ``tests/test_transformers.py``'s ``lifted`` does, and the teacher the same way (the
    dynamic default through ``rewrite(model, ...)``, with the pass lifting the Hugging Face
    teacher itself, is the slow compile test's: a dynamic export costs seconds more)."""
    from rewriter.frontends import export_graph

    student, inputs = llama_lm(0, layers=2)
    teacher, _ = llama_lm(1, layers=3)
    graph, positional = export_graph(student, (), inputs, dynamic=False)
    teacher_graph, _ = export_graph(teacher, (), inputs, dynamic=False)
    gm = rw.rewrite(graph, [Distill.with_teacher(teacher_graph)], positional)
    return student, teacher, inputs, gm


def lm_labels(inputs: dict[str, Tensor]) -> Tensor:
    """Next-token labels: the inputs shifted left, -100 at each sequence's last position and
    under the attention mask's padding."""
    ids = inputs["input_ids"]
    y = torch.full_like(ids, -100)
    y[:, :-1] = ids[:, 1:]
    y[inputs["attention_mask"] == 0] = -100
    return y


def test_llama_hinton_fires_once_and_keeps_the_dict_output(distilled_llama) -> None:
    student, teacher, inputs, gm = distilled_llama
    record = rw.report(gm).passes[0]
    assert record.fired == 1 and record.modules_added == ["lm_head_distill"]
    d = distiller(gm)
    assert d.class_dim == -1 and isinstance(d.teacher, fx.GraphModule)
    assert not list(d.teacher.parameters()) and not d.teacher.training
    assert sum(isinstance(m, nn.Linear) for m in d.teacher.modules()) == 3 * 7 + 1  # 3 layers
    gm.eval()
    with torch.no_grad():
        out = gm(**inputs)
        assert type(out) is dict and list(out) == ["logits"]
        assert torch.equal(out["logits"], student(**inputs).logits)
        torch.testing.assert_close(d.last_teacher_logits, teacher(**inputs).logits)


def test_llama_ce_plus_aux_decreases_and_round_trips(distilled_llama, tmp_path) -> None:
    _, _, inputs, gm = distilled_llama
    gm = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 100, inputs["input_ids"].shape, generator=g)  # random tokens (static)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y = lm_labels(batch)
    frozen = copy.deepcopy(distiller(gm).teacher.state_dict())
    optimizer = torch.optim.Adam(gm.parameters(), lr=3e-3)
    gm.train()
    seen = []
    for _ in range(4):
        out = gm(**batch)
        loss = F.cross_entropy(out["logits"].flatten(0, 1), y.flatten()) + rw.aux_losses(
            gm, targets=y
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(loss.item())
    assert all(math.isfinite(v) for v in seen) and seen[-1] < seen[0], seen
    for k, v in distiller(gm).teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    gm.eval()
    path = rw.save(gm, tmp_path / "kd_llama.safetensors", source="test_distill:llama_lm")
    loaded = rw.load(path).eval()
    assert isinstance(distiller(loaded).teacher, fx.GraphModule)
    with torch.no_grad():
        a, b = gm(**inputs), loaded(**inputs)
        assert list(b) == ["logits"] and torch.equal(a["logits"], b["logits"])
        y0 = lm_labels(inputs)
        assert torch.equal(rw.aux_losses(gm, targets=y0), rw.aux_losses(loaded, targets=y0))


# ---------------------------------------------------------------------------
# Slow: torch.compile(fullgraph=True) with the teacher inside; DDP
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hinton", "ie"])
def test_compiled_distilled_student_trains(method: str) -> None:
    torch.manual_seed(0)
    student, teacher = zoo.create("digits_cnn", width=4), zoo.create("digits_cnn", width=8)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    gm = rw.rewrite(student, [Distill.with_teacher(teacher, method=method)], x)
    if method == "ie":
        pretrain_autoencoder(gm, [x], epochs=3)
    d = distiller(gm)
    frozen = copy.deepcopy(d.teacher.state_dict())
    compiled = torch.compile(gm, fullgraph=True)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    gm.train()
    losses_seen = []
    for _ in range(6):
        loss = F.cross_entropy(compiled(x), y) + rw.aux_losses(gm, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses_seen.append(loss.item())
    assert all(math.isfinite(v) for v in losses_seen)
    assert losses_seen[-1] < losses_seen[0], losses_seen
    assert not d.teacher.training
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    if method == "ie":
        assert (
            d.inherit[0].weight.grad.abs().sum() > 0
        )  # the encoders trained in the compiled graph
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), strip(gm)(x), rtol=1e-4, atol=1e-4)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import os
    import traceback
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
        try:
            torch.manual_seed(0)
            teacher = zoo.create("digits_cnn", width=8)  # the same teacher on both ranks
            torch.manual_seed(rank)  # different student weights: DDP broadcasts rank 0's
            gm = rw.rewrite(
                zoo.create("digits_cnn", width=4),
                [Distill.with_teacher(teacher)],
                torch.rand(2, 1, 8, 8),
            )
            frozen = {k: v.clone() for k, v in distiller(gm).teacher.state_dict().items()}
            ddp = DistributedDataParallel(gm, broadcast_buffers=True)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
            data = torch.Generator().manual_seed(100 + rank)
            for _ in range(3):
                x = torch.rand(8, 1, 8, 8, generator=data)
                y = torch.randint(0, 10, (8,), generator=data)
                loss = F.cross_entropy(ddp(x), y) + rw.aux_losses(gm, targets=y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            teacher_state = distiller(gm).teacher.state_dict()
            torch.save(
                {
                    "params": {n: p.detach().clone() for n, p in gm.named_parameters()},
                    "ddp_params": len(list(ddp.parameters())),
                    "teacher_unchanged": all(
                        torch.equal(teacher_state[k], v) for k, v in frozen.items()
                    ),
                    "loss": loss.item(),
                },
                out,
            )
        finally:
            dist.destroy_process_group()
    except BaseException:
        out.with_suffix(".err").write_text(traceback.format_exc())
        raise


@pytest.mark.slow
def test_ddp_trains_a_distilled_student(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in tmp_path.glob("*.err")]
    assert not errors, errors
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert first["loss"] != second["loss"]  # different data on each rank
    student_params = len(list(zoo.create("digits_cnn", width=4).parameters()))
    assert first["ddp_params"] == second["ddp_params"] == student_params  # no teacher parameter
    assert first["teacher_unchanged"] and second["teacher_unchanged"]
    for name, value in first["params"].items():
        torch.testing.assert_close(value, second["params"][name], rtol=0, atol=0, msg=name)


class WrappedTeacher(nn.Module):
    """A teacher of a user class: stored as an opaque module, not as data."""

    def __init__(self) -> None:
        super().__init__()
        self.net = zoo.create("digits_cnn", width=8)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * 2.0


def test_user_class_teacher_loads_with_the_model(tmp_path) -> None:
    student, _, x = student_and_teacher()
    gm = rw.rewrite(student, [Distill.with_teacher(WrappedTeacher())], x)
    rw.save(gm, tmp_path / "kd.safetensors")
    with pytest.raises(rw.ArtifactError, match="fc_distill.teacher"):
        rw.load(tmp_path / "kd.safetensors")  # user code is not data
    loaded = rw.load(tmp_path / "kd.safetensors", model=gm)
    assert isinstance(distiller(loaded).teacher, WrappedTeacher)
    for k, v in gm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.slow
def test_compiled_distilled_llama_trains() -> None:
    """torch.compile(fullgraph=True) of the distilled tiny Llama, the Hugging Face teacher
    lifted by the pass; one batch shape and train mode only, so it compiles once."""
    student, inputs = llama_lm(0, layers=2)
    teacher, _ = llama_lm(1, layers=3)
    gm = rw.rewrite(student, [Distill.with_teacher(teacher)], inputs)
    notes = rw.report(gm).passes[0].notes
    assert any("Hugging Face model, exported and lifted" in n for n in notes)
    assert isinstance(distiller(gm).teacher, fx.GraphModule)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 100, (4, 8), generator=g)  # another batch size: the export is dynamic
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y = lm_labels(batch)
    gm.train()
    with torch.no_grad():
        eager = gm(**batch)["logits"]  # the Llama has no dropout: train mode is deterministic
    compiled = torch.compile(gm, fullgraph=True)
    optimizer = torch.optim.Adam(gm.parameters(), lr=3e-3)
    seen = []
    for step in range(5):
        out = compiled(**batch)
        if step == 0:
            torch.testing.assert_close(out["logits"], eager, rtol=1e-4, atol=1e-4)
        loss = F.cross_entropy(out["logits"].flatten(0, 1), y.flatten()) + rw.aux_losses(
            gm, targets=y
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(loss.item())
    assert all(math.isfinite(v) for v in seen) and seen[-1] < seen[0], seen
    assert list(out) == ["logits"]
