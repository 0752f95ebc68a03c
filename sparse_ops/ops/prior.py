"""The mixture Gaussian prior of MGPP (docs/design.md §2.1): constants, checks and the equal-odds threshold.

    π(θ) = λ·N(θ; 0, v1) + (1−λ)·N(θ; 0, v0),   v0 (spike) < v1 (slab)
    p0(θ) = 1 / (1 + exp(c2·θ² + c1)),  c1 = log(λ/(1−λ)) + ½·log(v0/v1),  c2 = 1/(2v0) − 1/(2v1)
    ∂[−log π]/∂θ = θ · (p0/v0 + (1 − p0)/v1)

The constants are computed here in float64 on the host; kernels receive them as scalars.
"""

from __future__ import annotations

import math


def check_prior_args(lam: float, var0: float, var1: float) -> None:
    """Raise ValueError naming the argument unless 0 < lam < 1 and 0 < var0 < var1 (all finite)."""
    for name, value in (("lam", lam), ("var0", var0), ("var1", var1)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must lie in (0, 1), got {lam!r}")
    if var0 <= 0.0:
        raise ValueError(f"var0 must be > 0, got {var0!r}")
    if var1 <= var0:
        raise ValueError(f"var1 must be > var0 (the slab is wider than the spike), got var0={var0!r}, var1={var1!r}")


def mgp_constants(lam: float, var0: float, var1: float) -> tuple[float, float, float, float]:
    """Return (c1, c2, 1/var0, 1/var1) in float64 for the sigmoid form of p0."""
    check_prior_args(lam, var0, var1)
    c1 = math.log(lam / (1.0 - lam)) + 0.5 * math.log(var0 / var1)
    c2 = 0.5 / var0 - 0.5 / var1
    return c1, c2, 1.0 / var0, 1.0 / var1


def mgp_threshold(lam: float, var0: float, var1: float) -> float:
    """|θ| where spike and slab are equally likely: sqrt(log((1−λ)/λ · sqrt(v1/v0)) / c2).

    Returns 0.0 when the slab dominates everywhere (the log is negative).
    """
    _, c2, _, _ = mgp_constants(lam, var0, var1)
    log_odds = math.log((1.0 - lam) / lam) + 0.5 * math.log(var1 / var0)
    return math.sqrt(log_odds / c2) if log_odds > 0.0 else 0.0
