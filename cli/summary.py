"""``rewriter inspect``: a readable summary of a model's structure.

The analyses (FLOPs, residual blocks, channel groups) live in
``rewriter.analysis`` and are imported when a summary is made; a section whose
analysis cannot be imported is shown as unavailable instead of failing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

import rewriter
from rewriter.lift import lift_report

_MAX_LISTED = 12


def _section(compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return compute()
    except ImportError as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def inspect_model(
    model: nn.Module, inputs: Sequence[torch.Tensor] | None, name: str
) -> dict[str, Any]:
    """Everything ``rewriter inspect`` shows, as JSON-friendly data."""
    gm = rewriter.trace(model)
    targets = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module"))
    layers = Counter(type(gm.get_submodule(t)).__name__ for t in targets)
    params = list(gm.parameters())
    source = getattr(model, "rewriter_source", None) or _report_source(model)
    info: dict[str, Any] = {
        "model": name,
        "source": source,
        "inputs": [list(x.shape) for x in inputs] if inputs is not None else None,
        "layers": dict(layers.most_common()),
        "nodes": sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output")),
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "buffers": sum(b.numel() for b in gm.buffers()),
        "passes": _passes(model),
        "opaque": rewriter.opaque_modules(gm),
    }
    lifted = lift_report(model) if isinstance(model, fx.GraphModule) else None
    if lifted is not None:
        info["lifted"] = {
            "modules": lifted.counts(),
            "kept_as_functions": [
                {"node": n, "op": op, "reason": why} for n, op, why in lifted.kept
            ],
        }
    info["macs"] = _section(lambda: _macs(gm, inputs))
    info["residual_blocks"] = _section(lambda: _blocks(gm))
    info["channel_groups"] = _section(lambda: _channels(gm, inputs))
    return info


def _report_source(model: nn.Module) -> Any:
    try:
        return rewriter.report(model).source
    except rewriter.RewriterError:
        return None


def _passes(model: nn.Module) -> list[str]:
    try:
        return [p.name for p in rewriter.report(model).passes]
    except rewriter.RewriterError:
        return []


def _needs_inputs() -> dict[str, Any]:
    return {"unavailable": "needs an example input (give --input-shape)"}


def _macs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor] | None) -> dict[str, Any]:
    from rewriter.analysis.flops import flops

    if inputs is None:
        return _needs_inputs()
    rep = flops(gm, inputs)
    return {
        "total": rep.total_macs,
        "per_sample": rep.total_macs / rep.batch,
        "batch": rep.batch,
        "unknown": list(rep.unknown),
    }


def _blocks(gm: fx.GraphModule) -> dict[str, Any]:
    from rewriter.analysis.blocks import residual_blocks

    blocks = residual_blocks(gm)
    return {
        "count": len(blocks),
        "blocks": [
            {"scope": b.scope, "kind": b.kind, "input": b.input, "add": b.add, "output": b.output}
            for b in blocks
        ],
    }


def _channels(gm: fx.GraphModule, inputs: Sequence[torch.Tensor] | None) -> dict[str, Any]:
    from rewriter.analysis.channels import channel_groups

    if inputs is None:
        return _needs_inputs()
    groups = channel_groups(gm, inputs).groups
    reasons = Counter(g.reason or "no reason given" for g in groups if not g.prunable)
    return {
        "count": len(groups),
        "prunable": sum(1 for g in groups if g.prunable),
        "channels": sum(g.size for g in groups),
        "prunable_channels": sum(g.size for g in groups if g.prunable),
        "not_prunable": [{"groups": n, "reason": why} for why, n in reasons.most_common()],
    }


# -- text -------------------------------------------------------------------------------------


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


def inspect_text(info: dict[str, Any]) -> str:
    """The summary of :func:`inspect_model` as lines a person reads."""
    lines = [f"model: {info['model']}"]
    source = info.get("source")
    if isinstance(source, dict) and source.get("model") != info["model"]:
        lines.append(f"source: {source.get('model')}")
    if info["passes"]:
        lines.append(f"passes applied: {', '.join(info['passes'])}")
    if info["inputs"] is not None:
        lines.append("example input: " + ", ".join("x".join(map(str, s)) for s in info["inputs"]))
    layers = info["layers"]
    lines.append(
        f"layers: {sum(layers.values())} modules ({_counts(layers)}), {info['nodes']} nodes"
    )
    lines.append(
        f"parameters: {info['parameters']:,} ({info['trainable_parameters']:,} trainable); "
        f"buffers: {info['buffers']:,} elements"
    )
    macs = info["macs"]
    if "unavailable" in macs:
        lines.append(f"MACs: unavailable ({macs['unavailable']})")
    else:
        unknown = f"; cost unknown for {len(macs['unknown'])} node(s)" if macs["unknown"] else ""
        lines.append(
            f"MACs: {macs['total']:,} for batch {macs['batch']} "
            f"({macs['per_sample']:,.0f} per sample){unknown}"
        )
    blocks = info["residual_blocks"]
    if "unavailable" in blocks:
        lines.append(f"residual blocks: unavailable ({blocks['unavailable']})")
    else:
        lines.append(f"residual blocks: {blocks['count']}")
        for b in blocks["blocks"][:_MAX_LISTED]:
            where = b["scope"] or f"at {b['add']}"
            lines.append(f"  {where}: {b['kind']}, {b['input']} -> {b['output']}")
        if blocks["count"] > _MAX_LISTED:
            lines.append(f"  ... and {blocks['count'] - _MAX_LISTED} more (--json lists all)")
    groups = info["channel_groups"]
    if "unavailable" in groups:
        lines.append(f"channel groups: unavailable ({groups['unavailable']})")
    else:
        lines.append(
            f"channel groups: {groups['count']} ({groups['prunable']} prunable; "
            f"{groups['prunable_channels']:,} of {groups['channels']:,} channels)"
        )
        for entry in groups["not_prunable"][:_MAX_LISTED]:
            lines.append(f"  not prunable ({entry['groups']}): {entry['reason']}")
    if info["opaque"]:
        lines.append("opaque modules (passes cannot see inside):")
        lines.extend(f"  {name}: {why}" for name, why in info["opaque"].items())
    else:
        lines.append("opaque modules: none")
    lifted = info.get("lifted")
    if lifted is not None:
        lines.append(f"lifted from torch.export: {_counts(lifted['modules'])}")
        for k in lifted["kept_as_functions"]:
            lines.append(f"  kept as a function: {k['node']} ({k['op']}): {k['reason']}")
    return "\n".join(lines)


__all__ = ["inspect_model", "inspect_text"]
