"""Built-in passes, one module per technique. Importing this package registers them."""

from . import distill, lottery, masks, norm, saliency, skip, split, tas
from .distill import Distill, Distiller
from .lottery import GraSP, Magnitude, RandomPrune, Snip, SynFlow
from .masks import Masks
from .norm import RBN, RepresentativeBatchNorm2d
from .saliency import FBSGate, ManiDPGate, SaliencyGate, SaliencyGates
from .skip import SkipFreeze, SkipGates, SkipMix, SkipPolicy
from .split import Split
from .tas import Tas, TASArch, TASDepth, TASNorm, TASWidth

__all__ = [
    "Tas",
    "TASArch",
    "TASDepth",
    "TASNorm",
    "TASWidth",
    "tas",
    "Distill",
    "Distiller",
    "distill",
    "SkipFreeze",
    "SkipGates",
    "SkipMix",
    "SkipPolicy",
    "skip",
    "GraSP",
    "Magnitude",
    "RandomPrune",
    "Snip",
    "SynFlow",
    "lottery",
    "FBSGate",
    "ManiDPGate",
    "SaliencyGate",
    "SaliencyGates",
    "saliency",
    "Masks",
    "RBN",
    "RepresentativeBatchNorm2d",
    "Split",
    "masks",
    "norm",
    "split",
]
