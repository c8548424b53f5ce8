"""Tests of the ``rbn`` pass and ``RepresentativeBatchNorm2d`` (docs/methods/rbn.md).

The reference implementation below is written out step by step with explicit
torch ops, independently of the module, so the formula is pinned:

1. ``X' = X + w_m * mean_hw(X)``
2. ``Xhat = (X' - mu) / sqrt(var + eps)`` (batch stats of X' in training, running in eval)
3. ``Xs = Xhat * sigmoid(w_v * mean_hw(Xhat) + w_b)``
4. ``Y = gamma * Xs + beta``
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter.passes.norm import SIGMOID_ONE, RepresentativeBatchNorm2d

C = 3


def channel(t: Tensor) -> Tensor:
    """A per-channel vector of shape (C,) viewed as (1, C, 1, 1)."""
    return t.reshape(1, -1, 1, 1)


def reference(
    x: Tensor,
    *,
    w_m: Tensor,
    w_v: Tensor,
    w_b: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """RBN by hand. Batch statistics unless running stats are given.

    Returns the output and the (mean, unbiased variance) of X' over (N, H, W).
    """
    centered = x + channel(w_m) * x.mean(dim=(2, 3), keepdim=True)
    n = centered.shape[0] * centered.shape[2] * centered.shape[3]
    batch_mean = centered.sum(dim=(0, 2, 3)) / n
    deviation = centered - channel(batch_mean)
    biased_var = (deviation**2).sum(dim=(0, 2, 3)) / n
    unbiased_var = biased_var * n / (n - 1)
    if running_mean is None:
        mean, var = batch_mean, biased_var
    else:
        assert running_var is not None
        mean, var = running_mean, running_var
    normed = (centered - channel(mean)) / torch.sqrt(channel(var) + eps)
    instance_mean = normed.mean(dim=(2, 3), keepdim=True)
    scaled = normed * torch.sigmoid(channel(w_v) * instance_mean + channel(w_b))
    out = scaled
    if gamma is not None:
        out = channel(gamma) * scaled + channel(beta)
    return out, batch_mean, unbiased_var


def trained_bn(**kwargs: object) -> nn.BatchNorm2d:
    """A BN with non-trivial running statistics (and affine parameters, if any)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, **kwargs)  # type: ignore[arg-type]
    bn.train()
    with torch.no_grad():
        for _ in range(4):
            bn(torch.randn(8, C, 5, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, C, 1, 1) + 1.5)
        if bn.affine:
            bn.weight.copy_(torch.tensor([1.3, -0.7, 0.4]))
            bn.bias.copy_(torch.tensor([0.2, -0.5, 1.1]))
    return bn


def rbn_with_params(bn: nn.BatchNorm2d, init: str = "paper") -> RepresentativeBatchNorm2d:
    """An RBN from ``bn`` with non-trivial w_m, w_v, w_b."""
    rbn = RepresentativeBatchNorm2d.from_batchnorm(bn, init)
    with torch.no_grad():
        rbn.center_weight.copy_(channel(torch.tensor([0.5, -0.3, 0.8])))
        rbn.scale_weight.copy_(channel(torch.tensor([1.2, -2.0, 0.7])))
        rbn.scale_bias.copy_(channel(torch.tensor([0.3, 1.5, -0.4])))
    return rbn


def params(rbn: RepresentativeBatchNorm2d) -> dict[str, Tensor | None]:
    return {
        "w_m": rbn.center_weight.detach().flatten(),
        "w_v": rbn.scale_weight.detach().flatten(),
        "w_b": rbn.scale_bias.detach().flatten(),
        "gamma": None if rbn.weight is None else rbn.weight.detach(),
        "beta": None if rbn.bias is None else rbn.bias.detach(),
    }


def batch(seed: int = 1, n: int = 4) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, 5, 5, generator=g) * 1.7 + torch.randn(n, C, 1, 1, generator=g)


# ---------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------


def test_formula_on_numbers_worked_out_by_hand() -> None:
    """One channel, eval mode, numbers small enough to check on paper.

    x = [[1, 3], [5, 7]], mean_hw = 4, w_m = 0.5  -> X' = [[3, 5], [7, 9]]
    running mean 5, running var 4, eps 0          -> Xhat = [[-1, 0], [1, 2]]
    mean_hw(Xhat) = 0.5, w_v = 2, w_b = -1        -> sigmoid(0) = 0.5, Xs = [[-.5, 0], [.5, 1]]
    gamma = 2, beta = 1                           -> Y = [[0, 1], [2, 3]]
    """
    rbn = RepresentativeBatchNorm2d(1, eps=0.0)
    with torch.no_grad():
        rbn.running_mean.fill_(5.0)
        rbn.running_var.fill_(4.0)
        rbn.center_weight.fill_(0.5)
        rbn.scale_weight.fill_(2.0)
        rbn.scale_bias.fill_(-1.0)
        rbn.weight.fill_(2.0)
        rbn.bias.fill_(1.0)
    rbn.eval()
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
    assert torch.equal(rbn(x), torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]))


def test_eval_mode_uses_running_stats() -> None:
    bn = trained_bn()
    rbn = rbn_with_params(bn).eval()
    running = (rbn.running_mean.clone(), rbn.running_var.clone())
    x = batch()
    expected, _, _ = reference(
        x, **params(rbn), eps=bn.eps, running_mean=running[0], running_var=running[1]
    )
    torch.testing.assert_close(rbn(x), expected)
    assert torch.equal(rbn.running_mean, running[0]) and torch.equal(rbn.running_var, running[1])
    assert int(rbn.num_batches_tracked) == 4


def test_train_mode_uses_batch_stats_and_updates_running_stats_of_centered_input() -> None:
    bn = trained_bn(momentum=0.3)
    rbn = rbn_with_params(bn).train()
    old_mean, old_var = rbn.running_mean.clone(), rbn.running_var.clone()
    x = batch()
    expected, mean, var = reference(x, **params(rbn), eps=bn.eps)
    torch.testing.assert_close(rbn(x), expected)
    torch.testing.assert_close(rbn.running_mean, 0.7 * old_mean + 0.3 * mean)
    torch.testing.assert_close(rbn.running_var, 0.7 * old_var + 0.3 * var)
    assert int(rbn.num_batches_tracked) == 5
    # the statistics are those of X', not of X
    assert not torch.allclose(mean, x.mean(dim=(0, 2, 3)))


def test_momentum_none_is_a_cumulative_average() -> None:
    rbn = rbn_with_params(nn.BatchNorm2d(C, momentum=None)).train()
    means, variances = [], []
    for seed in (1, 2, 3):
        x = batch(seed)
        expected, mean, var = reference(x, **params(rbn), eps=1e-5)
        torch.testing.assert_close(rbn(x), expected)
        means.append(mean)
        variances.append(var)
    assert int(rbn.num_batches_tracked) == 3
    torch.testing.assert_close(rbn.running_mean, torch.stack(means).mean(0))
    # the default running var of 1 is averaged in with weight 0 after the first batch
    torch.testing.assert_close(rbn.running_var, torch.stack(variances).mean(0))


def test_without_running_stats_both_modes_use_batch_stats() -> None:
    rbn = rbn_with_params(nn.BatchNorm2d(C, track_running_stats=False))
    assert rbn.running_mean is None and rbn.num_batches_tracked is None
    x = batch()
    expected, _, _ = reference(x, **params(rbn), eps=1e-5)
    torch.testing.assert_close(rbn.train()(x), expected)
    torch.testing.assert_close(rbn.eval()(x), expected)


def test_rbn_without_affine_stops_after_the_scaling_calibration() -> None:
    bn = trained_bn(affine=False)
    rbn = rbn_with_params(bn).eval()
    assert rbn.weight is None and rbn.bias is None
    x = batch()
    expected, _, _ = reference(
        x, **params(rbn), eps=bn.eps, running_mean=bn.running_mean, running_var=bn.running_var
    )
    torch.testing.assert_close(rbn(x), expected)


def test_the_input_is_not_modified_in_place() -> None:
    rbn = rbn_with_params(trained_bn())
    for mode in (True, False):
        x = batch()
        copy, version = x.clone(), x._version
        rbn.train(mode)
        rbn(x)
        assert torch.equal(x, copy)
        assert x._version == version


def test_gradients_reach_every_parameter() -> None:
    for mode in (True, False):
        rbn = rbn_with_params(trained_bn()).train(mode)
        x = batch().requires_grad_()
        out = rbn(x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        for name in ("center_weight", "scale_weight", "scale_bias", "weight", "bias"):
            grad = getattr(rbn, name).grad
            assert grad is not None, (mode, name)
            assert grad.abs().sum() > 0, (mode, name)
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_new_parameters_have_shape_1c11_and_the_paper_init() -> None:
    rbn = RepresentativeBatchNorm2d(C)
    for name, value in (("center_weight", 0.0), ("scale_weight", 0.0), ("scale_bias", 1.0)):
        p = getattr(rbn, name)
        assert isinstance(p, nn.Parameter) and p.shape == (1, C, 1, 1)
        assert torch.equal(p.detach(), torch.full((1, C, 1, 1), value))
    assert isinstance(rbn, nn.BatchNorm2d) and isinstance(rbn, rw.RewriterModule)


# ---------------------------------------------------------------------------
# Inits
# ---------------------------------------------------------------------------


def test_paper_init_is_sigmoid_one_times_bn() -> None:
    assert SIGMOID_ONE == pytest.approx(0.7311, abs=1e-4)
    assert SIGMOID_ONE == pytest.approx(1 / (1 + math.exp(-1)))
    bn = nn.BatchNorm2d(C)  # the authors' setting: gamma 1, beta 0
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    rbn = RepresentativeBatchNorm2d.from_batchnorm(bn, "paper")
    x = batch()
    for mode in (False, True):
        bn.train(mode)
        rbn.train(mode)
        torch.testing.assert_close(rbn(x), SIGMOID_ONE * bn(x))
    torch.testing.assert_close(rbn.running_mean, bn.running_mean)
    torch.testing.assert_close(rbn.running_var, bn.running_var)


def test_paper_init_keeps_gamma_and_beta() -> None:
    bn = trained_bn().eval()
    rbn = RepresentativeBatchNorm2d.from_batchnorm(bn, "paper").eval()
    assert torch.equal(rbn.weight, bn.weight) and torch.equal(rbn.bias, bn.bias)
    x = batch()
    beta = channel(bn.bias.detach())
    torch.testing.assert_close(rbn(x) - beta, SIGMOID_ONE * (bn(x) - beta))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_preserve_init_equals_the_trained_bn(mode: str) -> None:
    bn = trained_bn(momentum=0.2)
    rbn = RepresentativeBatchNorm2d.from_batchnorm(bn, "preserve")
    assert torch.equal(rbn.scale_bias.detach(), torch.ones(1, C, 1, 1))
    bn.train(mode == "train")
    rbn.train(mode == "train")
    for seed in (1, 2):
        x = batch(seed)
        torch.testing.assert_close(rbn(x), bn(x))
    torch.testing.assert_close(rbn.running_mean, bn.running_mean)
    torch.testing.assert_close(rbn.running_var, bn.running_var)
    assert torch.equal(rbn.num_batches_tracked, bn.num_batches_tracked)


def test_from_batchnorm_copies_settings_and_mode() -> None:
    bn = trained_bn(eps=1e-3, momentum=0.25).eval()
    rbn = RepresentativeBatchNorm2d.from_batchnorm(bn, "paper")
    assert (rbn.num_features, rbn.eps, rbn.momentum) == (C, 1e-3, 0.25)
    assert rbn.affine and rbn.track_running_stats and not rbn.training
    assert torch.equal(rbn.running_mean, bn.running_mean)
    assert torch.equal(rbn.running_var, bn.running_var)
    assert torch.equal(rbn.num_batches_tracked, bn.num_batches_tracked)
    assert rbn.running_mean.data_ptr() != bn.running_mean.data_ptr()  # copies, not shared


def test_dtype_is_carried_over() -> None:
    bn = trained_bn().double().eval()
    rbn = RepresentativeBatchNorm2d.from_batchnorm(bn, "preserve").eval()
    for name in ("center_weight", "scale_weight", "scale_bias", "weight", "running_mean"):
        assert getattr(rbn, name).dtype == torch.float64, name
    x = batch().double()
    torch.testing.assert_close(rbn(x), bn(x))


# ---------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.05)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, momentum=None)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Net(nn.Module):
    def __init__(self, affine_stem: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, affine=affine_stem)
        self.relu = nn.ReLU()
        self.block = Block(4, 8, 2)
        self.norm1d = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.norm1d(x))


BNS = ["bn", "block.bn1", "block.bn2", "block.downsample.1"]


def net(affine_stem: bool = True) -> Net:
    torch.manual_seed(0)
    model = Net(affine_stem)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def inputs() -> tuple[Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def rbn_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, RepresentativeBatchNorm2d)}


def test_every_batchnorm2d_is_replaced_including_the_downsample() -> None:
    model = net()
    gm = rw.rewrite(model, ["rbn"], inputs())
    record = rw.report(gm).passes[0]
    assert record.matches == {"to_rbn": 4}  # replaced 4 of 4
    assert record.modules_replaced == BNS
    assert list(rbn_modules(gm)) == BNS
    assert type(gm.norm1d) is nn.BatchNorm1d  # only 2d BNs
    assert record.params_added == 3 * (4 + 8 + 8 + 8)
    torch.testing.assert_close(gm(*inputs()), model(*inputs()))


def test_settings_are_carried_over_by_the_pass() -> None:
    model = net()
    gm = rw.rewrite(model, ["rbn"], inputs())
    for name in BNS:
        bn, rbn = model.get_submodule(name), gm.get_submodule(name)
        assert (rbn.eps, rbn.momentum, rbn.affine, rbn.track_running_stats) == (
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
        ), name
        assert torch.equal(rbn.running_mean, bn.running_mean), name
        assert torch.equal(rbn.running_var, bn.running_var), name
        assert torch.equal(rbn.bias, bn.bias), name
        torch.testing.assert_close(rbn.weight * SIGMOID_ONE, bn.weight.detach())
    assert gm.get_submodule("block.bn2").eps == 1e-3
    assert gm.get_submodule("block.downsample.1").momentum is None


def test_state_dict_keys_add_the_three_calibration_parameters() -> None:
    model = net()
    gm = rw.rewrite(model, ["rbn"], inputs())
    new = {f"{n}.{p}" for n in BNS for p in ("center_weight", "scale_weight", "scale_bias")}
    assert set(gm.state_dict()) == set(model.state_dict()) | new


def test_preserve_equals_bn_in_train_mode_through_the_pass() -> None:
    model = net()
    gm = rw.rewrite(model, ["rbn"], inputs())
    model.train()
    gm.train()
    for seed in (3, 4):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(gm(x), model(x))
    for name in BNS:
        torch.testing.assert_close(
            gm.get_submodule(name).running_mean, model.get_submodule(name).running_mean
        )


def test_paper_init_through_the_pass_does_not_preserve_outputs() -> None:
    model = net()
    gm = rw.rewrite(model, [("rbn", {"init": "paper"})], inputs())
    assert rw.report(gm).passes[0].fired == 4
    assert not torch.allclose(gm(*inputs()), model(*inputs()))
    for name in BNS:
        assert torch.equal(gm.get_submodule(name).weight, model.get_submodule(name).weight)


def test_bn_without_affine_under_preserve_is_kept_and_noted() -> None:
    gm = rw.rewrite(net(affine_stem=False), ["rbn"], inputs())
    record = rw.report(gm).passes[0]
    assert type(gm.bn) is nn.BatchNorm2d
    assert record.fired == 3 and list(rbn_modules(gm)) == BNS[1:]
    assert len(record.notes) == 1 and record.notes[0].startswith("bn: ")
    assert "without affine" in record.notes[0]
    assert "note (rbn): bn: " in rw.report(gm).table()


def test_bn_without_affine_under_paper_is_replaced() -> None:
    gm = rw.rewrite(net(affine_stem=False), [("rbn", {"init": "paper"})], inputs())
    record = rw.report(gm).passes[0]
    assert record.fired == 4 and record.notes == []
    stem = gm.get_submodule("bn")
    assert isinstance(stem, RepresentativeBatchNorm2d) and not stem.affine and stem.weight is None


def test_include_and_exclude() -> None:
    gm = rw.rewrite(net(), [("rbn", {"exclude": ["block.downsample.*"]})], inputs())
    assert list(rbn_modules(gm)) == BNS[:3]
    gm = rw.rewrite(net(), [("rbn", {"include": ["block.*"]})], inputs())
    assert list(rbn_modules(gm)) == BNS[1:]


def test_gradients_reach_every_rbn_in_a_rewritten_model() -> None:
    gm = rw.rewrite(net(), [("rbn", {"init": "paper"})], inputs())
    gm.train()
    with torch.no_grad():  # move away from the init so every gradient path is open
        for rbn in rbn_modules(gm).values():
            rbn.center_weight.uniform_(-0.5, 0.5)
            rbn.scale_weight.uniform_(-1.0, 1.0)
            rbn.scale_bias.uniform_(-0.5, 1.5)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    out = gm(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(8))).sum().backward()
    for name, rbn in rbn_modules(gm).items():
        for p in ("center_weight", "scale_weight", "scale_bias", "weight", "bias"):
            grad = getattr(rbn, p).grad
            assert grad is not None and grad.abs().sum() > 0, (name, p)


def test_running_twice_is_a_no_op() -> None:
    gm = rw.rewrite(net(), ["rbn", "rbn"], inputs())
    first, second = rw.report(gm).passes
    assert first.fired == 4 and second.fired == 0
    assert second.params_added == 0 and second.modules_replaced == []
    again = rw.rewrite(gm, [("rbn", {"init": "paper"})], inputs())
    assert rw.report(again).passes[-1].fired == 0
    assert set(again.state_dict()) == set(gm.state_dict())
    torch.testing.assert_close(again(*inputs()), gm(*inputs()))


def test_unknown_init_is_an_option_error() -> None:
    with pytest.raises(rw.OptionError, match="init"):
        rw.make_pass(("rbn", {"init": "zeros"}))
    with pytest.raises(ValueError, match="option 'init' must be one of"):
        rw.passes.RBN(init="zeros")  # type: ignore[arg-type]


def test_resnet8_from_the_zoo_replaces_all_batchnorms() -> None:
    from rewriter import zoo

    model = zoo.create("resnet8").eval()
    expected = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    assert any("shortcut" in n or "downsample" in n for n in expected)
    gm = rw.rewrite(model, ["rbn"])
    record = rw.report(gm).passes[0]
    assert record.fired == len(expected) and record.modules_replaced == expected
    assert not any(type(m) is nn.BatchNorm2d for m in gm.modules())
