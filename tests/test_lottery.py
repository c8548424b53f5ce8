"""Pruning criteria and passes: hand-computed scores, exact densities, passes, contracts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import Tensor, nn

import rewriter as rw
import rewriter.passes.lottery as lt
from rewriter.passes.masks import MaskedLinear, get_masks, set_mask
from rewriter.testing import check_pass, random_models
from tests.small_models import Net

# ---------------------------------------------------------------------------
# Tiny networks with hand-set weights
# ---------------------------------------------------------------------------

W1 = [[1.0, -2.0], [3.0, -0.5]]
W2 = [[-4.0, 0.25]]


class TwoLayer(nn.Module):
    """x -> relu(W1 x) -> W2 h, no biases."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 2, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor(W1))
            self.fc2.weight.copy_(torch.tensor(W2))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def two_layer() -> torch.fx.GraphModule:
    return rw.rewrite(TwoLayer(), ["masks"], (torch.ones(1, 2),))


def net(**options: object) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return rw.rewrite(Net(), [("masks", options)], (torch.randn(2, 3, 8, 8),))


def batches(n: int = 2, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen))
        for _ in range(n)
    ]


def kept(gm: nn.Module) -> dict[str, int]:
    return {name: int(m.sum()) for name, m in get_masks(gm).items()}


def state(gm: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in gm.state_dict().items() if not k.endswith("weight_mask")}


def dot_loss(out: Tensor, target: Tensor) -> Tensor:
    return (out * target).sum()


# ---------------------------------------------------------------------------
# Hand-computed scores
# ---------------------------------------------------------------------------


def test_magnitude_scores_are_abs_weights() -> None:
    scores = lt.magnitude_scores(two_layer())
    assert torch.equal(scores["fc1"], torch.tensor([[1.0, 2.0], [3.0, 0.5]]))
    assert torch.equal(scores["fc2"], torch.tensor([[4.0, 0.25]]))


def test_magnitude_global_and_per_layer_masks_by_hand() -> None:
    gm = two_layer()
    lt.magnitude(gm, 2 / 6)  # keep |w| = 4 and 3
    assert torch.equal(gm.fc1.weight_mask, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(gm.fc2.weight_mask, torch.tensor([[1.0, 0.0]]))
    gm = two_layer()
    lt.magnitude(gm, 0.5, scope="layer")  # 2 of fc1 (3, 2), 1 of fc2 (4)
    assert torch.equal(gm.fc1.weight_mask, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(gm.fc2.weight_mask, torch.tensor([[1.0, 0.0]]))


def test_snip_scores_by_hand_over_two_batches() -> None:
    # Batch 1: x = (1, 2): W1 x = (-3, 2), relu (0, 2); dL/dW2 = (0, 2); dL/dW1 rows: 0, 0.25 x.
    # Batch 2: x = (2, 0): W1 x = (2, 6); dL/dW2 = (2, 6); dL/dW1 rows: -4 x, 0.25 x.
    data = [
        (torch.tensor([[1.0, 2.0]]), torch.ones(1, 1)),
        (torch.tensor([[2.0, 0.0]]), torch.ones(1, 1)),
    ]
    scores = lt.snip_scores(two_layer(), data, loss_fn=dot_loss)
    # summed g: W1 [[-8, 0], [0.75, 0.5]], W2 [[2, 8]]; score |g * w|
    assert torch.equal(scores["fc1"], torch.tensor([[8.0, 0.0], [2.25, 0.25]]))
    assert torch.equal(scores["fc2"], torch.tensor([[8.0, 2.0]]))


class Chain(nn.Module):
    """y = w2 * (w1 * x): two 1x1 linear layers."""

    def __init__(self, w1: float, w2: float) -> None:
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False)
        self.b = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(w1)
            self.b.weight.fill_(w2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


def test_grasp_scores_by_hand() -> None:
    # L = 0.5 (w1 w2 x / T - t)^2, w1 = 2, w2 = 3, x = 1, t = 1, T = 2: r = 2, g = (3, 2),
    # H = [[2.25, 2.5], [2.5, 1]], Hg = (11.75, 9.5), score w * Hg = (23.5, 28.5).
    gm = rw.rewrite(Chain(2.0, 3.0), ["masks"], (torch.ones(1, 1),))

    def half_mse(out: Tensor, target: Tensor) -> Tensor:
        return 0.5 * ((out - target) ** 2).sum()

    scores = lt.grasp_scores(
        gm, [(torch.ones(1, 1), torch.ones(1, 1))], loss_fn=half_mse, temperature=2.0
    )
    torch.testing.assert_close(scores["a"], torch.tensor([[23.5]]))
    torch.testing.assert_close(scores["b"], torch.tensor([[28.5]]))


def test_grasp_scores_match_a_reference_hessian_with_temperature_200() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    gm = rw.rewrite(model, ["masks"], (torch.randn(2, 3),))
    gen = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(5, 3, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(2)
    ]
    scores = lt.grasp_scores(gm, data)

    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().flatten() for n in names]).double()

    def loss(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        w0, w2 = flat[:12].view(shapes[0]), flat[12:].view(shapes[1])
        h = torch.tanh(F.linear(x.double(), w0, params["0.bias"].double()))
        return F.cross_entropy(F.linear(h, w2, params["2.bias"].double()) / 200.0, y)

    g = sum(
        torch.autograd.functional.jacobian(lambda f, x=x, y=y: loss(f, x, y), flat0)
        for x, y in data
    )
    hess = sum(
        torch.autograd.functional.hessian(lambda f, x=x, y=y: loss(f, x, y), flat0) for x, y in data
    )
    expected = flat0 * (hess @ g)
    got = torch.cat([scores["0"].flatten(), scores["2"].flatten()]).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-12)


def test_grasp_keeps_the_highest_signed_scores() -> None:
    gm = two_layer()
    scores = {"fc1": torch.tensor([[-5.0, 1.0], [3.0, -0.1]]), "fc2": torch.tensor([[2.0, -7.0]])}
    lt.prune(gm, scores, 2 / 6)
    assert kept(gm) == {"fc1": 1, "fc2": 1}
    assert gm.fc1.weight_mask[1, 0] == 1 and gm.fc2.weight_mask[0, 0] == 1


def test_synflow_scores_by_hand_and_conservation() -> None:
    # |W1| = [[1, 2], [3, .5]], |W2| = [[4, .25]], input ones: h = (3, 3.5), R = 12.875.
    gm = two_layer()
    scores = lt.synflow_scores(gm)
    assert torch.equal(scores["fc1"], torch.tensor([[4.0, 8.0], [0.75, 0.125]]))
    assert torch.equal(scores["fc2"], torch.tensor([[12.0, 0.875]]))
    assert scores["fc1"].sum() == scores["fc2"].sum() == 12.875
    assert torch.equal(gm.fc1.weight, torch.tensor(W1))  # signs restored


def test_synflow_conservation_on_a_bias_free_relu_mlp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(20, 30, bias=False),
        nn.ReLU(),
        nn.Linear(30, 40, bias=False),
        nn.ReLU(),
        nn.Linear(40, 25, bias=False),
        nn.ReLU(),
        nn.Linear(25, 10, bias=False),
    )
    gm = rw.rewrite(model, ["masks"], (torch.randn(2, 4, 5),))
    lt.random_prune(gm, 0.6)  # conservation holds for any mask
    scores = lt.synflow_scores(gm)
    sums = torch.stack([s.sum() for s in scores.values()])
    assert len(sums) == 4 and sums[0] > 0
    torch.testing.assert_close(sums, sums[0].expand(4), rtol=1e-5, atol=0)


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False)
        self.bn = nn.BatchNorm1d(1, eps=1.0)
        self.b = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(-2.0)
            self.b.weight.fill_(-3.0)
            self.bn.weight.fill_(-2.0)
            self.bn.bias.fill_(-1.0)
            self.bn.running_mean.fill_(-0.5)
            self.bn.running_var.fill_(3.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.bn(self.a(x)))


def test_synflow_uses_abs_buffers_and_eval_mode_bn_and_restores_everything() -> None:
    # abs network: z = 2; bn = 2 (z - 0.5) / sqrt(3 + 1) + 1 = 2.5; R = 3 * 2.5 = 7.5.
    # dR/da = 3 * 2 / 2 = 3 -> score a = 6; score b = 3 * 2.5 = 7.5.
    gm = rw.rewrite(LinearBN(), ["masks"], (torch.ones(4, 1),))
    gm.train()
    before = copy.deepcopy(gm.state_dict())
    scores = lt.synflow_scores(gm)
    assert torch.equal(scores["a"], torch.tensor([[6.0]]))
    assert torch.equal(scores["b"], torch.tensor([[7.5]]))
    assert gm.training and gm.bn.training
    for key, value in gm.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in gm.parameters())


def test_random_scores_are_seeded() -> None:
    a, b, c = (lt.random_scores(net(), seed) for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem"], c["stem"])
    assert all(((s >= 0) & (s < 1)).all() for s in a.values())


def test_snip_and_grasp_leave_the_model_untouched() -> None:
    gm = net()
    gm.train()
    before = state(gm)
    lt.snip(gm, batches(), 0.3, mode="train")
    lt.grasp(gm, batches(), 0.2, mode="train")
    for key, value in state(gm).items():
        assert torch.equal(value, before[key]), key  # BN running stats restored too
    assert all(p.grad is None for p in gm.parameters())
    assert gm.training


# ---------------------------------------------------------------------------
# Exact densities, ties, what is never pruned
# ---------------------------------------------------------------------------

CRITERIA = {
    "magnitude": lambda gm, d, **kw: lt.magnitude(gm, d, **kw),
    "random": lambda gm, d, **kw: lt.random_prune(gm, d, seed=3, **kw),
    "snip": lambda gm, d, **kw: lt.snip(gm, batches(), d, **kw),
    "grasp": lambda gm, d, **kw: lt.grasp(gm, batches(), d, **kw),
    "synflow": lambda gm, d, **kw: lt.synflow(gm, d, iterations=4, **kw),
}
SIZES = {"stem": 108, "block.conv1": 288, "block.conv2": 576, "block.downsample.0": 32, "fc": 40}


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("density", [0.0, 0.013, 0.1, 0.5, 0.77, 1.0])
def test_global_density_is_exact(criterion: str, density: float) -> None:
    gm = net()
    CRITERIA[criterion](gm, density)
    assert sum(kept(gm).values()) == round(density * sum(SIZES.values()))


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("density", [0.05, 0.33])
def test_per_layer_density_is_exact(criterion: str, density: float) -> None:
    gm = net()
    CRITERIA[criterion](gm, density, scope="layer")
    assert kept(gm) == {name: round(density * n) for name, n in SIZES.items()}


@pytest.mark.parametrize("criterion", CRITERIA)
def test_keep_classifier_dense(criterion: str) -> None:
    gm = net()
    CRITERIA[criterion](gm, 0.2, keep_classifier=True)
    result = kept(gm)
    assert result.pop("fc") == 40
    assert sum(result.values()) == round(0.2 * (sum(SIZES.values()) - 40))
    assert lt.current_density(gm, keep_classifier=True) == round(0.2 * 1004) / 1004


def test_output_layers_of_a_two_head_model() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.head_a = nn.Linear(8, 3)
            self.head_b = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.relu(self.body(x))
            return self.head_a(h), self.head_b(h) * 2

    gm = rw.rewrite(TwoHeads(), ["masks"], (torch.randn(2, 4),))
    assert lt.output_layers(gm) == ["head_a", "head_b"]
    lt.magnitude(gm, 0.25, keep_classifier=True)
    assert kept(gm) == {"body": 8, "head_a": 24, "head_b": 16}


def test_ties_are_broken_by_position() -> None:
    gm = two_layer()
    lt.prune(gm, {"fc1": torch.ones(2, 2), "fc2": torch.ones(1, 2)}, 0.5)
    assert torch.equal(gm.fc1.weight_mask, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(gm.fc2.weight_mask, torch.zeros(1, 2))
    gm = two_layer()
    lt.prune(
        gm, {"fc1": torch.tensor([[1.0, 2.0], [2.0, 2.0]]), "fc2": torch.tensor([[2.0, 0.0]])}, 0.5
    )
    assert torch.equal(gm.fc1.weight_mask, torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(gm.fc2.weight_mask, torch.zeros(1, 2))


def test_pruning_never_revives_and_refuses_a_higher_density() -> None:
    gm = net()
    lt.magnitude(gm, 0.5)
    first = {k: v.clone() for k, v in get_masks(gm).items()}
    lt.random_prune(gm, 0.25, seed=1)
    for name, mask in get_masks(gm).items():
        assert not (mask.bool() & ~first[name].bool()).any(), name
    assert sum(kept(gm).values()) == round(0.25 * 1044)
    with pytest.raises(rw.RewriterError, match="never revives"):
        lt.magnitude(gm, 0.3)
    with pytest.raises(rw.RewriterError, match="never revives"):
        lt.synflow(gm, 0.3, iterations=2)
    # a live weight with the lowest possible score still ranks above masked-out ones
    scores = {k: torch.where(v.bool(), -torch.inf, 1.0) for k, v in get_masks(gm).items()}
    lt.prune(gm, scores, 0.25)
    assert sum(kept(gm).values()) == round(0.25 * 1044)


def test_biases_and_norm_layers_are_never_pruned() -> None:
    gm = net()
    before = state(gm)
    lt.magnitude(gm, 0.05)
    assert set(get_masks(gm)) == set(SIZES)  # only conv/linear weights carry masks
    for key, value in state(gm).items():
        assert torch.equal(value, before[key]), key  # weights are masked, never changed
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(gm)
    with torch.no_grad():
        for name, mask in get_masks(reference).items():
            layer = reference.get_submodule(name)
            layer.weight.mul_(mask)
            mask.fill_(1.0)
    torch.testing.assert_close(gm(x), reference(x))


def test_clear_errors() -> None:
    with pytest.raises(rw.RewriterError, match="'masks' pass first"):
        lt.magnitude(Net(), 0.5)
    gm = net()
    with pytest.raises(rw.RewriterError, match=r"density must be in \[0, 1\]"):
        lt.magnitude(gm, 1.5)
    with pytest.raises(rw.RewriterError, match="scope must be"):
        lt.magnitude(gm, 0.5, scope="layers")  # type: ignore[arg-type]
    with pytest.raises(rw.RewriterError, match="shape"):
        lt.prune(gm, {**lt.magnitude_scores(gm), "fc": torch.ones(3)}, 0.5)
    with pytest.raises(rw.RewriterError, match="NaN"):
        lt.prune(gm, {**lt.magnitude_scores(gm), "fc": torch.full((5, 8), torch.nan)}, 0.5)
    with pytest.raises(rw.RewriterError, match="not masked"):
        lt.magnitude(gm, 0.5, layers=["bn"])
    with pytest.raises(rw.RewriterError, match="at least one"):
        lt.snip(gm, [], 0.5)
    with pytest.raises(rw.RewriterError, match="input shape"):
        lt.synflow(rw.trace(TwoLayerMasked()), 0.5)
    with pytest.raises(rw.RewriterError, match="nothing to prune"):
        lt.magnitude(gm, 0.5, layers=["fc"], keep_classifier=True)


class TwoLayerMasked(nn.Module):
    """A model built directly from masked layers (no rewrite, so no recorded shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = MaskedLinear(2, 2)
        self.fc.register_buffer("weight_mask", torch.ones(2, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


# ---------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------


def test_passes_are_registered_with_their_options() -> None:
    passes = rw.registered()
    for name in ("magnitude", "random_prune", "snip", "grasp", "synflow"):
        specs = {s.name for s in rw.option_specs(passes[name])}
        assert {"density", "scope", "keep_classifier", "include", "exclude"} <= specs, name
    assert "iterations" in {s.name for s in rw.option_specs(passes["synflow"])}
    assert "seed" in {s.name for s in rw.option_specs(passes["random_prune"])}
    with pytest.raises(rw.OptionError, match=r"option 'density' must be .* in \[0, 1\]"):
        rw.make_pass(("magnitude", {"density": 1.5}))
    with pytest.raises(rw.OptionError, match="scope"):
        rw.make_pass(("synflow", {"scope": "local"}))


def test_magnitude_pass_masks_and_prunes_and_reports() -> None:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    gm = rw.rewrite(model, [("magnitude", {"density": 0.2})], (x,))
    reference = rw.rewrite(model, ["masks"], (x,))
    lt.magnitude(reference, 0.2)
    assert all(torch.equal(get_masks(gm)[k], v) for k, v in get_masks(reference).items())
    record = rw.report(gm).passes[0]
    assert record.matches == {"mask_layer": 5, "prune_layer": 5}
    assert record.notes == ["kept 209 of 1,044 prunable weights (20.02%)"]
    assert record.buffers_added == 1044
    assert model.fc.weight.shape == (5, 8) and not hasattr(model.fc, "weight_mask")
    again = rw.rewrite(gm, [("magnitude", {"density": 0.2})], (x,))
    assert rw.report(again).passes[-1].fired == 0  # running twice is a no-op


def test_pass_include_exclude_and_existing_masks() -> None:
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    gm = rw.rewrite(Net(), [("magnitude", {"density": 0.1, "exclude": ["fc", "stem"]})], (x,))
    assert set(get_masks(gm)) == {"block.conv1", "block.conv2", "block.downsample.0"}
    assert sum(kept(gm).values()) == round(0.1 * (288 + 576 + 32))
    # masks inserted before: the pass prunes only what its own filters select
    torch.manual_seed(0)
    gm = rw.rewrite(Net(), ["masks", ("synflow", {"density": 0.1, "include": ["block.*"]})], (x,))
    assert kept(gm)["stem"] == 108 and kept(gm)["fc"] == 40
    assert kept(gm)["block.conv1"] + kept(gm)["block.conv2"] + kept(gm)["block.downsample.0"] == 90
    gm = rw.rewrite(Net(), [("magnitude", {"include": ["fc"], "keep_classifier": True})], (x,))
    assert rw.report(gm).passes[0].notes[-1].startswith("only the classifier")


def test_data_passes_need_data_from_python() -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    with pytest.raises(rw.PassError, match=r"Snip.with_data\(batches"):
        rw.rewrite(model, [("snip", {"density": 0.2})], (x,))
    with pytest.raises(rw.PassError, match="grasp"):
        rw.rewrite(model, ["grasp"], (x,))
    for cls, function in ((lt.Snip, lt.snip), (lt.GraSP, lt.grasp)):
        gm = rw.rewrite(model, [cls.with_data(batches(), density=0.2)], (x,))
        reference = rw.rewrite(model, ["masks"], (x,))
        function(reference, batches(), 0.2)
        assert all(torch.equal(get_masks(gm)[k], v) for k, v in get_masks(reference).items())
        assert rw.report(gm).pipeline()[0][1]["density"] == 0.2  # options only, not the data
    with pytest.raises(rw.OptionError, match="unknown option"):
        lt.Snip.with_data(batches(), densty=0.2)


def test_masks_stay_in_the_graph_without_hooks() -> None:
    gm = rw.rewrite(
        Net(), [("synflow", {"density": 0.3, "iterations": 5})], (torch.randn(2, 3, 8, 8),)
    )
    for module in gm.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
    assert all(type(m).__name__.startswith("Masked") for m in lt.masked_layers(gm).values())


def test_set_mask_buffers_are_updated_in_place() -> None:
    gm = net()
    buffers = {k: v.data_ptr() for k, v in get_masks(gm).items()}
    for criterion in CRITERIA.values():
        criterion(gm, 0.9 * lt.current_density(gm))
    assert {k: v.data_ptr() for k, v in get_masks(gm).items()} == buffers
    set_mask(gm, "fc", torch.ones(5, 8))  # the masks module's own helper still applies


# ---------------------------------------------------------------------------
# Property suite on random graphs (data-free passes)
# ---------------------------------------------------------------------------

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATA_FREE = [
    ("magnitude", {"density": 0.3}),
    ("random_prune", {"density": 0.2, "scope": "layer"}),
    ("synflow", {"density": 0.1, "iterations": 3}),
]


@pytest.mark.parametrize("spec", DATA_FREE, ids=lambda s: s[0])
@PROPERTY
@given(rm=random_models())
def test_pass_contracts_on_random_graphs(spec: tuple[str, dict], rm) -> None:
    result = check_pass(spec, rm)
    masks = get_masks(result.gm)
    expected = [n for n, m in rm.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(masks) == sorted(expected), rm.description
    density = spec[1]["density"]
    if spec[1].get("scope") == "layer":
        assert all(int(m.sum()) == round(density * m.numel()) for m in masks.values())
    else:
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == round(density * total)


# ---------------------------------------------------------------------------
# Compile: in-place mask updates never recompile
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mask_updates_do_not_recompile_a_compiled_model() -> None:
    torch._dynamo.reset()
    gm = net()
    gm.train()
    compiled = torch.compile(gm, fullgraph=True)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    x, y = batches(1, seed=5)[0]
    rewind_state = lt.save_state(gm)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        lt.add_bn_l1_subgradient(gm, 1e-4)
        optimizer.step()

    with torch._dynamo.config.patch(error_on_recompile=True):
        step()
        step()
        lt.magnitude(gm, 0.5)
        step()
        lt.synflow(gm, 0.3, iterations=3)
        step()
        lt.snip(gm, batches(), 0.2)
        lt.grasp(gm, batches(), 0.15)
        step()
        lt.imp_prune(gm, 0.2)
        lt.rewind(gm, rewind_state)
        step()
        lt.resample_weights(gm, seed=3)
        step()
    assert lt.current_density(gm) == (157 - 32) / 1044  # 15% of 1,044, minus ceil(20%)
    # the compiled graph computes with the updated masks (train mode: batch statistics)
    torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-4)
    for name, layer in lt.masked_layers(gm).items():
        assert (layer.weight.grad[layer.weight_mask == 0] == 0).all(), name


def test_pruned_models_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    by_pass = rw.rewrite(model, [("magnitude", {"density": 0.2})], (x,))
    by_function = rw.rewrite(model, ["masks"], (x,))
    lt.snip(by_function, batches(), 0.3)
    for name, gm in (("pass", by_pass), ("function", by_function)):
        path = tmp_path / f"{name}.safetensors"
        rw.save(gm, path, source="tests.small_models:Net")
        back = rw.load(path)
        assert all(torch.equal(get_masks(back)[k], v) for k, v in get_masks(gm).items())
        torch.testing.assert_close(back.eval()(x), gm.eval()(x))


# ---------------------------------------------------------------------------
# Scoring mode (GraSP's reference code: train mode) and the model's device and dtype
# ---------------------------------------------------------------------------


def test_snip_and_grasp_score_in_the_requested_batchnorm_mode() -> None:
    data = batches()
    by_mode = {}
    for mode in ("eval", "train"):
        gm = net()
        gm.eval()  # the caller's mode does not matter: the scoring mode does
        weights = {n: layer.weight for n, layer in lt.masked_layers(gm).items()}
        getattr(gm, mode)()
        loss = sum(F.cross_entropy(gm(x), y) for x, y in data)
        grads = torch.autograd.grad(loss, list(weights.values()))
        expected = {n: (g * w).abs() for (n, w), g in zip(weights.items(), grads, strict=True)}
        gm.eval()
        scores = lt.snip_scores(gm, data, mode=mode)
        for name, value in expected.items():
            torch.testing.assert_close(scores[name], value)
        by_mode[mode] = scores
        assert not gm.training  # restored
    assert not torch.allclose(by_mode["eval"]["stem"], by_mode["train"]["stem"])
    train_grasp = lt.grasp_scores(net(), data, mode="train")
    eval_grasp = lt.grasp_scores(net(), data)
    assert not torch.allclose(train_grasp["stem"], eval_grasp["stem"])
    with pytest.raises(rw.RewriterError, match="mode"):
        lt.snip_scores(net(), data, mode="batch")  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [lt.Snip, lt.GraSP])
def test_data_passes_take_the_mode_option(cls) -> None:
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    model = Net()
    via_pass = rw.rewrite(model, [cls.with_data(batches(), density=0.3, mode="train")], (x,))
    direct = rw.rewrite(model, ["masks"], (x,))
    prune = lt.snip if cls is lt.Snip else lt.grasp
    prune(direct, batches(), 0.3, mode="train")
    assert all(torch.equal(get_masks(via_pass)[k], v) for k, v in get_masks(direct).items())
    assert rw.make_pass((cls.name, {"density": 0.3})).mode == "eval"  # the documented default
    with pytest.raises(rw.OptionError, match="mode"):
        rw.make_pass((cls.name, {"density": 0.3, "mode": "batch"}))


def test_synflow_default_inputs_follow_the_models_device_and_dtype() -> None:
    from rewriter.passes.lottery_scores import _ones_like_inputs

    gm = net()  # traced in float32 on the CPU
    on_meta = copy.deepcopy(gm).to("meta")
    (ones,) = _ones_like_inputs(on_meta, None)
    assert ones.device.type == "meta" and ones.shape == (2, 3, 8, 8)  # the example batch
    (given,) = _ones_like_inputs(on_meta, (torch.zeros(5, 3, 8, 8),))
    assert given.device.type == "meta"
    double = copy.deepcopy(gm).double()
    (ones,) = _ones_like_inputs(double, None)
    assert ones.dtype == torch.float64
    lt.synflow(double, 0.3, iterations=3)  # runs on the float64 model without inputs
    assert lt.current_density(double) == pytest.approx(0.3, abs=1e-3)
    assert all(m.dtype == torch.float64 for m in get_masks(double).values())
