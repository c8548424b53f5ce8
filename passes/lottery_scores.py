"""Pruning criteria: score every masked weight, keep the best ``density``, set the masks.

``conv/linear(x) -> same layer with weight * weight_mask``, the mask keeping the
highest-scoring weights (Synaptic-Flow's conventions, ``docs/methods/lottery.md``).

Scores (higher = more important; every criterion keeps the highest):

* ``magnitude``: ``|w|``.
* ``random``: uniform random numbers from a seeded generator.
* ``snip``: ``|g * w|``, ``g`` the gradient of the loss summed over the batches given.
* ``grasp``: ``w * Hg`` with the logits divided by ``temperature`` (200): ``g`` the
  gradient summed over the batches (no graph), ``Hg`` the Hessian-gradient product by
  double backprop. GraSP's paper scores ``S(-w) = -w * Hg`` and removes the *highest*
  ``S``; Synaptic-Flow's code scores ``w * Hg`` and removes the *lowest*, which is the
  same mask. We use Synaptic-Flow's sign so that all criteria keep the highest score.
* ``synflow``: ``|w * dR/dw|``, ``R`` the sum of the outputs for an all-ones input
  after every floating-point parameter and buffer is replaced by its absolute value,
  with BatchNorm in eval mode; iterated ``iterations`` (100) times, the kept fraction
  after iteration ``k`` being ``density ** (k / iterations)``. The all-ones input has the
  example inputs' batch size ``B`` (a program exported with a fixed batch, e.g.
  ``x.view(x.size(0), -1)`` or Hugging Face's ``expand(cls_token, [B, -1, -1])``, takes
  no other), and ``R`` is divided by ``B``: the ``B`` samples are identical and each
  sample's computation is independent in eval mode, so the batch's gradient is ``B``
  times one sample's and the scores, hence the masks, are the paper's batch-of-one ones
  (up to float rounding; tested on a zoo model). **Integer inputs** (token ids,
  attention masks) are all ones as well: every token is id 1 and every position is
  attended. The paper is data-free on images; here the signal entering the first layer
  is the absolute embedding of token 1 (plus the position embeddings), the closest
  data-free analogue of its all-ones image. **dtype**: scores are computed on a float64
  copy, as the paper does. Casts inside the model (Llama's RMSNorm and rotary
  embeddings compute in float32, GPT-2 casts its attention mask) stay: they limit
  precision and range only where they are, and the scores are those of the model run
  on float64 state and inputs. Lifted ``.pt2`` programs no longer assert ``float32``
  (:func:`rewriter.lift.lift` drops export's ``_assert_tensor_metadata``), so GPT-2 and
  Llama score in float64 too. Only a graph that cannot run in float64 scores in the
  model's own dtype: one that asserts a floating dtype (:func:`pins_float_dtype`), or
  whose float64 run fails (a cast to float32 meeting float64 weights in a matmul,
  ``fc(x.float())``). An overflow is an error in either case.

Masks (:func:`prune`): the kept count is exactly ``round(density * n)``, ``n`` the number
of prunable weights (global scope, the default) or of each layer's weights (``"layer"``
scope); ties are broken by position (the weight that comes first in layer order, then in
the flattened weight, is kept). Pruning never revives a masked-out weight: those rank
below every live weight, and a density above the current one is an error. Only the
weights of masked conv/linear layers are ever pruned: biases and norm layers have no
masks. ``keep_classifier`` leaves the output layers (the masked layers nearest the model's
outputs, i.e. the classifier, or each head of a multi-head model) out of the pool;
``density`` then counts the other layers only.

Departures from the reference code, none of which changes which weights a criterion
prefers: scores are not normalised (SNIP and GraSP divide by a positive sum); SNIP
differentiates with respect to the weights instead of the masks (equal for live weights,
which are the only ones ranked); random scores are uniform instead of normal (either way
a uniformly random ranking); densities are hit exactly instead of
thresholding with ``<=`` (which removes every weight tied at the threshold); the model's
parameters, buffers, gradients and training modes are restored exactly after scoring
(the reference code multiplies the signs back and leaves ``.grad`` filled).

Mode: SNIP and GraSP score in eval mode by default (``mode="eval"``, BatchNorm with its
running statistics), as Synaptic-Flow's ``prune_loop`` does for every criterion; this is
the setting of the layer-collapse comparison we reproduce. GraSP's own reference code
scores in training mode (BatchNorm batch statistics); ``mode="train"`` does that
(running statistics are restored afterwards). SynFlow always scores in eval mode.

The passes built on these functions are in :mod:`rewriter.passes.lottery_passes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map

from rewriter.errors import RewriterError
from rewriter.manager import in_float64

from .masks import MASK, get_masks, model_placement, set_mask

Scores = dict[str, Tensor]
Scope = Literal["global", "layer"]
Mode = Literal["eval", "train"]  # BatchNorm mode while scoring with data
Batch = tuple[Any, Tensor]  # (input tensor or tuple of input tensors, target)
LossFn = Callable[[Any, Tensor], Tensor]

# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def masked_layers(gm: nn.Module) -> dict[str, nn.Module]:
    """The masked conv/linear layers by qualified name; an error if there are none."""
    masks = get_masks(gm)
    if not masks:
        raise RewriterError(
            "the model has no masked layers: apply the 'masks' pass first "
            "(rewriter.rewrite(model, ['masks'], example_inputs)), or use a pruning pass "
            "such as 'magnitude', which inserts the masks itself"
        )
    modules = dict(gm.named_modules())
    return {name: modules[name] for name in masks}


def output_layers(gm: nn.Module) -> list[str]:
    """The masked layers nearest the outputs (the classifier), in module order.

    In a GraphModule: every masked layer reached from an output without passing through
    another masked layer. In any other module: the last masked layer registered.
    """
    layers = masked_layers(gm)
    if not isinstance(gm, fx.GraphModule):
        return [list(layers)[-1]]
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        for node in stack.pop().all_input_nodes:
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_module" and str(node.target) in layers:
                found.add(str(node.target))
            else:
                stack.append(node)
    return [name for name in layers if name in found]


def current_density(
    gm: nn.Module, *, keep_classifier: bool = False, layers: Iterable[str] | None = None
) -> float:
    """Fraction of live (unmasked) weights among the prunable weights."""
    pool = _prunable(gm, keep_classifier, layers)
    masks = get_masks(gm)
    live = sum(int((masks[n] != 0).sum()) for n in pool)
    return live / sum(masks[n].numel() for n in pool)


def _prunable(gm: nn.Module, keep_classifier: bool, layers: Iterable[str] | None) -> list[str]:
    masked = masked_layers(gm)
    if layers is None:
        chosen = list(masked)
    else:
        chosen = list(layers)
        unknown = [n for n in chosen if n not in masked]
        if unknown:
            raise RewriterError(
                f"layers {unknown} are not masked; masked layers: {', '.join(masked)}"
            )
    skip = set(output_layers(gm)) if keep_classifier else set()
    pool = [n for n in chosen if n not in skip]
    if not pool:
        raise RewriterError(
            "nothing to prune: the only selected layers are the classifier, kept dense "
            "by keep_classifier=True"
        )
    return pool


# --------------------------------------------------------------------------------------------
# Scores -> masks
# --------------------------------------------------------------------------------------------


def prune(
    gm: nn.Module,
    scores: Scores,
    density: float,
    *,
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> None:
    """Set the masks so that exactly ``round(density * n)`` weights stay, the highest scores.

    ``scores`` maps each masked layer to a tensor of its weight's shape. ``layers`` limits
    the pool to some masked layers (default: all); see the module docs for ``scope``,
    ``keep_classifier``, ties and already masked-out weights.
    """
    _check_density(density)
    pools = _pools(gm, scope, keep_classifier, layers)
    masks = get_masks(gm)
    for pool in pools:
        n = sum(masks[name].numel() for name in pool)
        _keep_top(gm, scores, pool, round(density * n), clamp=False)


def _pools(
    gm: nn.Module, scope: Scope, keep_classifier: bool, layers: Iterable[str] | None
) -> list[list[str]]:
    if scope not in ("global", "layer"):
        raise RewriterError(f"scope must be 'global' or 'layer', got {scope!r}")
    pool = _prunable(gm, keep_classifier, layers)
    return [pool] if scope == "global" else [[name] for name in pool]


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise RewriterError(f"density must be in [0, 1] (the fraction kept), got {density}")


def _keep_top(gm: nn.Module, scores: Scores, pool: Sequence[str], keep: int, clamp: bool) -> None:
    """Keep the ``keep`` live weights of ``pool`` with the highest scores (ties: first)."""
    masks = get_masks(gm)
    for name in pool:
        if name not in scores:
            raise RewriterError(f"no score for masked layer {name!r}")
        if tuple(scores[name].shape) != tuple(masks[name].shape):
            raise RewriterError(
                f"scores for {name!r} have shape {tuple(scores[name].shape)}, "
                f"the weight has {tuple(masks[name].shape)}"
            )
    device = masks[pool[0]].device
    flat = torch.cat([scores[n].detach().flatten().to(device, torch.float64) for n in pool])
    live = torch.cat([masks[n].detach().flatten().to(device) != 0 for n in pool])
    if torch.isnan(flat[live]).any():
        raise RewriterError(f"scores of layers {list(pool)} contain NaN")
    n_live = int(live.sum())
    if keep > n_live:
        if not clamp:
            raise RewriterError(
                f"cannot keep {keep} weights of {list(pool) if len(pool) < 4 else 'the pool'}: "
                f"only {n_live} of {live.numel()} are still live, and pruning never revives "
                "masked-out weights (ask for a density at or below the current one)"
            )
        keep = n_live
    kept = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    live_idx = torch.nonzero(live).flatten()
    kept[live_idx[_top(flat[live_idx], keep)]] = True
    offset = 0
    for name in pool:
        size = masks[name].numel()
        set_mask(gm, name, kept[offset : offset + size].view(masks[name].shape))
        offset += size


def _top(values: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest values; among values tied at the cut, the first."""
    n = values.numel()
    if k >= n or k <= 0:
        return torch.full((n,), k > 0, dtype=torch.bool, device=values.device)
    cut = torch.kthvalue(values, n - k + 1).values  # the k-th largest value
    chosen = values > cut
    tied = torch.nonzero(values == cut).flatten()
    chosen[tied[: k - int(chosen.sum())]] = True
    return chosen


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def magnitude_scores(gm: nn.Module) -> Scores:
    """``|w|`` for every masked weight."""
    return {name: layer.weight.detach().abs() for name, layer in masked_layers(gm).items()}


def random_scores(gm: nn.Module, seed: int = 0) -> Scores:
    """Uniform random scores from a generator seeded with ``seed`` (one stream, layer order)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(layer.weight.shape, generator=gen).to(layer.weight.device)
        for name, layer in masked_layers(gm).items()
    }


def snip_scores(
    gm: nn.Module,
    data: Iterable[Batch],
    *,
    loss_fn: LossFn = F.cross_entropy,
    mode: Mode = "eval",
) -> Scores:
    """SNIP: ``|g * w|`` with ``g`` the loss gradient summed over ``data``'s batches.

    ``data`` yields ``(inputs, targets)``; ``inputs`` is a tensor or a tuple of tensors.
    ``mode`` is the BatchNorm mode while scoring (see the module docs).
    """
    layers = masked_layers(gm)
    weights = [layer.weight for layer in layers.values()]
    batches = _batches(data, "snip")
    with _scoring(gm, train=_train(mode)):
        grads = [torch.zeros_like(w) for w in weights]
        for inputs, target in batches:
            loss = loss_fn(_call(gm, inputs), target)
            for total, g in zip(grads, _grad(loss, weights), strict=True):
                total += g
    return {name: (g * w).detach().abs() for name, g, w in zip(layers, grads, weights, strict=True)}


def grasp_scores(
    gm: nn.Module,
    data: Iterable[Batch],
    *,
    loss_fn: LossFn = F.cross_entropy,
    temperature: float = 200.0,
    mode: Mode = "eval",
) -> Scores:
    """GraSP: ``w * Hg`` with the outputs divided by ``temperature`` (keep the highest).

    ``g`` is the gradient summed over the batches, treated as a constant; ``Hg`` is the
    gradient of ``sum_b g_b . g`` (double backprop), ``g_b`` the gradient of batch ``b``.
    Sign: this is Synaptic-Flow's score, which removes the *lowest* values; GraSP's paper
    scores ``-w * Hg`` and removes the *highest*, the same weights. ``mode="train"``
    scores with BatchNorm batch statistics, as GraSP's reference code (default ``"eval"``).
    ``scaled_dot_product_attention`` runs its math kernel while scoring: the fused
    kernels (flash attention on the CPU) cannot be differentiated twice.
    """
    layers = masked_layers(gm)
    weights = [layer.weight for layer in layers.values()]
    batches = _batches(data, "grasp")

    def loss_of(inputs: Any, target: Tensor) -> Tensor:
        out = tree_map(lambda t: t / temperature if isinstance(t, Tensor) else t, _call(gm, inputs))
        return loss_fn(out, target)

    # the fused attention kernels have no second derivative; the math kernel has
    with _scoring(gm, train=_train(mode)), sdpa_kernel(SDPBackend.MATH):
        stopped = [torch.zeros_like(w) for w in weights]
        for inputs, target in batches:
            for total, g in zip(stopped, _grad(loss_of(inputs, target), weights), strict=True):
                total += g
        hg = [torch.zeros_like(w) for w in weights]
        for inputs, target in batches:
            grads = _grad(loss_of(inputs, target), weights, create_graph=True)
            z = sum((g * s).sum() for g, s in zip(grads, stopped, strict=True))
            for total, h in zip(hg, _grad(z, weights), strict=True):
                total += h
    return {name: (w * h).detach() for name, w, h in zip(layers, weights, hg, strict=True)}


def synflow_scores(gm: nn.Module, inputs: Sequence[Tensor] | None = None) -> Scores:
    """One SynFlow scoring at the current masks: ``|w * dR/dw|`` on the absolute network.

    ``inputs`` are example inputs (only their shapes and dtypes are used); by default the
    shapes recorded on the graph's placeholders by :func:`rewriter.rewrite`.
    """
    ones = _ones_like_inputs(gm, inputs)
    with _scoring(gm, train=False, absolute=True):
        return _synflow_once(gm, ones, _runs_in_float64(gm, ones))


def _runs_in_float64(gm: nn.Module, ones: Sequence[Tensor]) -> bool:
    """Whether SynFlow can score ``gm`` in float64: its graph asserts no other floating
    dtype and a float64 forward on ``ones`` runs (casts to float32 that meet float64
    weights in a matmul make it fail; that error recurs in the model's dtype if it is
    not about dtypes)."""
    if pins_float_dtype(gm):
        return False
    try:
        with in_float64(gm), torch.no_grad():
            gm(*[t.double() if t.is_floating_point() else t for t in ones])
    except (RuntimeError, TypeError):
        return False
    return True


def _synflow_once(gm: nn.Module, ones: Sequence[Tensor], wide: bool) -> Scores:
    """Scores computed in float64 (``wide``), as the paper does (the model's tensors are
    converted for the call and restored to their dtype; masks set afterwards keep the
    model's dtype), else in the model's dtype (see :func:`_runs_in_float64`)."""
    layers = masked_layers(gm)
    with in_float64(gm) if wide else nullcontext():
        weights = [layer.weight for layer in layers.values()]
        signal = [t.double() if wide and t.is_floating_point() else t for t in ones]
        leaves, _ = tree_flatten(gm(*signal))
        batch = ones[0].shape[0] if ones and ones[0].dim() else 1
        total = sum(t.sum() for t in leaves if isinstance(t, Tensor)) / batch
        grads = _grad(total, weights)
        scores = {
            name: (w * g).detach().abs() for name, w, g in zip(layers, weights, grads, strict=True)
        }
    if not all(torch.isfinite(s).all() for s in scores.values()):
        if not wide:
            where = "(scored in the model's dtype: the graph cannot run in float64)"
        elif narrowing_casts(gm):
            where = (
                f"in float64 ({narrowing_casts(gm)} casts in the graph to a narrower floating "
                "dtype, e.g. an RMSNorm computing in float32, limit the range where they are)"
            )
        else:
            where = "even in float64"
        raise RewriterError(
            f"SynFlow scores overflowed {where} (the all-ones signal through the "
            "absolute-valued network is too large)"
        )
    return scores


_CASTS = {"to", "_to_copy", "type"}
_NARROWING = {"float", "half", "bfloat16"}


def _narrower(value: Any) -> bool:
    return isinstance(value, torch.dtype) and value.is_floating_point and value != torch.float64


def _op_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").split(".")[0]
    return None


def pins_float_dtype(gm: nn.Module) -> bool:
    """Whether ``gm``'s graph asserts a floating dtype other than float64 (export's
    ``aten._assert_tensor_metadata``, left in graphs of ``ExportedProgram.module()``;
    :func:`rewriter.lift.lift` drops them), so that it cannot run on float64 copies.

    Casts (``aten.to(x, torch.float32)``, ``x.float()``, counted by
    :func:`narrowing_casts`) do not pin: they are the model's semantics and limit
    precision only where they are (Llama's RMSNorm computes in float32). A graph whose
    casts make a float64 run fail is found by running it (SynFlow then scores in the
    model's dtype)."""
    if not isinstance(gm, fx.GraphModule):
        return False
    return any(
        _op_name(node) == "_assert_tensor_metadata"
        and any(_narrower(v) for v in (*node.args, *node.kwargs.values()))
        for node in gm.graph.nodes
    )


def narrowing_casts(gm: nn.Module) -> int:
    """How many casts to a floating dtype other than float64 ``gm``'s graph makes
    (``aten.to``/``_to_copy``/``type`` with such a dtype, ``x.float()``, ``x.half()``,
    ``x.bfloat16()``). Creation ops with a dtype (``zeros``) promote and do not count."""
    if not isinstance(gm, fx.GraphModule):
        return 0
    count = 0
    for node in gm.graph.nodes:
        name = _op_name(node)
        if node.op == "call_method" and name in _NARROWING:
            count += 1
        elif name in _CASTS and any(_narrower(v) for v in (*node.args, *node.kwargs.values())):
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# Criteria: score and prune in one call
# --------------------------------------------------------------------------------------------


def magnitude(
    gm: nn.Module,
    density: float,
    *,
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> None:
    """Keep the ``density`` fraction of prunable weights with the largest ``|w|``."""
    prune(
        gm,
        magnitude_scores(gm),
        density,
        scope=scope,
        keep_classifier=keep_classifier,
        layers=layers,
    )


def random_prune(
    gm: nn.Module,
    density: float,
    *,
    seed: int = 0,
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> None:
    """Keep a uniformly random ``density`` fraction of the prunable weights (seeded)."""
    scores = random_scores(gm, seed)
    prune(gm, scores, density, scope=scope, keep_classifier=keep_classifier, layers=layers)


def snip(
    gm: nn.Module,
    data: Iterable[Batch],
    density: float,
    *,
    loss_fn: LossFn = F.cross_entropy,
    mode: Mode = "eval",
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> None:
    """One-shot SNIP: keep the weights with the largest ``|g * w|`` over ``data``."""
    scores = snip_scores(gm, data, loss_fn=loss_fn, mode=mode)
    prune(gm, scores, density, scope=scope, keep_classifier=keep_classifier, layers=layers)


def grasp(
    gm: nn.Module,
    data: Iterable[Batch],
    density: float,
    *,
    loss_fn: LossFn = F.cross_entropy,
    temperature: float = 200.0,
    mode: Mode = "eval",
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> None:
    """One-shot GraSP: keep the weights with the highest ``w * Hg`` (see the module docs)."""
    scores = grasp_scores(gm, data, loss_fn=loss_fn, temperature=temperature, mode=mode)
    prune(gm, scores, density, scope=scope, keep_classifier=keep_classifier, layers=layers)


def synflow(
    gm: nn.Module,
    density: float,
    *,
    iterations: int = 100,
    inputs: Sequence[Tensor] | None = None,
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> None:
    """Iterative SynFlow: ``iterations`` rounds of scoring, keeping ``density ** (k / iterations)``.

    Data-free. The model's parameters, buffers, gradients and modes are restored exactly;
    only the masks change.
    """
    _check_density(density)
    if iterations < 1:
        raise RewriterError(f"iterations must be at least 1, got {iterations}")
    pools = _pools(gm, scope, keep_classifier, layers)
    masks = get_masks(gm)
    sizes = [sum(masks[name].numel() for name in pool) for pool in pools]
    for pool, n in zip(pools, sizes, strict=True):
        live = sum(int((masks[name] != 0).sum()) for name in pool)
        if round(density * n) > live:
            raise RewriterError(
                f"density {density} is above the current density {live / n:.4f}; "
                "pruning never revives masked-out weights"
            )
    ones = _ones_like_inputs(gm, inputs)
    with _scoring(gm, train=False, absolute=True):
        wide = _runs_in_float64(gm, ones)
        for k in range(1, iterations + 1):
            scores = _synflow_once(gm, ones, wide)
            for pool, n in zip(pools, sizes, strict=True):
                _keep_top(gm, scores, pool, round(density ** (k / iterations) * n), clamp=True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@contextmanager
def _scoring(gm: nn.Module, *, train: bool, absolute: bool = False) -> Iterator[None]:
    """Score in the given mode; every parameter, buffer (masks excepted) and mode restored.

    With ``absolute``, floating-point parameters and buffers are replaced by their
    absolute values for the duration (SynFlow's linearisation).
    """
    modes = {m: m.training for m in gm.modules()}
    state = [
        (name, t)
        for name, t in list(gm.named_parameters()) + list(gm.named_buffers())
        if name.rpartition(".")[2] != MASK
    ]
    saved = [t.detach().clone() for _, t in state]
    gm.train(train)
    try:
        if absolute:
            with torch.no_grad():
                for _, t in state:
                    if t.is_floating_point():
                        t.abs_()
        yield
    finally:
        with torch.no_grad():
            for (_, t), value in zip(state, saved, strict=True):
                t.copy_(value)
        for module, mode in modes.items():
            module.training = mode


def _train(mode: str) -> bool:
    if mode not in ("eval", "train"):
        raise RewriterError(f"mode must be 'eval' or 'train', got {mode!r}")
    return mode == "train"


def _grad(output: Tensor, weights: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(output, weights, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights, strict=True)]


def _call(gm: nn.Module, inputs: Any) -> Any:
    return gm(*inputs) if isinstance(inputs, (tuple, list)) else gm(inputs)


def _batches(data: Iterable[Batch], criterion: str) -> list[Batch]:
    batches = list(data)
    if not batches:
        raise RewriterError(f"{criterion} needs at least one (inputs, targets) batch; got none")
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise RewriterError(
                f"{criterion}: every batch must be an (inputs, targets) pair, got {type(b).__name__}"
            )
    return batches


def _ones_like_inputs(gm: nn.Module, inputs: Sequence[Tensor] | None) -> list[Tensor]:
    """All-ones inputs shaped like ``inputs`` or the graph's placeholders (batch included).

    They are created on the model's device and, for floating inputs, in its dtype.
    """
    device, dtype = model_placement(gm)  # the model's device and dtype, not the trace's
    if inputs is not None:
        if isinstance(inputs, Tensor):
            inputs = (inputs,)
        return [
            torch.ones(
                tuple(t.shape),
                dtype=dtype if t.dtype.is_floating_point and dtype is not None else t.dtype,
                device=device,
            )
            for t in inputs
        ]
    metas = []
    if isinstance(gm, fx.GraphModule):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        while placeholders and placeholders[-1].args:
            if placeholders[-1].meta.get("tensor_meta", 0) is not None:
                break
            placeholders.pop()  # an optional argument left at its non-tensor default
        metas = [n.meta.get("tensor_meta") for n in placeholders]
    if not metas or any(m is None or not hasattr(m, "shape") for m in metas):
        raise RewriterError(
            "SynFlow needs the input shape: pass inputs=(example,) or rewrite the model with "
            "example inputs (rewriter.rewrite(model, passes, example_inputs))"
        )
    return [
        torch.ones(
            tuple(m.shape),
            dtype=dtype if m.dtype.is_floating_point and dtype is not None else m.dtype,
            device=device,
        )
        for m in metas
    ]
