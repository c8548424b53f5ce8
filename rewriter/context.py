"""The context a pass and its builders work through.

Builders never touch ``gm`` directly to add modules: :meth:`RewriteContext.add_module`
derives a unique, predictable name from the node being rewritten
(``layer1.0.bn1`` -> ``layer1_0_bn1_gate``) and refuses a module that would share
a parameter with one already in the graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .errors import RewriterError
from .patterns import Match, Rule, as_rule


class RuleLoopError(RewriterError):
    """A rule kept firing on its own output until the step cap."""

    def __init__(self, rule: str, node: str, cap: int) -> None:
        self.rule = rule
        self.node = node
        super().__init__(
            f"rule {rule!r} fired {cap} times without reaching a fixed point (step cap); "
            "it probably matches its own output. Make its builder return None when the "
            "node was already rewritten."
        )


class RewriteContext:
    """Everything a pass's builders may use to change the graph."""

    def __init__(self, gm: fx.GraphModule, pass_name: str) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.pass_name = pass_name
        self.matches: Counter[str] = Counter()
        self.modules_added: list[str] = []
        self.modules_replaced: list[str] = []
        self.current_node: str | None = None
        self.current_rule: str | None = None
        self.notes: list[str] = []
        self._tensor_ids: Counter[int] | None = None  # tensor id -> names holding it

    # -- modules ---------------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        if node.op != "call_module":
            raise RewriterError(f"node {node.name!r} is {node.op}, not call_module")
        return self.gm.get_submodule(str(node.target))

    def add_module(self, near: fx.Node | str, suffix: str, module: nn.Module) -> str:
        """Register ``module`` under a name derived from ``near`` and return the name.

        The name is ``<qualified name with dots as underscores>_<suffix>``, with
        ``_1``, ``_2``... appended only if that name is taken.
        """
        base = near if isinstance(near, str) else _node_label(near)
        stem = f"{base.replace('.', '_')}_{suffix}"
        name, i = stem, 0
        while _exists(self.gm, name):
            i += 1
            name = f"{stem}_{i}"
        self._check_no_sharing(module)
        module.train(self.gm.training)
        self.gm.add_submodule(name, module)
        self.modules_added.append(name)
        return name

    def replace_module(self, node: fx.Node, module: nn.Module) -> fx.Node:
        """Swap the module a ``call_module`` node calls, keeping its qualified name."""
        target = str(node.target)
        parent_name, _, attr = target.rpartition(".")
        parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
        old = getattr(parent, attr)
        if module is not old:
            self._check_no_sharing(module, replacing=old)
        setattr(parent, attr, module)
        self.modules_replaced.append(target)
        return node

    def call_module(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.Node:
        """Insert a ``call_module`` node at the current insertion point."""
        return self.graph.call_module(name, args, kwargs or {})

    def note(self, message: str) -> None:
        """Record a remark for the pass report (e.g. a layer skipped and why)."""
        self.notes.append(message)

    def _check_no_sharing(self, module: nn.Module, replacing: nn.Module | None = None) -> None:
        if self._tensor_ids is None:
            self._tensor_ids = Counter(id(t) for _, t in _tensors(self.gm))
        if replacing is not None:
            self._tensor_ids.subtract(id(t) for _, t in _tensors(replacing))
        shared = [n for n, t in _tensors(module) if self._tensor_ids[id(t)] > 0]
        self._tensor_ids.update(id(t) for _, t in _tensors(module))
        if shared:
            raise RewriterError(
                f"a new module would share tensors {shared} with the graph; "
                "builders must create fresh parameters for every match"
            )

    # -- rules -----------------------------------------------------------
    def apply_rules(self, rules: Iterable[Rule | tuple], max_steps: int | None = None) -> None:
        """Apply a rule table to every node, including nodes the rules insert.

        Each rule is tried on each node in graph order; the first rule that
        returns a node wins for that node. A builder is called with the insertion
        point set right after the matched node; it returns the node that replaces
        the match (uses are rewired to it), the matched node itself (an in-place
        change such as a module swap), or ``None`` (does not apply).
        """
        table = [as_rule(r) for r in rules]
        if not table:
            return
        cap = max_steps if max_steps is not None else len(self.graph.nodes) * len(table) + 16
        steps = 0
        pending: list[fx.Node] = list(self.graph.nodes)
        seen: set[fx.Node] = set()
        while pending:
            for node in pending:
                seen.add(node)
                if node.graph is not self.graph or getattr(node, "_erased", False):
                    continue
                for rule in table:
                    if self._try(rule, node):
                        steps += 1
                        if steps > cap:
                            raise RuleLoopError(rule.label, node.name, cap)
                        break
            pending = [n for n in self.graph.nodes if n not in seen]
        self.current_node = self.current_rule = None

    def _try(self, rule: Rule, node: fx.Node) -> bool:
        bound = rule.pattern.match(node, self.gm)
        if bound is None:
            return False
        self.current_node, self.current_rule = node.name, rule.label
        old_next = node.next
        with self.graph.inserting_after(node):
            result = rule.builder(self, Match(node, bound))
        created = _between(node, old_next)
        if result is None:
            if created:
                raise RewriterError(
                    f"builder of rule {rule.label!r} returned None but inserted nodes "
                    f"{[n.name for n in created]}"
                )
            return False
        if not isinstance(result, fx.Node):
            raise RewriterError(
                f"builder of rule {rule.label!r} must return an fx.Node or None, "
                f"got {type(result).__name__}"
            )
        if result is not node:
            keep = set(created)
            node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in keep)
            if not node.users and node.op not in ("placeholder", "output"):
                self.graph.erase_node(node)
        self.matches[rule.label] += 1
        return True


def _between(node: fx.Node, stop: fx.Node) -> list[fx.Node]:
    out, cur = [], node.next
    while cur is not stop and cur.op != "root":
        out.append(cur)
        cur = cur.next
    return out


def _node_label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _exists(gm: fx.GraphModule, name: str) -> bool:
    return hasattr(gm, name)


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
