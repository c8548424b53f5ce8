"""A character-level Llama-style decoder on Python's own source, then heads and MLP pruned.

Real data without a download: the text is the source of a few standard-library modules
(read from the running Python's ``Lib`` folder); one module is held out for validation.

1. Train a tiny ``LlamaForCausalLM`` (2 layers, hidden 64, 4 query heads sharing 2 kv
   heads, SwiGLU MLP 128) from a config for ``--steps`` steps.
2. Turn it into a graph with the export front end (``rewriter.rewrite(model, [],
   {"input_ids": ...})``), find the channel groups (one unit per kv group: a kv head
   with its 2 query heads; one per MLP channel) and score every unit by the L2 norm of
   all the weights it owns (rows of q/k/v/gate/up, columns of o/down): the criterion.
3. Remove the weaker half of the kv groups and of the MLP channels of every layer with
   ``rewriter.slim``, then fine-tune for ``--finetune`` steps.

Prints validation perplexity (dense, right after pruning, after fine-tuning), parameters
and MACs (``rewriter.analysis.flops``, one 64-character window). Run::

    python examples/char_decoder.py            # about a minute or two on one CPU core
"""

from __future__ import annotations

import math
import os
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from summary import Summary, parser  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import rewriter as rw  # noqa: E402
from rewriter.analysis.channels import channel_groups  # noqa: E402
from rewriter.analysis.flops import flops  # noqa: E402

TRAIN_FILES = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "shlex.py", "fnmatch.py",
               "glob.py", "colorsys.py", "base64.py", "calendar.py")  # fmt: skip
VALID_FILE = "queue.py"
CONTEXT = 64


def read_text() -> tuple[str, str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    train = "\n".join((lib / name).read_text(encoding="utf-8") for name in TRAIN_FILES)
    return train, (lib / VALID_FILE).read_text(encoding="utf-8")


def encode(text: str, vocab: dict[str, int]) -> Tensor:
    unknown = vocab["?"]
    return torch.tensor([vocab.get(ch, unknown) for ch in text], dtype=torch.long)


def batches(data: Tensor, batch: int, generator: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])


def logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids)
    return out["logits"] if isinstance(out, dict) else out.logits


def loss_of(model: nn.Module, window: Tensor) -> Tensor:
    logits = logits_of(model, window[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: nn.Module, data: Tensor) -> float:
    model.eval()
    n = (len(data) - 1) // (CONTEXT + 1)
    windows = data[: n * (CONTEXT + 1)].view(n, CONTEXT + 1)
    total = sum(loss_of(model, windows[i : i + 32]).item() * len(windows[i : i + 32])
                for i in range(0, n, 32))  # fmt: skip
    return math.exp(total / n)


def train(model: nn.Module, data: Tensor, steps: int, lr: float, seed: int) -> None:
    model.train()
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = loss_of(model, batches(data, 32, generator))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def unit_scores(gm: nn.Module, group) -> Tensor:
    """L2 norm of every weight a group channel owns (rows it produces, columns it reads)."""
    scores = torch.zeros(group.size)
    for member in group.members:
        module = gm.get_submodule(member.layer)
        weight = getattr(module, "weight", None)
        if weight is None or member.role == "param":
            continue
        w = weight.detach() if member.role == "out" else weight.detach().t()
        for ch in range(group.size):
            scores[ch] += w[member.select([ch])].pow(2).sum()
    return scores.sqrt()


def count(model: nn.Module, ids: Tensor) -> tuple[int, int]:
    report = flops(model, (ids,))
    return report.total_params, report.total_macs


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=600, help="training steps")
    ap.add_argument("--finetune", type=int, default=200, help="fine-tuning steps after pruning")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    summary = Summary("char_decoder", ap, args)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train_text, valid_text = read_text()
    chars = sorted({ch for ch in train_text if ch.isascii() and ch.isprintable()} | {"\n", "?"})
    vocab = {ch: i for i, ch in enumerate(chars)}
    train_data, valid_data = encode(train_text, vocab), encode(valid_text, vocab)
    summary.print(f"text: {len(train_data):,} training / {len(valid_data):,} validation characters "
          f"({len(TRAIN_FILES)} stdlib modules / {VALID_FILE}), vocabulary {len(vocab)}")  # fmt: skip

    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=CONTEXT,
        use_cache=False, tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    start = time.perf_counter()
    train(model, train_data, args.steps, 3e-3, args.seed)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")

    example = {"input_ids": valid_data[: 2 * CONTEXT].view(2, CONTEXT)}
    dense = rw.rewrite(model.eval(), [], example)  # the export front end (a HF model)
    window = example["input_ids"][:1]
    groups = channel_groups(dense, (example["input_ids"],))
    drops = {}
    for group in groups.prunable():
        order = torch.argsort(unit_scores(dense, group))
        drops[group.id] = order[: group.size // 2].tolist()
    small = rw.slim(dense, (example["input_ids"],), rw.group_masks(groups, drops))
    heads = [small.get_submodule(f"model.layers.{i}.self_attn.q_proj").out_features // 16
             for i in range(2)]  # fmt: skip
    kv = [small.get_submodule(f"model.layers.{i}.self_attn.k_proj").out_features // 16
          for i in range(2)]  # fmt: skip

    rows = [("dense", perplexity(dense, valid_data), *count(dense, window))]
    rows.append(("pruned", perplexity(small, valid_data), *count(small, window)))
    train(small, train_data, args.finetune, 1e-3, args.seed + 1)
    rows.append(("pruned + fine-tuned", perplexity(small, valid_data), *count(small, window)))

    summary.print(f"pruned: query heads per layer {heads}, kv heads {kv} (of 4 and 2), "
          f"MLP {[small.get_submodule(f'model.layers.{i}.mlp.up_proj').out_features for i in range(2)]}"
          " (of 128)")  # fmt: skip
    summary.print(f"{'model':<20} {'val perplexity':>14} {'parameters':>11} {'MACs/window':>12}")
    for name, ppl, params, macs in rows:
        summary.print(f"{name:<20} {ppl:>14.2f} {params:>11,} {macs:>12,}")
    summary.save()


if __name__ == "__main__":
    main()
