"""Lottery tickets and pruning at initialisation (``docs/methods/lottery.md``), on top of ``masks``.

One namespace for four modules:

* :mod:`rewriter.passes.lottery_scores`: the criteria ``magnitude``, ``random``, ``snip``,
  ``grasp`` and ``synflow`` as score functions (``*_scores``) and one-call pruning
  functions, and :func:`prune`, which turns any scores into masks at an exact density.
* :mod:`rewriter.passes.lottery_passes`: the passes ``magnitude``, ``random_prune``,
  ``snip``, ``grasp`` and ``synflow``.
* :mod:`rewriter.passes.lottery_imp`: iterative magnitude pruning with rewinding
  (:func:`imp`) and its controls (:func:`imp_control`).
* :mod:`rewriter.passes.lottery_early_bird`: Early-Bird tickets (BN-gamma L1 sub-gradient,
  channel masks, mask distance, the :class:`EarlyBird` detector, :func:`early_bird_ticket`).

Masks live in the graph as buffers (no hooks); every function changes them in place, so a
compiled model is not recompiled when they change. Importing this module registers the
passes.
"""

from .lottery_early_bird import (
    EarlyBird,
    add_bn_l1_subgradient,
    bn_channel_masks,
    bn_layers,
    bn_producers,
    channel_masks_for_slim,
    early_bird_ticket,
    mask_distance,
)
from .lottery_imp import (
    ImpResult,
    Round,
    TrainFn,
    TrainRun,
    imp,
    imp_control,
    imp_prune,
    resample_weights,
    rewind,
    save_state,
    source_init_fn,
)
from .lottery_passes import GraSP, Magnitude, RandomPrune, Snip, SynFlow
from .lottery_scores import (
    Scores,
    current_density,
    grasp,
    grasp_scores,
    magnitude,
    magnitude_scores,
    masked_layers,
    output_layers,
    prune,
    random_prune,
    random_scores,
    snip,
    snip_scores,
    synflow,
    synflow_scores,
)

__all__ = [
    "EarlyBird",
    "GraSP",
    "ImpResult",
    "Magnitude",
    "RandomPrune",
    "Round",
    "Scores",
    "Snip",
    "SynFlow",
    "TrainFn",
    "TrainRun",
    "add_bn_l1_subgradient",
    "bn_channel_masks",
    "bn_layers",
    "bn_producers",
    "channel_masks_for_slim",
    "current_density",
    "early_bird_ticket",
    "grasp",
    "grasp_scores",
    "imp",
    "imp_control",
    "imp_prune",
    "magnitude",
    "magnitude_scores",
    "mask_distance",
    "masked_layers",
    "output_layers",
    "prune",
    "random_prune",
    "random_scores",
    "resample_weights",
    "source_init_fn",
    "rewind",
    "save_state",
    "snip",
    "snip_scores",
    "synflow",
    "synflow_scores",
]
