"""Iterative magnitude pruning: rounds, exact rewinding, controls."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import rewriter as rw
import rewriter.passes.lottery as lt
from rewriter.passes.masks import get_masks
from tests.small_models import Net

SIZES = {"stem": 108, "block.conv1": 288, "block.conv2": 576, "block.downsample.0": 32, "fc": 40}


def masked_net() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = rw.rewrite(Net(), ["masks"], (torch.randn(2, 3, 8, 8),))
    gm.train()
    return gm


def snapshot(gm: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in gm.state_dict().items() if not k.endswith("weight_mask")}


class FakeTraining:
    """A training function that perturbs every parameter and BN buffer at each step.

    Records the state at the start of every call and at the start of step ``watch``.
    """

    def __init__(self, steps: int = 6, watch: int | None = None, call_reached: bool = True) -> None:
        self.steps = steps
        self.watch = watch
        self.call_reached = call_reached
        self.starts: list[dict[str, Tensor]] = []
        self.runs: list[lt.TrainRun] = []
        self.watched: dict[str, Tensor] | None = None
        self.gen = torch.Generator().manual_seed(7)

    def __call__(self, model: nn.Module, run: lt.TrainRun) -> float:
        self.starts.append(snapshot(model))
        self.runs.append(run)
        for step in range(run.start_step, self.steps):
            if self.call_reached:
                run.reached(step)
            if run.round == 0 and step == self.watch:
                self.watched = snapshot(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=self.gen) * 0.1)
                for name, b in model.named_buffers():
                    if name.endswith("running_mean"):
                        b.add_(0.01)
        return 100.0 - run.round


def expected_live(rounds: int, total: int, rate: float = 0.2) -> list[int]:
    live = [total]
    for _ in range(rounds):
        live.append(live[-1] - math.ceil(rate * live[-1]))
    return live


def test_rounds_prune_twenty_percent_of_the_remaining_weights_globally() -> None:
    gm = masked_net()
    train = FakeTraining()
    result = lt.imp(gm, train, rounds=4)
    total = sum(SIZES.values())
    live = expected_live(4, total)
    assert [r.kept for r in result.rounds] == live
    assert [r.density for r in result.rounds] == [n / total for n in live]
    assert [r.metric for r in result.rounds] == [100.0, 99.0, 98.0, 97.0, 96.0]
    assert [r.round for r in result.rounds] == [0, 1, 2, 3, 4]
    for earlier, later in zip(result.rounds, result.rounds[1:], strict=False):
        for name, mask in later.masks.items():
            assert not (mask & ~earlier.masks[name]).any()  # masks only shrink
    assert "round  density" in result.table()


def test_each_round_prunes_the_smallest_trained_weights() -> None:
    gm = masked_net()
    trained: list[dict[str, Tensor]] = []

    def train(model: nn.Module, run: lt.TrainRun) -> float:
        FakeTraining(steps=2)(model, run)
        trained.append({n: m.weight.detach().clone() for n, m in lt.masked_layers(model).items()})
        return 0.0

    result = lt.imp(gm, train, rounds=2)
    for r in (1, 2):
        weights, previous = trained[r - 1], result.rounds[r - 1].masks
        live = torch.cat([weights[n].abs().flatten()[previous[n].flatten()] for n in SIZES])
        kept = torch.cat(
            [weights[n].abs().flatten()[result.rounds[r].masks[n].flatten()] for n in SIZES]
        )
        pruned_now = torch.cat(
            [
                weights[n].abs().flatten()[(previous[n] & ~result.rounds[r].masks[n]).flatten()]
                for n in SIZES
            ]
        )
        assert kept.numel() + pruned_now.numel() == live.numel()
        assert kept.min() >= pruned_now.max()


def test_rewinding_to_step_zero_is_bit_identical() -> None:
    gm = masked_net()
    initial = snapshot(gm)
    train = FakeTraining()
    result = lt.imp(gm, train, rounds=3)
    assert result.rewind_step == 0
    for key, value in initial.items():
        assert torch.equal(result.rewind_state[key], value), key
    for r, start in enumerate(train.starts):
        for key, value in initial.items():
            assert torch.equal(start[key], value), (r, key)  # every round starts from init
        if r:
            for name, mask in result.rounds[r].masks.items():  # survivors, explicitly
                weight = start[f"{name}.weight"]
                assert torch.equal(weight[mask], initial[f"{name}.weight"][mask])
    assert [run.start_step for run in train.runs] == [0, 0, 0, 0]


def test_rewinding_to_step_k_restores_the_weights_seen_at_step_k() -> None:
    gm = masked_net()
    train = FakeTraining(steps=8, watch=3)
    result = lt.imp(gm, train, rounds=2, rewind_step=3)
    assert train.watched is not None
    for key, value in train.watched.items():
        assert torch.equal(result.rewind_state[key], value), key
    for start in train.starts[1:]:
        for key, value in train.watched.items():
            assert torch.equal(start[key], value), key
    assert [(run.round, run.start_step, run.rewind_step) for run in train.runs] == [
        (0, 0, 3),
        (1, 3, 3),
        (2, 3, 3),
    ]


def test_a_training_function_that_never_reports_step_k_is_an_error() -> None:
    with pytest.raises(rw.RewriterError, match=r"never called run.reached\(2\)"):
        lt.imp(masked_net(), FakeTraining(call_reached=False), rounds=1, rewind_step=2)


def test_keep_classifier_and_per_layer_scope() -> None:
    gm = masked_net()
    result = lt.imp(gm, FakeTraining(steps=1), rounds=2, keep_classifier=True, scope="layer")
    final = result.rounds[-1].masks
    assert int(final["fc"].sum()) == 40
    for name, n in SIZES.items():
        if name != "fc":
            assert int(final[name].sum()) == expected_live(2, n)[-1], name
    assert result.rounds[-1].total == sum(SIZES.values()) - 40


def test_random_reinit_control_keeps_masks_and_draws_new_weights() -> None:
    gm = masked_net()
    result = lt.imp(gm, FakeTraining(steps=2), rounds=2)
    train = FakeTraining(steps=2)
    rounds = lt.imp_control(gm, train, result, "reinit", seed=5, init_fn=Net)
    assert [r.round for r in rounds] == [1, 2]
    assert [r.kept for r in rounds] == [r.kept for r in result.rounds[1:]]
    for control, ticket, start in zip(rounds, result.rounds[1:], train.starts, strict=True):
        assert all(torch.equal(control.masks[n], ticket.masks[n]) for n in SIZES)
        assert not torch.equal(start["stem.weight"], result.rewind_state["stem.weight"])
        assert torch.equal(start["bn.running_mean"], torch.zeros(4))  # BN reset as well
    again = FakeTraining(steps=2)
    lt.imp_control(gm, again, result, "reinit", seed=5, init_fn=Net)
    assert torch.equal(again.starts[0]["stem.weight"], train.starts[0]["stem.weight"])  # seeded
    torch.manual_seed(6)  # round 1 uses seed + 1: exactly what the constructor draws
    assert torch.equal(train.starts[0]["stem.weight"], Net().stem.weight.detach())


class KaimingNet(nn.Module):
    """A model whose constructor uses its own init (std 3), unlike reset_parameters()."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 50), nn.Linear(50, 4)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=3.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_reinit_control_uses_the_models_own_initialiser() -> None:
    torch.manual_seed(0)
    gm = rw.rewrite(KaimingNet(), ["masks"], (torch.randn(2, 20),))
    result = lt.imp(gm, FakeTraining(steps=1), rounds=1)
    with pytest.raises(rw.RewriterError, match="init_fn"):  # no factory recorded
        lt.imp_control(gm, FakeTraining(steps=1), result, "reinit")
    train = FakeTraining(steps=1)
    lt.imp_control(gm, train, result, "reinit", init_fn=KaimingNet)
    assert train.starts[0]["fc1.weight"].std().item() == pytest.approx(3.0, rel=0.1)
    lt.resample_weights(gm, seed=1)  # PyTorch's default: far smaller weights
    assert gm.fc1.weight.std().item() < 0.2
    with pytest.raises(rw.RewriterError, match="does not match"):
        lt.resample_weights(gm, seed=1, init_fn=lambda: nn.Linear(3, 3))


def test_reinit_control_rebuilds_a_zoo_model_from_its_factory() -> None:
    torch.manual_seed(0)
    model = rw.zoo.create("mlp", hidden=(12,))
    gm = rw.rewrite(model, ["masks"], rw.zoo.example_inputs("mlp"))
    result = lt.imp(gm, FakeTraining(steps=1), rounds=1)
    train = FakeTraining(steps=1)
    lt.imp_control(gm, train, result, "reinit", seed=3)
    torch.manual_seed(4)  # seed + round 1
    expected = rw.zoo.create("mlp", hidden=(12,)).state_dict()
    for key, value in expected.items():
        assert torch.equal(train.starts[0][key], value), key


def test_random_mask_control_keeps_layer_densities_and_the_rewind_weights() -> None:
    gm = masked_net()
    result = lt.imp(gm, FakeTraining(steps=2), rounds=2)
    train = FakeTraining(steps=2)
    rounds = lt.imp_control(gm, train, result, "random_mask")
    for control, ticket, start in zip(rounds, result.rounds[1:], train.starts, strict=True):
        for name in SIZES:
            assert int(control.masks[name].sum()) == int(ticket.masks[name].sum())
        assert not torch.equal(control.masks["block.conv2"], ticket.masks["block.conv2"])
        for key, value in result.rewind_state.items():
            assert torch.equal(start[key], value), key


def test_imp_needs_masks_and_valid_arguments() -> None:
    with pytest.raises(rw.RewriterError, match="'masks' pass first"):
        lt.imp(Net(), FakeTraining(), rounds=1)
    with pytest.raises(rw.RewriterError, match="rate must be in"):
        lt.imp(masked_net(), FakeTraining(), rounds=1, rate=1.0)
    with pytest.raises(rw.RewriterError, match="kind must be"):
        lt.imp_control(masked_net(), FakeTraining(), lt.ImpResult([], {}, 0), "shuffle")  # type: ignore[arg-type]


def test_rewind_and_save_state_skip_masks() -> None:
    gm = masked_net()
    state = lt.save_state(gm)
    assert not any(k.endswith("weight_mask") for k in state)
    lt.magnitude(gm, 0.5)
    with torch.no_grad():
        gm.fc.weight.add_(1.0)
    lt.rewind(gm, state)
    assert torch.equal(gm.fc.weight, state["fc.weight"])
    assert int(get_masks(gm)["fc"].sum()) < 40  # masks untouched by rewinding
    with pytest.raises(rw.RewriterError, match="no entry"):
        lt.rewind(gm, {})


def test_controls_can_train_a_subset_of_rounds() -> None:
    gm = masked_net()
    result = lt.imp(gm, FakeTraining(steps=1), rounds=4)
    train = FakeTraining(steps=1)
    rounds = lt.imp_control(gm, train, result, "random_mask", rounds=[2, 4])
    assert [r.round for r in rounds] == [2, 4] and len(train.starts) == 2
    assert [r.kept for r in rounds] == [result.rounds[2].kept, result.rounds[4].kept]
    with pytest.raises(rw.RewriterError, match=r"rounds \[0, 5\] are not pruned rounds"):
        lt.imp_control(gm, train, result, "reinit", rounds=[0, 5])
