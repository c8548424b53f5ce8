"""A ``networkx.DiGraph`` view of a ``torch.fx`` graph.

``graph(gm)`` has one node per fx node, keyed by the fx node's name, and one edge
``u -> v`` per data dependency (``v`` reads ``u``'s value). Every graph algorithm
of the project (dominators, reachability, components, topological orders) runs
on this view rather than on hand-written traversals of ``fx.Graph``.

Node attributes:

* ``op``: the fx opcode (``placeholder``, ``call_module``, ``call_function``,
  ``call_method``, ``get_attr``, ``output``);
* ``target``: the fx target (a qualified name for modules and attributes, a
  method name, or the called function);
* ``module_class``: the class name of the called module for ``call_module``
  nodes, else ``None``;
* ``shape``: the output shape recorded by shape propagation
  (``node.meta["tensor_meta"]``) as a tuple of ints, a tuple of such tuples for
  multi-output nodes (``split``, ``chunk``), or ``None`` when shapes were not
  propagated or the value is not a tensor;
* ``fx_node``: the ``fx.Node`` itself.

Edge attributes: ``arg_index``, the position of the first use of ``u`` among
``v``'s flattened positional then keyword arguments, and ``arg_indices``, every
such position (``x + x`` reads ``x`` twice).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_flatten

__all__ = ["graph", "node_shape"]


def node_shape(node: fx.Node) -> Any:
    """The shape of ``node``'s value from ``tensor_meta``: a tuple, nested tuples, or None."""
    return _shape(node.meta.get("tensor_meta"))


def _shape(meta: Any) -> Any:
    if meta is None:
        return None
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_shape(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _shape(v) for k, v in meta.items()}
    return None


def graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph of ``gm`` as a ``networkx.DiGraph`` (see the module docs)."""
    view = nx.DiGraph()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        module_class = None
        if node.op == "call_module":
            module = modules.get(str(node.target))
            module_class = type(module).__name__ if module is not None else None
        view.add_node(
            node.name,
            op=node.op,
            target=node.target,
            module_class=module_class,
            shape=node_shape(node),
            fx_node=node,
        )
        flat, _ = tree_flatten((node.args, node.kwargs))
        for index, arg in enumerate(flat):
            if not isinstance(arg, fx.Node):
                continue
            if view.has_edge(arg.name, node.name):
                view.edges[arg.name, node.name]["arg_indices"].append(index)
            else:
                view.add_edge(arg.name, node.name, arg_index=index, arg_indices=[index])
    return view
