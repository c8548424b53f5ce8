"""Base class of every module the library inserts into a graph, and its config protocol.

Inserted modules are always leaves of our tracer: a pass sees them as one
``call_module`` node, never as their inner ops.

**Constructor config** (used by :mod:`rewriter.graphio` to store a rewritten graph
as data). Every module the library inserts can say how to construct it again:

* ``module.rewriter_config()`` returns the keyword arguments of its constructor as
  plain data (``None``, bools, ints, floats, strings, tuples, lists, dicts of those,
  ``torch.dtype``/``torch.device``), or ``None`` when it cannot. The default reads
  them from attributes of the same name (:func:`config_from_attributes`), which is
  right for the usual ``self.x = x`` constructors and for subclasses of torch
  layers; override it when a constructor argument is not kept under its own name.
* ``Class.from_rewriter_config(config)`` builds a module from that config; the
  default is ``Class(**config)``.

Tensors never belong in the config: parameters, buffers and tensor attributes are
stored next to it and replace whatever the constructor created, and so do the
module's other plain-data attributes and its children. A config therefore only
has to be good enough to run the constructor.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_SKIPPED = frozenset({"device", "dtype"})  # placement comes from the stored tensors


def _is_data(value: Any, depth: int = 0) -> bool:
    if depth > 16:
        return False
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_data(v, depth + 1) for k, v in value.items())
    return False


def config_from_attributes(module: nn.Module) -> dict[str, Any] | None:
    """Constructor keyword arguments of ``module`` read from its attributes of the same name.

    Works for ``torch.nn`` layers and for classes whose constructor keeps its
    arguments as attributes. An argument named after a parameter or buffer (``bias``
    of ``nn.Linear``/``nn.Conv2d``/``nn.LayerNorm``) becomes ``True`` when that tensor
    exists and ``False`` when it is ``None``; an argument whose attribute holds a
    tensor is left to its default (the stored tensor replaces it anyway), and so is
    ``device``/``dtype``. Returns ``None`` when a required argument cannot be read.
    """
    params = _init_parameters(type(module))
    if params is None:
        return None
    config: dict[str, Any] = {}
    for name, param in params.items():
        if name in _SKIPPED:
            continue
        required = param.default is inspect.Parameter.empty
        if name in module._parameters or name in module._buffers:
            tensor = module._parameters.get(name, module._buffers.get(name))
            if isinstance(param.default, bool):
                config[name] = tensor is not None
            elif required:
                return None
            continue
        if name in module.__dict__:
            value = module.__dict__[name]
        elif name not in module._modules and hasattr(type(module), name):
            value = getattr(module, name)  # a property such as SkipPolicy.tasks
        else:
            if required:
                return None
            continue
        if _is_data(value):
            config[name] = value
        elif required:
            return None
    return config


def _init_parameters(cls: type) -> dict[str, inspect.Parameter] | None:
    """Named constructor parameters; ``**kwargs`` forwarded to a base class are followed."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        if "__init__" not in vars(klass):
            continue
        try:
            signature = inspect.signature(vars(klass)["__init__"])
        except (TypeError, ValueError):
            return None
        forwards = False
        for name, param in list(signature.parameters.items())[1:]:
            if param.kind == param.VAR_KEYWORD:
                forwards = True
            elif param.kind != param.VAR_POSITIONAL:
                params.setdefault(name, param)
        if not forwards:
            break
    return params


class RewriterModule(nn.Module):
    """Marker mixin for modules inserted by rewriter passes (traced as leaves).

    Subclasses follow the constructor-config protocol of this module's docstring:
    override :meth:`rewriter_config` (and, rarely, :meth:`from_rewriter_config`)
    when the constructor's arguments are not attributes of the same name.
    """

    def rewriter_config(self) -> dict[str, Any] | None:
        """Constructor keyword arguments as plain data (default: read from attributes)."""
        return config_from_attributes(self)

    @classmethod
    def from_rewriter_config(cls, config: dict[str, Any]) -> nn.Module:
        """A new module built from :meth:`rewriter_config`'s output (default: ``cls(**config)``)."""
        return cls(**config)


def is_rewriter_module(module: nn.Module) -> bool:
    return isinstance(module, RewriterModule)
