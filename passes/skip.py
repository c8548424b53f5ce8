"""Pass ``skip_gates``: AdaShare per-task select-or-skip of residual blocks (``docs/methods/adashare.md``).

Before => after, for every residual block found by
:func:`rewriter.analysis.blocks.residual_blocks` (zoo ResNets' basic and bottleneck
blocks, MobileNetV2's inverted residuals, a ViT's two residual adds per block, any
``shortcut + branch`` with an optional trailing activation)::

    out = relu(shortcut + branch(x))        =>  out = p_select * relu(shortcut + branch(x))
                                                       + p_skip * shortcut

where ``shortcut`` is the block input (identity) or the downsample path's output
(projection), and ``(p_select, p_skip)`` is row ``l`` of the active task's policy.

Names added:

* ``skip_policy`` (:class:`SkipPolicy`, one for the whole network, called once at the
  top of the graph): parameter ``skip_policy.logits`` of shape ``(tasks, blocks, 2)``,
  column 0 = select, 1 = skip, initialised to zeros (equal); buffers
  ``skip_policy.task`` (long scalar, the active task), ``skip_policy.temperature``
  (Gumbel-softmax temperature, initially 5), ``skip_policy.learned`` (``(blocks,)``,
  1 where a block learns its policy, 0 where it is forced to select: the curriculum)
  and ``skip_policy.sharing_weights`` (``(blocks,)``, the sharing loss's ``w_l``).
* ``<block>_skip`` (:class:`SkipMix`, one per block, no parameters) where ``<block>``
  is the block's module with dots as underscores (``layer1_0_skip``), or its add
  node's name for a block written at the top level. Block ``l`` is the ``l``-th add in
  graph order; ``SkipMix.index`` is ``l``.

Policy (one sample per forward, shared by the batch, as in AdaShare):

* training: soft Gumbel-softmax ``softmax((logits + g) / temperature)``, ``g`` standard
  Gumbel noise; :func:`decay_temperature` multiplies the temperature (0.965 per policy
  epoch in the paper);
* eval (``eval_policy="argmax"``, default): the hard argmax, exactly 0 or 1, with a tie
  going to *select*; ``eval_policy="softmax"``: the deterministic ``softmax(logits)``;
* blocks outside the curriculum (``learned == 0``) use exactly ``(1, 0)``.

The active task is the ``task`` buffer, set by :func:`set_task` and read with tensor
indexing, so switching tasks never recompiles a compiled model (measured: a Python
integer attribute would be guarded on and recompile once per task). ``self.training``
is a module flag, so train and eval each compile once. Every op is a tensor op: the
model compiles with ``fullgraph=True``.

Contract: with ``eval_policy="argmax"`` the equal initial logits select every block,
so eval-mode outputs are exactly the original ones and ``preserves_outputs`` holds
(the pass manager checks it). Training-mode outputs are stochastic mixes by design.
With ``eval_policy="softmax"`` eval outputs are ``0.5 * block + 0.5 * shortcut`` at
insertion and ``preserves_outputs`` is False. Running the pass on a graph that already
has skip gates raises a :class:`rewriter.RewriterError` (a second set of gates with
other options could not be honoured silently).

Training-time functions (all take the rewritten GraphModule): :func:`set_task`,
:func:`decay_temperature`, :func:`curriculum` / :func:`set_learned_blocks`,
:func:`policy_parameters`, the losses :func:`sparsity_loss`, :func:`sharing_loss` and
:func:`aux_losses` (:meth:`SkipPolicy.aux_loss` adds the same sum to
:func:`rewriter.aux_losses`), and at the
end :func:`sample_policy` / :func:`argmax_policy` and :func:`freeze`, which returns one
GraphModule per task with skipped blocks *removed* (their branch nodes and modules are
gone; the block's value is its shortcut) and selected blocks without the mix. ``freeze``
runs the second pass of this module, ``skip_freeze`` (:class:`SkipFreeze`, options
``select`` and ``task``), so each frozen graph's pipeline records its policy and
:func:`rewriter.save` / :func:`rewriter.load` round-trip it.

Choices where the paper leaves room:

* sparsity loss (``sparsity_mean="all"``, default): ``sum_k (1 / L) sum_{l learned}
  CE(logits[k, l], skip)``, i.e. per task the mean over all ``L`` blocks with the blocks
  the curriculum forces to select counting 0: they are not pushed towards skip before
  they can learn, and the push per block stays the same as the curriculum grows.
  ``sparsity_mean="learned"`` is the authors' code: the mean over the *learned* blocks
  only, ``sum_k (1 / |learned|) sum_{l learned} CE``, which pushes each learned block
  ``L / |learned|`` times harder while the curriculum is partial (1.5x with 2 of 3
  blocks learned; the first block to enter the curriculum, alone, ``L`` times) and
  equals the default once every block learns. We keep the constant push as the default
  so that one ``sparsity_weight`` means the same thing at every stage of the curriculum
  (on the digits even the weaker default form needed 0.02 instead of the authors' 0.05,
  see the README);
* sharing loss: ``sum_{i<j} sum_l w_l |logits[i, l, select] - logits[j, l, select]|`` on
  the raw logits over all blocks; ``w_l = (L - l) / L`` with ``l = 0..L-1`` (``"paper"``:
  1 for the first block down to ``1/L``), ``"code"`` is the authors' ``(l + 1) / L``, or
  an explicit list of ``L`` weights;
* ``sample_policy`` / ``argmax_policy`` return select for blocks the curriculum still
  forces to select (that is what the network computes for them);
* the loss coefficients ``sparsity_weight`` and ``sharing_weight`` (the paper gives
  none) default to 0.05 each, the authors' ``reg_w`` and ``reg_w_hamming`` in their
  NYU-v2 configs; they are stored on ``skip_policy`` for :func:`aux_losses`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from rewriter.analysis.blocks import ResidualBlock, residual_blocks
from rewriter.api import rewrite
from rewriter.context import RewriteContext
from rewriter.errors import RewriterError
from rewriter.modules import RewriterModule
from rewriter.registry import (
    Pass,
    anything,
    at_least,
    choices,
    nonnegative,
    option,
    positive,
    register,
)
from rewriter.select import selected

__all__ = [
    "SELECT",
    "SKIP",
    "SkipFreeze",
    "SkipGates",
    "SkipMix",
    "SkipPolicy",
    "argmax_policy",
    "aux_losses",
    "block_weights",
    "curriculum",
    "decay_temperature",
    "freeze",
    "policy_parameters",
    "sample_policy",
    "set_learned_blocks",
    "set_task",
    "sharing_loss",
    "skip_policy",
    "sparsity_loss",
]

SELECT, SKIP = 0, 1
"""Columns of the logits and of the policy: ``[select, skip]``."""

WeightSpec = str | Sequence[float]


def block_weights(spec: WeightSpec, blocks: int) -> Tensor:
    """The sharing loss's per-block weights ``w_l`` for ``l = 0..blocks-1``.

    ``"paper"``: ``(L - l) / L`` (lower blocks are pushed to be shared more);
    ``"code"``: the authors' ``(l + 1) / L``; or an explicit sequence of ``blocks`` floats.
    """
    index = torch.arange(blocks, dtype=torch.float32)
    if isinstance(spec, str):
        if spec == "paper":
            return (blocks - index) / blocks
        if spec == "code":
            return (index + 1) / blocks
        raise ValueError(
            f"sharing weights must be 'paper', 'code' or a list of floats, got {spec!r}"
        )
    weights = torch.tensor([float(w) for w in spec], dtype=torch.float32)
    if weights.shape != (blocks,):
        raise ValueError(f"expected {blocks} sharing weights (one per block), got {len(weights)}")
    return weights


class SkipPolicy(RewriterModule):
    """Per-task select/skip logits of every gated block; ``forward()`` is the active policy.

    ``forward()`` takes no input and returns the ``(blocks, 2)`` policy ``[p_select,
    p_skip]`` of the task in the ``task`` buffer (see the module docs for each mode).
    """

    AUX_LOSS_KEYS: frozenset[str] = frozenset()  # aux_loss reads no context

    def __init__(
        self,
        tasks: int,
        blocks: Sequence[str],
        *,
        temperature: float = 5.0,
        eval_policy: str = "argmax",
        sparsity_weight: float = 0.05,
        sharing_weight: float = 0.05,
        sharing_weights: WeightSpec = "paper",
        sparsity_mean: str = "all",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if tasks < 1 or not blocks:
            raise ValueError(f"need at least one task and one block, got {tasks} and {len(blocks)}")
        self.blocks = tuple(blocks)
        self.eval_policy = eval_policy
        if sparsity_mean not in ("all", "learned"):
            raise ValueError(f"sparsity_mean must be 'all' or 'learned', got {sparsity_mean!r}")
        self.sparsity_mean = sparsity_mean
        self.sparsity_weight = float(sparsity_weight)
        self.sharing_weight = float(sharing_weight)
        count = len(self.blocks)
        self.logits = nn.Parameter(torch.zeros(tasks, count, 2, device=device))
        self.register_buffer("task", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))
        self.register_buffer("learned", torch.ones(count, device=device))
        self.register_buffer(
            "sharing_weights", block_weights(sharing_weights, count).to(self.logits.device)
        )

    @property
    def tasks(self) -> int:
        return self.logits.shape[0]

    def forward(self) -> Tensor:
        # (blocks, 2): a gather with the task tensor (no Python int: no recompile per task).
        # The index is cloned so set_task between two forwards of one backward is allowed.
        logits = self.logits.index_select(0, self.task.reshape(1).clone()).squeeze(0)
        if self.training:
            tiny = torch.finfo(logits.dtype).tiny
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(tiny)))
            policy = torch.softmax((logits + gumbel) / self.temperature, dim=-1)
        elif self.eval_policy == "argmax":
            select = (logits[:, SELECT] >= logits[:, SKIP]).to(logits.dtype)  # tie -> select
            policy = torch.stack([select, 1 - select], dim=-1)
        else:
            policy = torch.softmax(logits, dim=-1)
        learned = self.learned.to(logits.dtype)
        p_select = learned * policy[:, SELECT] + (1 - learned)  # exactly 1 when not learned
        p_skip = learned * policy[:, SKIP]  # exactly 0 when not learned
        return torch.stack([p_select, p_skip], dim=-1)

    def sparsity_loss(self) -> Tensor:
        """``sum_k (1 / n) sum_{l learned} CE(logits[k, l], skip)`` (0 when none is learned).

        ``n = L`` (``sparsity_mean="all"``) or the number of learned blocks (``"learned"``,
        the authors' code).
        """
        ce = -torch.log_softmax(self.logits, dim=-1)[..., SKIP]  # (tasks, blocks)
        learned = self.learned.to(ce.dtype)
        total = (ce * learned).sum(-1).sum()
        if self.sparsity_mean == "all":
            return total / ce.shape[-1]
        return total / learned.sum().clamp_min(1.0)

    def sharing_loss(self, weights: WeightSpec | None = None) -> Tensor:
        """``sum_{i<j} sum_l w_l |logits[i, l, select] - logits[j, l, select]|``."""
        select = self.logits[..., SELECT]  # (tasks, blocks)
        if weights is None:
            w = self.sharing_weights.to(select.dtype)
        else:
            w = block_weights(weights, select.shape[1]).to(select)
        diff = (select[:, None, :] - select[None, :, :]).abs()  # (tasks, tasks, blocks)
        pairs = torch.ones(self.tasks, self.tasks, device=select.device).triu(1).bool()
        return (diff * w).sum(-1)[pairs].sum()

    def aux_loss(self, **context: Any) -> Tensor:
        """``sparsity_weight * sparsity + sharing_weight * sharing``; other context is ignored."""
        return (
            self.sparsity_weight * self.sparsity_loss() + self.sharing_weight * self.sharing_loss()
        )

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, blocks={len(self.blocks)}, eval_policy={self.eval_policy!r}"

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """Negligible: a few ops on a ``(blocks, 2)`` tensor per forward."""
        return 0


class SkipMix(RewriterModule):
    """``p_select * block_out + p_skip * shortcut`` with ``p`` row ``index`` of the policy."""

    def __init__(self, index: int, block: str) -> None:
        super().__init__()
        self.index = index
        self.block = block

    def forward(self, block_out: Tensor, shortcut: Tensor, policy: Tensor) -> Tensor:
        p = policy[self.index].to(block_out.dtype)
        return p[SELECT] * block_out + p[SKIP] * shortcut

    def extra_repr(self) -> str:
        return f"index={self.index}, block={self.block!r}"

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """Two multiplies and one add per element: two MACs."""
        numel = 1
        for size in output_shape or ():
            numel *= int(size)
        return 2 * numel


@register
@dataclass(frozen=True)
class SkipGates(Pass):
    """relu(shortcut + branch(x)) => p_select * relu(shortcut + branch(x)) + p_skip * shortcut."""

    name = "skip_gates"

    tasks: int = option(
        1, "number of tasks K; logits have shape (K, blocks, 2)", at_least(1, limit=10_000)
    )
    temperature: float = option(
        5.0, "initial Gumbel-softmax temperature (training mode)", positive()
    )
    eval_policy: Literal["argmax", "softmax"] = option(
        "argmax",
        "eval-mode policy: 'argmax' (hard, tie selects) or 'softmax' (soft)",
        choices("argmax", "softmax"),
    )
    sparsity_weight: float = option(
        0.05, "coefficient of the sparsity loss in aux_losses", nonnegative()
    )
    sharing_weight: float = option(
        0.05, "coefficient of the sharing loss in aux_losses", nonnegative()
    )
    sharing_weights: Literal["paper", "code"] | tuple[float, ...] = option(
        "paper",
        "w_l of the sharing loss: 'paper' (L-l)/L, 'code' (l+1)/L, or one float per block",
        nonnegative(),  # for the list form; the strings are checked by their Literal type
    )
    sparsity_mean: Literal["all", "learned"] = option(
        "all",
        "sparsity loss per task: mean over 'all' L blocks (unlearned count 0) or over the "
        "'learned' ones (the authors' code)",
        choices("all", "learned"),
    )
    include: tuple[str, ...] = option(
        (), "globs of block names (module scope or add node) to gate", anything()
    )
    exclude: tuple[str, ...] = option((), "globs of block names to leave ungated", anything())

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {self.tasks}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.eval_policy not in ("argmax", "softmax"):
            raise ValueError(f"eval_policy must be 'argmax' or 'softmax', got {self.eval_policy!r}")
        if self.sparsity_mean not in ("all", "learned"):
            raise ValueError(
                f"sparsity_mean must be 'all' or 'learned', got {self.sparsity_mean!r}"
            )
        if isinstance(self.sharing_weights, str) and self.sharing_weights not in ("paper", "code"):
            raise ValueError(
                f"sharing_weights must be 'paper', 'code' or a list, got {self.sharing_weights!r}"
            )

    @property
    def preserves_outputs(self) -> bool:  # type: ignore[override]
        return self.eval_policy == "argmax"

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        gated = [n for n, m in gm.named_modules() if isinstance(m, (SkipPolicy, SkipMix))]
        if gated:
            raise RewriterError(
                f"the graph already has skip gates ({', '.join(gated[:3])}); run skip_gates once "
                "per model (rewrite the original model to change its options)"
            )
        blocks = [
            b
            for b in residual_blocks(gm)
            if selected(_label(b), gm, include=self.include, exclude=self.exclude)
        ]
        if not blocks:
            ctx.note("no residual block found (or none selected): nothing gated")
            return
        labels = _unique_labels(blocks)
        ref = next(iter(gm.parameters()), None)
        policy = SkipPolicy(
            self.tasks,
            labels,
            temperature=self.temperature,
            eval_policy=self.eval_policy,
            sparsity_weight=self.sparsity_weight,
            sharing_weight=self.sharing_weight,
            sharing_weights=self.sharing_weights,
            sparsity_mean=self.sparsity_mean,
            device=None if ref is None else ref.device,
        )
        graph = gm.graph
        policy_name = ctx.add_module("skip", "policy", policy)
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            policy_node = ctx.call_module(policy_name, ())

        nodes = {n.name: n for n in graph.nodes}
        gated_outputs: dict[str, fx.Node] = {}  # block output name -> its mix node
        for index, (block, label) in enumerate(zip(blocks, labels, strict=True)):
            ctx.current_node = block.add
            out = nodes[block.output]
            shortcut = gated_outputs.get(block.shortcut_tail, nodes[block.shortcut_tail])
            mix_name = ctx.add_module(block.scope or block.add, "skip", SkipMix(index, label))
            with graph.inserting_after(out):
                mix = ctx.call_module(mix_name, (out, shortcut, policy_node))
            out.replace_all_uses_with(mix, delete_user_cb=lambda user, mix=mix: user is not mix)
            gated_outputs[block.output] = mix
            ctx.matches["residual block -> skip gate"] += 1
        ctx.current_node = None


def _label(block: ResidualBlock) -> str:
    return block.scope if block.scope is not None else block.add


def _unique_labels(blocks: Sequence[ResidualBlock]) -> list[str]:
    """Block names for reports: the module scope, with the add node when a scope has several."""
    counts = Counter(_label(b) for b in blocks)
    return [_label(b) if counts[_label(b)] == 1 else f"{_label(b)}/{b.add}" for b in blocks]


# -- training-time functions ----------------------------------------------------------------


def skip_policy(gm: nn.Module) -> SkipPolicy:
    """The :class:`SkipPolicy` module of a graph rewritten by ``skip_gates``."""
    found = [m for m in gm.modules() if isinstance(m, SkipPolicy)]
    if len(found) != 1:
        what = "no skip_policy module" if not found else f"{len(found)} skip_policy modules"
        raise RewriterError(
            f"expected one skip gate policy, found {what}; apply the skip_gates pass first"
        )
    return found[0]


def set_task(gm: nn.Module, task: int) -> None:
    """Make ``task`` the active task of every following forward (in place; no recompile)."""
    policy = skip_policy(gm)
    if not 0 <= int(task) < policy.tasks:
        raise RewriterError(f"task must be in [0, {policy.tasks}), got {task}")
    policy.task.fill_(int(task))


def decay_temperature(gm: nn.Module, factor: float = 0.965) -> float:
    """Multiply the Gumbel-softmax temperature by ``factor``; return the new temperature."""
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    policy = skip_policy(gm)
    policy.temperature.mul_(factor)
    return float(policy.temperature)


def set_learned_blocks(gm: nn.Module, count: int) -> int:
    """Let the last ``count`` blocks learn their policies; earlier blocks are forced to select.

    ``count=0`` forces every block to select (the full network, for warm-up). Returns the
    number of learned blocks (``count`` clipped to ``[0, blocks]``).
    """
    policy = skip_policy(gm)
    blocks = len(policy.blocks)
    count = max(0, min(int(count), blocks))
    policy.learned.zero_()
    if count:
        policy.learned[blocks - count :] = 1
    return count


def curriculum(gm: nn.Module, epoch: int) -> int:
    """AdaShare's curriculum: only the last ``floor(epoch / 3) + 1`` blocks learn policies."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return set_learned_blocks(gm, epoch // 3 + 1)


def policy_parameters(gm: nn.Module) -> list[nn.Parameter]:
    """The policy's parameters (the logits), for a separate optimizer in policy epochs."""
    return [skip_policy(gm).logits]


def sparsity_loss(gm: nn.Module) -> Tensor:
    """Per task, the cross-entropy of its logits towards skip, learned blocks only, over L; summed."""
    return skip_policy(gm).sparsity_loss()


def sharing_loss(gm: nn.Module, weights: WeightSpec | None = None) -> Tensor:
    """``sum_{i<j} sum_l w_l |logit_i[l, select] - logit_j[l, select]|``.

    ``weights`` overrides the pass's ``sharing_weights`` (``"paper"``, ``"code"`` or a list).
    """
    return skip_policy(gm).sharing_loss(weights)


def aux_losses(
    gm: nn.Module,
    *,
    sparsity_weight: float | None = None,
    sharing_weight: float | None = None,
    weights: WeightSpec | None = None,
) -> Tensor:
    """``sparsity_weight * sparsity_loss + sharing_weight * sharing_loss`` of the skip gates.

    Coefficients default to the pass options stored on ``skip_policy``.
    """
    policy = skip_policy(gm)
    a = policy.sparsity_weight if sparsity_weight is None else sparsity_weight
    b = policy.sharing_weight if sharing_weight is None else sharing_weight
    return a * policy.sparsity_loss() + b * policy.sharing_loss(weights)


def _forced(policy: SkipPolicy) -> Tensor:
    return (policy.learned == 0).expand(policy.tasks, -1)


def sample_policy(gm: nn.Module, generator: torch.Generator | None = None) -> Tensor:
    """``(tasks, blocks)`` bool: select ~ Bernoulli(softmax(logits)[select]) per task and block.

    Blocks the curriculum forces to select are selected.
    """
    policy = skip_policy(gm)
    with torch.no_grad():
        p_select = torch.softmax(policy.logits.float(), dim=-1)[..., SELECT].cpu()
        drawn = torch.bernoulli(p_select, generator=generator).bool()
    return drawn | _forced(policy).cpu()


def argmax_policy(gm: nn.Module) -> Tensor:
    """``(tasks, blocks)`` bool: select where its logit is at least skip's (what eval runs)."""
    policy = skip_policy(gm)
    with torch.no_grad():
        select = policy.logits[..., SELECT] >= policy.logits[..., SKIP]
    return (select | _forced(policy)).cpu()


def freeze(
    gm: fx.GraphModule,
    policy: Tensor | Sequence[Sequence[bool]],
    example_inputs: Sequence[Tensor] | Tensor | None = None,
) -> list[fx.GraphModule]:
    """One GraphModule per task with its fixed policy: skipped blocks are removed.

    ``policy`` is ``(tasks, blocks)`` bool (``True`` = select), e.g. from
    :func:`sample_policy` or :func:`argmax_policy`. Task ``k``'s graph is
    ``rewriter.rewrite(gm, [("skip_freeze", {"task": k, "select": policy[k]})])``
    (see :class:`SkipFreeze`): a new GraphModule (``gm`` is not changed) whose pipeline
    records the policy, so :func:`rewriter.save` / :func:`rewriter.load` round-trip it.
    ``example_inputs`` enable the pass manager's shape check (zoo models have defaults).
    """
    owner = skip_policy(gm)
    select = torch.as_tensor(policy, dtype=torch.bool).cpu()
    expected = (owner.tasks, len(owner.blocks))
    if tuple(select.shape) != expected:
        raise RewriterError(
            f"policy must have shape (tasks, blocks) = {expected}, got {tuple(select.shape)}"
        )
    return [
        rewrite(gm, [SkipFreeze(task=k, select=tuple(select[k].tolist()))], example_inputs)
        for k in range(owner.tasks)
    ]


@register
@dataclass(frozen=True)
class SkipFreeze(Pass):
    """p_select * block + p_skip * shortcut => block (select) or shortcut (skip, block removed)."""

    name = "skip_freeze"

    select: tuple[bool, ...] = option(
        (), "one per gated block: true keeps it, false removes it", anything()
    )
    task: int = option(
        0, "the task this policy belongs to (recorded in meta['skip_gates_policy'])", at_least(0)
    )

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        """Selected blocks lose the mix; skipped ones become their shortcut and are deleted.

        Every node that only a skipped block's output read (its branch, add and
        activation, and blocks nested inside it) is erased, so the pass manager deletes
        their modules; ``skip_policy`` and the ``*_skip`` modules go too. A branch that
        mutated the block input in place would have changed the shortcut's value in the
        gated graph but not here; the zoo's blocks and traced models do not do that.
        """
        owner = skip_policy(gm)
        if len(self.select) != len(owner.blocks) or not 0 <= self.task < owner.tasks:
            raise RewriterError(
                f"skip_freeze needs select with one entry per gated block ({len(owner.blocks)}: "
                f"{', '.join(owner.blocks)}) and task in [0, {owner.tasks}); got "
                f"{len(self.select)} entries and task {self.task}"
            )
        graph = gm.graph
        modules = dict(gm.named_modules())
        dead: list[fx.Node] = []
        for node in list(graph.nodes):
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, SkipPolicy):
                dead.append(node)
            if not isinstance(module, SkipMix):
                continue
            ctx.current_node = node.name
            block_out, shortcut, _ = node.args
            keep = self.select[module.index]
            node.replace_all_uses_with(block_out if keep else shortcut)
            graph.erase_node(node)
            if keep:
                ctx.matches["selected block: gate removed"] += 1
            else:
                dead.append(block_out)
                ctx.matches["skipped block: removed"] += 1
        ctx.current_node = None
        _erase_dead(graph, dead)
        gm.meta["skip_gates_policy"] = {
            "task": self.task,
            "selected": [b for b, s in zip(owner.blocks, self.select, strict=True) if s],
            "skipped": [b for b, s in zip(owner.blocks, self.select, strict=True) if not s],
        }


def _erase_dead(graph: fx.Graph, roots: Sequence[fx.Node]) -> None:
    """Erase ``roots`` and every node that only they (transitively) read."""
    stack = list(roots)
    while stack:
        node = stack.pop()
        if getattr(node, "_erased", False) or node.users or node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        stack.extend(inputs)
