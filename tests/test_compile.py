"""``masks`` + ``rbn`` under ``torch.compile(fullgraph=True)``: trains, and masks update live.

Models are tiny so each compile takes a few seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter.passes.masks import set_mask, sparsity


class Tiny(nn.Module):
    """conv/bn/relu -> residual conv/bn -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def rewritten() -> fx.GraphModule:
    torch.manual_seed(0)
    x, _ = data()
    return rw.rewrite(Tiny(), ["masks", "rbn"], (x[:2],))


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def test_rewritten_model_is_what_the_compile_tests_expect() -> None:
    """Fast guard: the model compiled below really carries masks and RBNs."""
    gm = rewritten()
    assert [p.fired for p in rw.report(gm).passes] == [3, 2]
    assert set(sparsity(gm)) == {"conv1", "conv2", "fc", "global"}


@pytest.mark.slow
def test_compiled_rewritten_model_trains() -> None:
    gm = rewritten()
    mask = torch.ones(4, 3, 3, 3)
    mask[0] = 0
    set_mask(gm, "conv1", mask)
    gm.train()
    compiled = torch.compile(gm, fullgraph=True)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    x, y = data()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))
    # the masked filter got exactly zero gradient under compile as well
    assert torch.equal(gm.conv1.weight.grad[0], torch.zeros(3, 3, 3))
    assert gm.conv1.weight.grad[1:].abs().sum() > 0
    for name in ("bn1", "bn2"):  # every RBN parameter learned something
        rbn = gm.get_submodule(name)
        for p in ("center_weight", "scale_weight", "scale_bias"):
            assert getattr(rbn, p).grad.abs().sum() > 0, (name, p)
    assert int(gm.bn1.num_batches_tracked) == 5  # running stats updated in compiled code


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_set_mask_after_compiling_does_not_recompile(mode: str) -> None:
    gm = rewritten()
    gm.train(mode == "train")
    x, _ = data()
    compiled = torch.compile(gm, fullgraph=True)
    with torch.no_grad():
        before = compiled(x)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1

    mask = torch.ones(4, 4, 3, 3, dtype=torch.bool)
    mask[1:3] = False
    set_mask(gm, "conv2", mask)
    set_mask(gm, "fc", torch.zeros(3, 4))
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        after = compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames

    # the new masks are really used: the fc mask of zeros leaves only the bias
    expected_bias = gm.fc.bias.detach().expand(8, 3)
    torch.testing.assert_close(after, expected_bias)
    assert not torch.allclose(after, before)
    set_mask(gm, "fc", torch.ones(3, 4))
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        compiled_out = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(compiled_out, gm(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(compiled_out, before)
