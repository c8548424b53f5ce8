"""Built-in passes, one module per technique. Importing this package registers them."""

from . import masks, norm
from .masks import Masks
from .norm import RBN, RepresentativeBatchNorm2d

__all__ = ["Masks", "RBN", "RepresentativeBatchNorm2d", "masks", "norm"]
