"""Cost of the export front end and the channel analysis on a Hugging Face Llama at 7B shape.

Run from the repository root (``transformers`` from the dev extra; nothing is downloaded)::

    python -m bench.hf_llama_lift              # 32 layers, hidden 4096, 32 heads, 8 kv heads
    python -m bench.hf_llama_lift --layers 4   # a quicker look

The model is built from a ``LlamaConfig`` on the **meta device**, so no weight memory is
allocated (about 7.1B parameters exist only as shapes). Timed, in CPU seconds of this
process (``time.process_time``), each once:

1. ``torch.export`` + :func:`rewriter.lift` + writing ``-1`` head counts
   (:func:`rewriter.frontends.export_graph`, static shapes, one sequence of 16 tokens);
2. :func:`rewriter.analysis.channels.channel_groups` (shape propagation on meta tensors
   plus the analysis), with the number of groups and prunable groups (expected: one kv
   group unit group and one MLP group per layer, the residual stream not prunable).

:mod:`bench.llama` (a hand-written Llama-shaped model, traced with fx) measures the
analysis alone at these widths; this script adds the Hugging Face export path.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rewriter.analysis.channels import channel_groups  # noqa: E402
from rewriter.frontends import export_graph  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaModel

    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.mlp,
        max_position_embeddings=max(64, args.tokens),
        use_cache=False,
        attn_implementation="sdpa",
    )
    start = time.process_time()
    with torch.device("meta"):
        model = LlamaModel(config).eval()
    build = time.process_time() - start
    params = sum(p.numel() for p in model.parameters())
    ids = torch.zeros(1, args.tokens, dtype=torch.long, device="meta")

    start = time.process_time()
    gm, inputs = export_graph(model, (), {"input_ids": ids}, dynamic=False)
    lift_s = time.process_time() - start
    nodes = len(gm.graph.nodes)

    start = time.process_time()
    analysis = channel_groups(gm, inputs)
    analysis_s = time.process_time() - start
    prunable = analysis.prunable()
    sizes = sorted({g.size for g in prunable})

    print(
        f"Llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
        f"{args.kv_heads} kv heads, MLP {args.mlp}: {params / 1e9:.2f}B parameters on meta"
    )
    print(f"build (meta)               {build:8.2f} s")
    print(f"export + lift (static)     {lift_s:8.2f} s   ({nodes} nodes)")
    print(f"channel_groups             {analysis_s:8.2f} s")
    print(
        f"groups {len(analysis.groups)}, prunable {len(prunable)} (unit counts {sizes}); "
        f"residual stream: {analysis.group_of('layers.0.self_attn.o_proj').reason[:70]}..."
    )


if __name__ == "__main__":
    main()
