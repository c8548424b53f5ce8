"""Built-in passes, one module per technique. Importing this package registers them."""

from . import masks, norm, split
from .masks import Masks
from .norm import RBN, RepresentativeBatchNorm2d
from .split import Split

__all__ = ["Masks", "RBN", "RepresentativeBatchNorm2d", "Split", "masks", "norm", "split"]
