"""Hugging Face transformers through the export front end: masks, heads, slimming.

The tiny models come from ``tests/hf_models.py`` (built from configs, nothing is
downloaded). Exporting takes seconds, so each model is exported once per module: the
static-shape lifted graphs (``lifted``) serve the analysis tests, and the full
``rewrite(model, ["masks"], inputs)`` path with the default dynamic export runs once per
architecture (three of them in the slow run).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rewriter as rw
from rewriter.errors import OptionError, RewriterError, TraceError
from rewriter.frontends import build_graph, export_graph, is_hf_model, split_inputs
from rewriter.passes.masks import MASKED

hf_models = pytest.importorskip("hf_models")

FAST_FULL = {"llama"}  # full-path masks test in the default run; the others are slow


def close(out: dict, ref) -> float:
    """Largest |difference| over the output fields, after checking they are the same fields."""
    fields = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor)}
    assert set(out) == set(fields)
    return max((out[k] - fields[k]).abs().max().item() for k in fields)


@pytest.fixture(scope="module")
def lifted() -> dict[str, tuple[nn.Module, dict, torch.fx.GraphModule, tuple]]:
    """name -> (HF model, keyword inputs, static-shape lifted graph, positional inputs)."""
    out = {}
    for name, build in hf_models.BUILDERS.items():
        model, kwargs = build()
        gm, inputs = export_graph(model, (), kwargs, dynamic=False)
        out[name] = (model, kwargs, gm, inputs)
    return out


# -- front end --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [n if n in FAST_FULL else pytest.param(n, marks=pytest.mark.slow) for n in
             hf_models.BUILDERS]
)
def test_masks_reach_every_linear_of_each_hf_model(name: str) -> None:
    model, kwargs = hf_models.BUILDERS[name]()
    net = rw.rewrite(model, ["masks"], kwargs)
    rep = rw.report(net)
    assert rep.frontend == "export" and "front end: export" in rep.table()
    masked = [n for n, m in net.named_modules() if type(m) in MASKED.values()]
    linears = [n for n in masked if isinstance(net.get_submodule(n), nn.Linear)]
    assert len(linears) == hf_models.linear_count(model)  # Conv1D counted as linear too
    assert rep.passes[0].fired == len(masked)
    with torch.no_grad():
        assert close(net(**kwargs), model(**kwargs)) == 0.0
        # the default export is dynamic in batch and sequence length (ViT: batch only)
        bigger = {
            k: torch.cat([v, v[:1]]) if k == "pixel_values" else torch.cat([v, v[:1]])[:, :5]
            for k, v in kwargs.items()
        }
        assert close(net(**bigger), model(**bigger)) < 1e-5
    assert not is_hf_model(net) and is_hf_model(model)


def test_lifted_models_keep_names_and_outputs(lifted) -> None:
    for name, (model, kwargs, gm, inputs) in lifted.items():
        own = set(model.state_dict())
        assert set(gm.state_dict()) <= own, name  # names unchanged (unused buffers dropped)
        with torch.no_grad():
            assert close(gm(*inputs), model(**kwargs)) == 0.0, name
    assert lifted["gpt2"][2].meta["rewriter_linearized"] == [
        f"h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                 "mlp.c_proj")
    ]


def test_lifted_graph_switches_dropout_between_train_and_eval(lifted) -> None:
    model, kwargs, gm, inputs = lifted["bert"]
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 5 and not any(m.training for m in dropouts)
    gm.train()
    try:
        torch.manual_seed(0)
        a = gm(*inputs)["last_hidden_state"]
        b = gm(*inputs)["last_hidden_state"]
        assert not torch.equal(a, b)  # dropout is live in training mode
    finally:
        gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(*inputs)["last_hidden_state"], gm(*inputs)["last_hidden_state"])


def test_frontend_option_and_errors(lifted) -> None:
    with pytest.raises(OptionError, match="unknown front end 'jit'"):
        rw.rewrite(nn.Linear(2, 2), [], torch.randn(1, 2), frontend="jit")
    with pytest.raises(RewriterError, match="needs example inputs"):
        build_graph(nn.Linear(2, 2), None, frontend="export")
    with pytest.raises(RewriterError, match="string keys"):
        split_inputs({0: torch.zeros(1)})
    with pytest.raises(RewriterError, match="takes tensors only"):
        export_graph(nn.Linear(2, 2), (), {"input": 3})
    # a plain model: auto traces with fx; export gives the same outputs
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    fx_net = rw.rewrite(net, ["masks"], x)
    ex_net = rw.rewrite(net, ["masks"], {"input": x}, frontend="export")
    assert rw.report(fx_net).frontend == "fx" and rw.report(ex_net).frontend == "export"
    assert torch.equal(fx_net(x), ex_net(x))
    assert rw.report(ex_net).passes[0].fired == rw.report(fx_net).passes[0].fired == 2


class _RootBranch(nn.Module):
    """fx cannot trace the root forward (it branches on a size); export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) > 1:
            return self.fc(x) * 2
        return self.fc(x)


def test_auto_falls_back_to_export_when_fx_fails_at_the_root() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(TraceError):
        rw.trace(_RootBranch())
    net = rw.rewrite(_RootBranch(), ["masks"], x)
    assert rw.report(net).frontend == "export" and rw.report(net).passes[0].fired == 1
    with pytest.raises(TraceError):
        rw.rewrite(_RootBranch(), ["masks"], x, frontend="fx")
