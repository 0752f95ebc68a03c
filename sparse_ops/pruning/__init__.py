"""One module per pruning method; each owns its per-step rule (the shared Pruner is sparse_ops.pruning.pruner).

    magnitude.py      gradual magnitude pruning (the baseline)
    mgpp.py           magnitude pruning under a mixture Gaussian prior
    movement.py       hard movement pruning: TopK of scores learned by Adam (or first-order)
    soft_movement.py  soft movement pruning: S > τ, with λ_mvp steered to the target sparsity

and the one-shot methods, run by oneshot.py from calibration data (no training):

    wanda.py          |W|·‖X‖ per output row
    sparsegpt.py      pruning with second-order weight updates
    magnitude.py      magnitude_mask, the baseline
"""

from __future__ import annotations

from .base import KEEP_ALL, PruningMethod

METHODS = ("magnitude", "mgpp", "movement", "soft_movement")  # the one list of the Pruner's method names
ONESHOT_METHODS = ("wanda", "sparsegpt", "magnitude")  # the one list of oneshot's method names


def method_for(config) -> type[PruningMethod]:
    """The class that implements config.method (its `name`)."""
    from .magnitude import Magnitude
    from .mgpp import MGPP
    from .movement import Movement
    from .soft_movement import SoftMovement

    return {cls.name: cls for cls in (Magnitude, MGPP, Movement, SoftMovement)}[config.method]


__all__ = ["KEEP_ALL", "METHODS", "ONESHOT_METHODS", "PruningMethod", "method_for"]
