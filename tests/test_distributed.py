"""A rewritten model trains under ``DistributedDataParallel(torch.compile(gm))`` and stays in sync.

Two CPU processes (gloo backend) train the ``masks`` + ``rbn`` rewrite of a small conv net with
BN on *different* data. Some masks are zero before training. After a few steps every rank must
hold the same gradients, parameters, masks and (after DDP's buffer broadcast) the same RBN
running statistics, and masked-out weights must have received zero gradient.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import rewriter
from rewriter import zoo
from rewriter.passes.masks import get_masks, set_mask
from rewriter.passes.norm import RepresentativeBatchNorm2d

WORLD = 2
STEPS = 3
BATCH = 8
TIMEOUT_S = 240.0
"""Hard limit for the whole test (spawn + compile + training); a hang fails instead of blocking."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _masks(gm: torch.nn.Module) -> dict[str, Tensor]:
    """Deterministic masks with about half of each layer zeroed (same on every rank)."""
    generator = torch.Generator().manual_seed(1234)
    return {
        name: (torch.rand(m.shape, generator=generator) > 0.5).float()
        for name, m in get_masks(gm).items()
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    """Train on rank-specific data; save grads, params, buffers and the loss to a file."""
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S)
        )
        try:
            torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
            model = zoo.create("digits_cnn", width=8)
            gm = rewriter.rewrite(model, ["masks", "rbn"], zoo.example_inputs("digits_cnn"))
            masks = _masks(gm)
            for name, mask in masks.items():
                set_mask(gm, name, mask)
            ddp = DistributedDataParallel(torch.compile(gm), broadcast_buffers=True)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            data = torch.Generator().manual_seed(100 + rank)  # different data on every rank
            losses = []
            for _ in range(STEPS):
                x = torch.randn(BATCH, *zoo.input_shape("digits_cnn"), generator=data)
                y = torch.randint(0, 10, (BATCH,), generator=data)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                grads = {n: p.grad.clone() for n, p in gm.named_parameters()}
                optimizer.step()
                losses.append(float(loss))
            # One eval forward: DDP broadcasts rank 0's buffers first and eval BN leaves them
            # as they are. Eager (set_stance) so that eval mode does not compile a new graph.
            ddp.eval()
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                ddp(x)
            torch.save(
                {
                    "losses": losses,
                    "grads": grads,
                    "params": {n: p.detach().clone() for n, p in gm.named_parameters()},
                    "buffers": {n: b.clone() for n, b in gm.named_buffers()},
                    "set_masks": masks,
                    "rbn": [
                        n for n, m in gm.named_modules() if isinstance(m, RepresentativeBatchNorm2d)
                    ],
                },
                out,
            )
        finally:
            dist.destroy_process_group()
    except BaseException:
        out.with_suffix(".err").write_text(traceback.format_exc())
        raise


def _run(tmp_path: Path) -> list[dict]:
    """Spawn the workers, wait with a deadline, and load what every rank saved."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = {
        r: (tmp_path / f"rank{r}.err").read_text()
        for r in range(WORLD)
        if (tmp_path / f"rank{r}.err").exists()
    }
    assert not errors, "worker(s) failed:\n" + "\n".join(
        f"rank {r}:\n{e}" for r, e in errors.items()
    )
    assert not hung, f"rank(s) {hung} did not finish within {TIMEOUT_S:.0f} s"
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
def test_ddp_compiled_rewritten_model_stays_in_sync(tmp_path: Path) -> None:
    ranks = _run(tmp_path)
    first, second = ranks

    # The ranks saw different data (otherwise agreement below would prove nothing).
    assert first["losses"] != second["losses"]
    assert first["rbn"], "the rbn pass replaced no BatchNorm2d"

    for key in ("grads", "params", "buffers"):
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            torch.testing.assert_close(
                first[key][name], second[key][name], rtol=0, atol=0, msg=f"{key} {name!r} differs"
            )

    grads, buffers = first["grads"], first["buffers"]
    assert any(g.abs().sum() > 0 for g in grads.values()), "all gradients are zero"
    for layer, mask in first["set_masks"].items():
        assert 0 < int((mask == 0).sum()) < mask.numel()
        torch.testing.assert_close(buffers[f"{layer}.weight_mask"], mask, rtol=0, atol=0)
        grad = grads[f"{layer}.weight"]
        assert bool((grad[mask == 0] == 0).all()), f"masked weights of {layer} got gradient"
        assert bool((grad[mask == 1] != 0).any()), f"unmasked weights of {layer} got no gradient"

    for bn in first["rbn"]:
        assert int(buffers[f"{bn}.num_batches_tracked"]) == STEPS
        assert buffers[f"{bn}.running_mean"].abs().sum() > 0, f"{bn} running mean never updated"
