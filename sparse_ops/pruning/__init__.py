"""One module per pruning method; each owns its per-step rule (the shared Pruner is sparse_ops.pruning.pruner).

    magnitude.py      gradual magnitude pruning (the baseline)
    mgpp.py           magnitude pruning under a mixture Gaussian prior
    movement.py       hard movement pruning: TopK of scores learned by Adam (or first-order)
    soft_movement.py  soft movement pruning: S > τ, with λ_mvp steered to the target sparsity
"""

from __future__ import annotations

from .base import KEEP_ALL, PruningMethod

METHODS = ("magnitude", "mgpp", "movement", "soft_movement")  # the one list of method names


def method_for(config) -> type[PruningMethod]:
    """The class that implements config.method (its `name`)."""
    from .magnitude import Magnitude
    from .mgpp import MGPP
    from .movement import Movement
    from .soft_movement import SoftMovement

    return {cls.name: cls for cls in (Magnitude, MGPP, Movement, SoftMovement)}[config.method]


__all__ = ["KEEP_ALL", "METHODS", "PruningMethod", "method_for"]
