"""Property testing for passes: random graphs and the standard property suite.

``random_models()`` is a ``hypothesis`` strategy of random but valid DAG models
(convs of every kind, BN, activations, residual adds, multiplies, concat,
split/chunk, pooling, linear heads); ``check_pass`` runs the contracts every
pass keeps against one of them. Both work with any pass, a user's own included.
"""

from .strategies import RandomModel, random_model, random_models
from .suite import SuiteResult, check_compiles, check_pass, train_losses

__all__ = [
    "RandomModel",
    "SuiteResult",
    "check_compiles",
    "check_pass",
    "random_model",
    "random_models",
    "train_losses",
]
