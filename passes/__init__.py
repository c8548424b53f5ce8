"""Built-in passes, one module per technique. Importing this package registers them."""

from . import masks, norm, saliency, split
from .masks import Masks
from .norm import RBN, RepresentativeBatchNorm2d
from .saliency import FBSGate, ManiDPGate, SaliencyGate, SaliencyGates
from .split import Split

__all__ = [
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
