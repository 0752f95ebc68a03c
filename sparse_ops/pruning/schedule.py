"""The cubic sparsity schedule of docs/design.md §2.2 (gradual magnitude pruning, MGPP, movement pruning).

    s(t) = 0                                              t < t_i
    s(t) = s_f + (s_i − s_f)·(1 − (t − t_i)/(t_e − t_i))³  t_i ≤ t < t_e
    s(t) = s_f                                            t ≥ t_e
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class CubicSchedule:
    t_i: int
    t_e: int
    s_f: float
    s_i: float = 0.0

    def __post_init__(self):
        for name in ("t_i", "t_e"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.t_e <= self.t_i:
            raise ValueError(f"t_e must be > t_i (the ramp ends after it starts), got t_i={self.t_i}, t_e={self.t_e}")
        for name in ("s_i", "s_f"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        if self.s_i > self.s_f:
            raise ValueError(f"s_i must be <= s_f, got s_i={self.s_i}, s_f={self.s_f}")

    def sparsity(self, step: int) -> float:
        if step < self.t_i:
            return 0.0
        if step >= self.t_e:
            return self.s_f
        progress = (step - self.t_i) / (self.t_e - self.t_i)
        return self.s_f + (self.s_i - self.s_f) * (1.0 - progress) ** 3

    def prune_count(self, step: int, numel: int) -> int:
        """How many of `numel` keys to prune at `step`: round(s(t)·numel), never all of them."""
        return min(numel - 1, rounded_count(self.sparsity(step), numel)) if numel else 0


def rounded_count(fraction: float, numel: int) -> int:
    """round(fraction·numel), halves rounded up: the one rounding rule for how many to prune."""
    return math.floor(fraction * numel + 0.5)
