"""The library-wide regulariser protocol: ``rewriter.aux_losses``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rewriter as rw
from rewriter import zoo
from rewriter.passes import saliency


def _gated():
    torch.manual_seed(0)
    x = zoo.example_inputs("resnet8", batch=4)
    gm = rw.rewrite(zoo.create("resnet8"), ["saliency_gates"], x)
    return gm, x


def test_aux_losses_sums_every_inserted_module():
    gm, x = _gated()
    gm.eval()  # eval mode: nothing is recorded, so two calls see the same state
    ce = F.cross_entropy(gm(*x), torch.tensor([0, 1, 2, 3]), reduction="none")
    total = rw.aux_losses(gm, per_sample_ce=ce)
    torch.testing.assert_close(total, saliency.aux_losses(gm, per_sample_ce=ce))
    by_hand = sum(m.aux_loss(per_sample_ce=ce) for m in saliency.gates(gm).values())
    torch.testing.assert_close(total, by_hand)
    assert total.ndim == 0 and total.item() > 0


def test_aux_losses_rejects_unknown_context_and_plain_models():
    gm, x = _gated()
    gm(*x)
    with pytest.raises(rw.RewriterError, match="unknown context.*per_sample_cee"):
        rw.aux_losses(gm, per_sample_cee=torch.zeros(4))
    with pytest.raises(rw.RewriterError, match="no inserted module defines aux_loss"):
        rw.aux_losses(rw.rewrite(zoo.create("resnet8"), ["masks"]))


def test_aux_losses_checks_keys_even_when_modules_read_none():
    gm = rw.rewrite(zoo.create("resnet8"), ["skip_gates"])
    gm(*zoo.example_inputs("resnet8"))
    assert rw.aux_losses(gm).ndim == 0
    with pytest.raises(rw.RewriterError, match="unknown context"):
        rw.aux_losses(gm, per_sampel_ce=torch.zeros(2))
