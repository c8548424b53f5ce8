"""Front ends: how a model becomes the GraphModule the passes rewrite.

``fx``: :func:`rewriter.trace` (``torch.fx`` symbolic tracing; submodules it cannot
follow become opaque leaves). ``export``: ``torch.export.export`` then
:func:`rewriter.lift` (aten calls lifted back to ``nn.Linear``, ``nn.LayerNorm``,
``nn.Embedding``, ``nn.Dropout``... under their original names), for models fx cannot
trace, such as Hugging Face transformers (which dropped their own fx support in v5).
``auto`` (the default) uses ``export`` for Hugging Face ``PreTrainedModel`` instances and
for models whose own ``forward`` fx cannot trace, and ``fx`` otherwise.

Example inputs may be a tensor, a tuple of positional tensors, or a dict of keyword
tensors (``{"input_ids": ..., "attention_mask": ...}``); they are turned into the
positional inputs of the resulting graph (for ``export``: the exported program's input
order; for ``fx``: the order of ``forward``'s parameters, skipped ones filled with
their defaults).

Where the export front end deviates from the source model (all documented, all tested):

* Hugging Face GPT-2's ``Conv1D`` (a linear layer storing its weight transposed, as
  ``(in, out)``) is replaced by an ``nn.Linear`` before export, so it is a linear layer
  to every pass; its ``weight`` is stored as ``(out, in)`` under the same name. Outputs
  agree to float rounding (``addmm`` and ``linear`` sum in different orders).
* Hugging Face models are exported with ``config.use_cache = False`` (a key/value cache
  object is not a tensor output) and in eval mode; the lifted model is then put in the
  source model's mode, so ``nn.Dropout`` layers train again after ``.train()``. Dropout
  *inside* ``scaled_dot_product_attention`` is fixed at export (``dropout_p=0`` in eval
  mode) and stays off: attention-probability dropout is not applied in training.
* With ``dynamic=True`` (the default) dim 0 of every input and dim 1 of integer inputs
  (token ids, attention masks) are exported as ``Dim.AUTO``: the graph accepts other
  batch sizes and sequence lengths where the model allows; sizes the model fixes (image
  size, channels) are specialised by export.
* A model output that is a ``ModelOutput`` comes back as a ``dict`` of its tensor fields.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import OptionError, RewriterError, TraceError
from .lift import lift
from .tracing import trace

FRONTENDS = ("auto", "fx", "export")
FRONTEND_KEY = "rewriter_frontend"

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any] | None


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (checked without importing it)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(model).__mro__
    )


def frontend_of(gm: nn.Module) -> str | None:
    """The front end that produced ``gm`` (``"fx"`` or ``"export"``), if recorded."""
    return getattr(gm, "meta", {}).get(FRONTEND_KEY)


def split_inputs(example_inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``example_inputs`` as ``(args, kwargs)``; ``None`` stays ``None``."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise RewriterError(f"keyword example inputs need string keys, got {bad!r}")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (str, bytes)) or not isinstance(example_inputs, Iterable):
        raise RewriterError(
            "example inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, "
            f"got {type(example_inputs).__name__}"
        )
    return tuple(example_inputs), {}


def positional(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``forward``'s arguments in parameter order (for a traced graph's placeholders).

    Parameters before the last given one that were not given take their defaults.
    """
    if not kwargs:
        return args
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise RewriterError(
            f"the example inputs do not fit {type(model).__name__}.forward: {exc}"
        ) from exc
    params = list(inspect.signature(model.forward).parameters.values())
    last = max(i for i, p in enumerate(params) if p.name in bound.arguments)
    out = []
    for p in params[: last + 1]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise RewriterError(
                f"{type(model).__name__}.forward takes *args/**kwargs: give positional "
                "example inputs for the fx front end, or use frontend='export'"
            )
        if p.name in bound.arguments:
            out.append(bound.arguments[p.name])
        elif p.default is not p.empty:
            out.append(p.default)
        else:
            raise RewriterError(f"example inputs give no value for {p.name!r}")
    return tuple(out)


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace Hugging Face ``Conv1D`` layers (transposed linears) by ``nn.Linear``, in place.

    Returns the names replaced. The ``weight`` becomes ``(out, in)``; ``bias`` is kept.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        cls = type(module)
        if cls.__name__ != "Conv1D" or not cls.__module__.startswith("transformers."):
            continue
        weight = module.weight
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        linear.train(module.training)
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).add_module(leaf, linear)
        replaced.append(name)
    return replaced


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: Dim.AUTO}
        if x.dim() >= 2 and not (x.dtype.is_floating_point or x.dtype.is_complex):
            dims[1] = Dim.AUTO  # token ids / masks: the sequence length
        return dims

    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError as exc:
        raise RewriterError(
            f"the example inputs do not fit {type(model).__name__}.forward: {exc}"
        ) from exc
    return {name: spec(value) for name, value in bound.items()}


_RESHAPES = {"view", "reshape"}


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPES
    return node.op == "call_function" and node.target in (
        torch.reshape,
        torch.ops.aten.view.default,
        torch.ops.aten.reshape.default,
    )


def _is_expand(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "expand") or (
        node.op == "call_function" and node.target is torch.ops.aten.expand.default
    )


def free_head_counts(gm: fx.GraphModule, inputs: Sequence[Any]) -> int:
    """Write ``-1`` for sizes an exported program fixed, where ``-1`` means the same; in place.

    ``expand(x, [B, 2, 2, S, D])`` keeps ``x``'s own sizes as ``-1``; a ``view``/``reshape``
    without ``-1`` that merges several dims into one (``[B, 2, 2, S, D] -> [B, 4, S, D]``,
    Hugging Face's ``repeat_kv``) gets ``-1`` there. Both are exact (same op, same result
    shape), and both let the sizes follow heads removed by :func:`rewriter.slim`. Runs shape
    propagation on ``inputs``; returns the number of nodes changed.
    """
    from .analysis.rules_structure import reshape_groups
    from .manager import _propagate_shapes

    _propagate_shapes(gm, tuple(inputs))
    changed = 0
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        shape_in = _shape(src)
        shape_out = _shape(node)
        if shape_in is None or shape_out is None:
            continue
        if _is_expand(node):
            sizes = _sizes(node)
            new = len(sizes) - len(shape_in)
            if new < 0 or len(sizes) != len(shape_out):
                continue
            fixed = [
                -1 if k >= new and type(v) is int and v == shape_in[k - new] else v
                for k, v in enumerate(sizes)
            ]
            if fixed != sizes:
                _set_sizes(node, fixed)
                changed += 1
        elif _is_reshape(node):
            sizes = _sizes(node)
            if -1 in sizes or len(sizes) != len(shape_out):
                continue
            merges = [
                b_lo
                for a_lo, a_hi, b_lo, b_hi in reshape_groups(shape_in, shape_out) or ()
                if b_hi - b_lo == 1 and sum(shape_in[k] != 1 for k in range(a_lo, a_hi)) > 1
            ]
            if len(merges) == 1 and type(sizes[merges[0]]) is int:
                fixed = list(sizes)
                fixed[merges[0]] = -1
                _set_sizes(node, fixed)
                changed += 1
    if changed:
        gm.recompile()
    return changed


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _sizes(node: fx.Node) -> list[Any]:
    if node.op == "call_method":
        raw = list(node.args[1:])
        return list(raw[0]) if len(raw) == 1 and isinstance(raw[0], (list, tuple)) else raw
    return list(node.args[1])


def _set_sizes(node: fx.Node, sizes: list[Any]) -> None:
    if node.op == "call_method":
        node.args = (node.args[0], *sizes)
    else:
        node.args = (node.args[0], sizes, *node.args[2:])


def export_graph(
    model: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: bool = True,
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Export a copy of ``model`` with ``torch.export`` and lift it; ``model`` is untouched.

    Returns the lifted GraphModule and the example inputs in its placeholder order.
    Raises :class:`TraceError` when export fails (the reason is the first line of
    torch's message) and :class:`~rewriter.lift.LiftError` when the program cannot be
    lifted. See the module docstring for the deviations from the source model.
    """
    kwargs = dict(kwargs or {})
    for key, value in [*enumerate(args), *kwargs.items()]:
        if not isinstance(value, torch.Tensor):
            raise RewriterError(
                f"example input {key!r} is a {type(value).__name__}; the export front end "
                "takes tensors only (give options through the model or its config)"
            )
    work = copy.deepcopy(model)
    replaced = linearize_conv1d(work)
    config = getattr(work, "config", None)
    if is_hf_model(work) and getattr(config, "use_cache", False):
        config.use_cache = False
    training = work.training
    work.eval()
    shapes = _dynamic_shapes(work, args, kwargs) if dynamic else None
    try:
        ep = torch.export.export(work, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(
            f"torch.export could not export {type(model).__name__}: "
            f"{type(exc).__name__}: {first}"
        ) from exc
    gm = lift(ep)
    gm.train(training)
    from torch.export._tree_utils import reorder_kwargs

    ordered = reorder_kwargs(kwargs, ep.call_spec.in_spec) if kwargs else {}
    inputs = tuple(pytree.tree_leaves((tuple(args), ordered)))
    free_head_counts(gm, inputs)
    gm.meta[FRONTEND_KEY] = "export"
    gm.meta["rewriter_linearized"] = replaced
    source = getattr(model, "rewriter_source", None)
    if source is not None:
        gm.meta["rewriter_source"] = source
    return gm, inputs


def build_graph(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    frontend: str = "auto",
    leaves: Iterable[str | type[nn.Module]] = (),
) -> tuple[fx.GraphModule, tuple[Any, ...] | None]:
    """The GraphModule of ``model`` from the chosen front end, and positional example inputs.

    ``frontend="auto"`` exports Hugging Face models and models whose own forward fx
    cannot trace (it needs example inputs for that), and traces everything else.
    ``model`` is not mutated.
    """
    if frontend not in FRONTENDS:
        raise OptionError(f"unknown front end {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    split = split_inputs(example_inputs)
    leaves = list(leaves)
    if frontend == "auto" and split is None and is_hf_model(model):
        raise RewriterError(
            f"{type(model).__name__} is a Hugging Face model: torch.fx cannot trace it, and the "
            "export front end needs example inputs (a dict of keyword tensors such as "
            "{'input_ids': ..., 'attention_mask': ...})"
        )
    if frontend == "export" or (frontend == "auto" and is_hf_model(model) and split):
        if split is None:
            raise RewriterError(
                "the export front end needs example inputs (a tuple of tensors or a dict of "
                "keyword tensors such as {'input_ids': ..., 'attention_mask': ...})"
            )
        if leaves:
            raise OptionError("leaves=[...] applies to the fx front end only")
        return export_graph(model, *split)
    try:
        gm = trace(model, leaves=leaves)
    except TraceError as exc:
        if frontend == "fx" or split is None or leaves:
            raise
        try:
            return export_graph(model, *split)
        except RewriterError as export_exc:
            raise TraceError(
                f"{exc}\n  The export front end failed as well: {export_exc}"
            ) from exc
    gm.meta[FRONTEND_KEY] = "fx"
    return gm, None if split is None else positional(model, *split)


def save_hf_folder(gm: nn.Module, model: nn.Module, path: str | Path) -> Path:
    """Write a slim Llama-family graph as a Hugging Face folder (``config.json`` +
    ``model.safetensors``) that ``from_pretrained`` reads without rewriter.

    ``gm`` is the (slimmed) result of the export front end for ``model``, a Hugging Face
    model whose config has ``num_key_value_heads`` and ``head_dim`` (Llama, Mistral,
    Qwen2...). The config gets the slim widths (``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``); they must be the same in every
    layer (Hugging Face configs have one value for all layers), else
    :class:`RewriterError`. Masked layers are written with their effective weights
    (``weight * weight_mask``); state-dict names are the model's own.
    """
    import safetensors.torch

    config = copy.deepcopy(getattr(model, "config", None))
    if config is None or not is_hf_model(model) or not hasattr(config, "num_key_value_heads"):
        raise RewriterError(
            "save_hf_folder() writes Llama-family Hugging Face models (configs with "
            f"num_key_value_heads and head_dim); got {type(model).__name__}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths: dict[str, set[int]] = {"q": set(), "k": set(), "mlp": set()}
    for name, module in gm.named_modules():
        if isinstance(module, nn.Linear):
            for key, suffix in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"),
                                ("mlp", "mlp.up_proj")):  # fmt: skip
                if name.endswith(suffix):
                    widths[key].add(module.out_features)
    if any(len(v) != 1 for v in widths.values()):
        raise RewriterError(
            "save_hf_folder() needs the same width in every layer (a Hugging Face config has one "
            f"value for all layers); found q_proj {sorted(widths['q'])}, k_proj "
            f"{sorted(widths['k'])}, up_proj {sorted(widths['mlp'])} output widths"
        )
    config.num_attention_heads = widths["q"].pop() // head_dim
    config.num_key_value_heads = widths["k"].pop() // head_dim
    config.head_dim = head_dim
    config.intermediate_size = widths["mlp"].pop()
    state: dict[str, torch.Tensor] = {}
    own = set(model.state_dict())
    for name, tensor in gm.state_dict().items():
        if name.endswith(".weight_mask"):
            continue
        mask = gm.state_dict().get(name.removesuffix("weight") + "weight_mask")
        value = tensor * mask if name.endswith(".weight") and mask is not None else tensor
        if name in own:
            state[name] = value.detach().contiguous().clone()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(folder / "config.json"))
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


__all__ = [
    "FRONTENDS",
    "build_graph",
    "export_graph",
    "free_head_counts",
    "frontend_of",
    "is_hf_model",
    "linearize_conv1d",
    "positional",
    "save_hf_folder",
    "split_inputs",
]
