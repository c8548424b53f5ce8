"""Early-Bird tickets: L1 sub-gradient, BN channel masks, distance, detector, slim ticket."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rewriter as rw
import rewriter.passes.lottery as lt
from tests.small_models import Net

BNS = {"bn": 4, "block.bn1": 8, "block.bn2": 8, "block.downsample.1": 8}


def net() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = rw.rewrite(Net(), ["masks"], (torch.randn(2, 3, 8, 8),))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in lt.bn_layers(gm).values():
            bn.weight.copy_(torch.randn(bn.weight.shape, generator=gen))
    return gm


def test_bn_layers_are_every_affine_batchnorm() -> None:
    layers = lt.bn_layers(net())
    assert {k: v.num_features for k, v in layers.items()} == BNS


def test_l1_subgradient_adds_weight_times_sign() -> None:
    gm = net()
    gm.train()
    gm(torch.randn(4, 3, 8, 8)).sum().backward()
    grads = {k: bn.weight.grad.clone() for k, bn in lt.bn_layers(gm).items()}
    others = {k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None}
    lt.add_bn_l1_subgradient(gm, 1e-4)
    for name, bn in lt.bn_layers(gm).items():
        torch.testing.assert_close(
            bn.weight.grad, grads[name] + 1e-4 * torch.sign(bn.weight), rtol=0, atol=0
        )
    for key, grad in others.items():
        if not (key.endswith(".weight") and key.rsplit(".", 1)[0] in BNS):
            assert torch.equal(dict(gm.named_parameters())[key].grad, grad), key
    fresh = net()
    lt.add_bn_l1_subgradient(fresh, 0.5)  # no backward yet: the term alone
    assert torch.equal(fresh.bn.weight.grad, 0.5 * torch.sign(fresh.bn.weight))


def reference_masks(gammas: list[Tensor], ratio: float) -> list[Tensor]:
    """Prune the round(ratio * n) smallest |gamma|, ties by position (sorted on a tuple)."""
    flat = [(abs(float(g)), i) for i, g in enumerate(torch.cat(gammas).tolist())]
    pruned = {i for _, i in sorted(flat)[: round(ratio * len(flat))]}
    keep = torch.tensor([i not in pruned for i in range(len(flat))])
    return list(keep.split([g.numel() for g in gammas]))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 0.99])
def test_bn_channel_masks_match_a_global_reference(ratio: float) -> None:
    gm = net()
    masks = lt.bn_channel_masks(gm, ratio)
    assert list(masks) == list(BNS)
    gammas = [bn.weight.detach() for bn in lt.bn_layers(gm).values()]
    for got, expected in zip(masks.values(), reference_masks(gammas, ratio), strict=True):
        assert got.dtype == torch.bool and torch.equal(got, expected)
    assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * 28)


def test_bn_channel_mask_ties_are_broken_by_position() -> None:
    gm = net()
    with torch.no_grad():
        for bn in lt.bn_layers(gm).values():
            bn.weight.fill_(-0.5)
        gm.block.bn2.weight[0] = 0.1
    masks = lt.bn_channel_masks(gm, 0.25)  # 7 of 28: the 0.1 channel, then the first six
    assert torch.equal(masks["bn"], torch.zeros(4, dtype=torch.bool))
    assert torch.equal(masks["block.bn1"], torch.tensor([False, False] + [True] * 6))
    assert not masks["block.bn2"][0] and masks["block.bn2"][1:].all()
    with pytest.raises(rw.RewriterError, match="ratio must be in"):
        lt.bn_channel_masks(gm, 1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_mask_distance_is_the_normalised_hamming_distance(bits: list[bool], rnd) -> None:
    a = torch.tensor(bits)
    b = torch.tensor([x if rnd.random() < 0.7 else not x for x in bits])
    expected = sum(x != y for x, y in zip(bits, b.tolist(), strict=True)) / len(bits)
    assert lt.mask_distance(a, b) == expected
    half = len(bits) // 2
    as_dict = {"x": a[:half], "y": a[half:]}
    assert lt.mask_distance(as_dict, {"x": b[:half], "y": b[half:]}) == expected


class ReferenceEarlyBird:
    """The authors' detector (lists, pop(0)), transcribed for comparison."""

    def __init__(self, epoch_keep: int = 5, epsilon: float = 0.1) -> None:
        self.epoch_keep, self.epsilon = epoch_keep, epsilon
        self.masks: list[Tensor] = []
        self.dists = [1.0] * (epoch_keep - 1)

    def put(self, mask: Tensor) -> bool:
        if len(self.masks) < self.epoch_keep:
            self.masks.append(mask)
        else:
            self.masks.pop(0)
            self.masks.append(mask)
        if len(self.masks) < self.epoch_keep:
            return False
        for i in range(len(self.masks) - 1):
            same = float(torch.sum(self.masks[-1] == self.masks[i]))
            self.dists[i] = 1 - same / self.masks[i].numel()
        return all(d <= self.epsilon for d in self.dists)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(6, 20), st.floats(0.0, 0.2))
def test_detector_matches_the_reference_fifo_rule(seed: int, epochs: int, flip: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    detector, reference = lt.EarlyBird(ratio=0.5), ReferenceEarlyBird()
    mask = torch.rand(60, generator=gen) > 0.5
    for _ in range(epochs):
        mask = mask ^ (torch.rand(60, generator=gen) < flip)  # a slowly drifting mask
        fired = detector.push({"a": mask[:20], "b": mask[20:]})
        assert fired == reference.put(mask.clone())
        if len(detector.masks) == 5:
            assert detector.distances == pytest.approx(reference.dists, abs=1e-12)
        else:
            assert detector.distances == []
    assert len(detector.masks) == min(epochs, 5)
    assert torch.equal(torch.cat(list(detector.ticket_masks.values())), mask)


def test_detector_fires_only_when_all_four_older_masks_are_close() -> None:
    base = torch.zeros(20, dtype=torch.bool)

    def flipped(k: int) -> dict[str, Tensor]:
        m = base.clone()
        m[:k] = True
        return {"bn": m}

    detector = lt.EarlyBird(ratio=0.5)
    for k in (3, 2, 1, 0):
        assert not detector.push(flipped(k))  # the window is not full yet
    assert detector.distances == []
    assert not detector.push(flipped(0))  # window f3 f2 f1 f0 | f0: 0.15 vetoes
    assert detector.distances == [0.15, 0.1, 0.05, 0.0]
    assert detector.push(flipped(0))  # window f2 f1 f0 f0 | f0: 0.1 is within 0.1
    assert detector.distances == [0.1, 0.05, 0.0, 0.0]
    assert detector.fired_at == 6
    assert not detector.push(flipped(3))  # the newest moved away again
    assert detector.fired_at == 6 and detector.epochs == 7


def test_detector_update_draws_from_the_model() -> None:
    gm = net()
    detector = lt.EarlyBird(ratio=0.5, window=2)
    assert not detector.update(gm)
    assert detector.update(gm) and detector.fired_at == 2 and detector.distances == [0.0]
    expected = lt.bn_channel_masks(gm, 0.5)
    assert all(torch.equal(detector.ticket_masks[k], v) for k, v in expected.items())
    with pytest.raises(rw.RewriterError, match="no mask yet"):
        lt.EarlyBird().ticket_masks  # noqa: B018


def test_start_records_the_initial_weights_mask_as_the_authors_do() -> None:
    gm = net()
    initial = lt.bn_channel_masks(gm, 0.5)
    detector = lt.EarlyBird(ratio=0.5, window=2)
    detector.start(gm)  # the mask at the start of epoch 0
    assert detector.started and detector.epochs == 1
    assert all(torch.equal(detector.masks[0][k], v) for k, v in initial.items())
    with torch.no_grad():  # "training" moves the gammas: the mask after epoch 0 differs
        for bn in lt.bn_layers(gm).values():
            bn.weight.mul_(-1).add_(torch.linspace(-1, 1, bn.weight.numel()))
    assert not detector.update(gm)  # start of epoch 1: compared with the initial mask
    assert detector.distances and detector.distances[0] > 0.1
    assert detector.update(gm)  # start of epoch 2: the same mask again
    assert detector.fired_at == 3 and detector.fired_epoch == 2  # after 2 training epochs
    plain = lt.EarlyBird(ratio=0.5, window=2)  # without start(): one mask fewer
    assert not plain.update(gm) and plain.update(gm)
    assert plain.fired_at == 2 and plain.fired_epoch == 2
    with pytest.raises(rw.RewriterError, match="before the first update"):
        plain.start(gm)


def test_bn_producers_and_slim_channel_masks() -> None:
    gm = net()
    assert lt.bn_producers(gm) == {
        "bn": "stem",
        "block.bn1": "block.conv1",
        "block.bn2": "block.conv2",
        "block.downsample.1": "block.downsample.0",
    }
    masks = lt.bn_channel_masks(gm, 0.5)
    assert set(lt.channel_masks_for_slim(gm, masks)) == {
        "stem",
        "block.conv1",
        "block.conv2",
        "block.downsample.0",
    }

    class NormFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(self.bn(x))

    plain = rw.trace(NormFirst())
    assert lt.bn_producers(plain) == {}
    assert list(lt.channel_masks_for_slim(plain, {"bn": torch.ones(3, dtype=torch.bool)})) == ["bn"]


def test_early_bird_ticket_is_physically_smaller() -> None:
    pytest.importorskip("rewriter.slim")
    gm = net()
    x = torch.randn(2, 3, 8, 8)
    masks = lt.bn_channel_masks(gm, 0.5)
    ticket = lt.early_bird_ticket(gm, (x,), masks)
    assert ticket is not gm
    assert ticket(x).shape == gm(x).shape == (2, 5)
    assert ticket.block.conv1.out_channels == int(masks["block.bn1"].sum())  # no coupling
    params = sum(p.numel() for p in ticket.parameters())
    assert params < sum(p.numel() for p in gm.parameters())
    assert lt.bn_layers(gm)["block.bn1"].num_features == 8  # the model itself is unchanged
