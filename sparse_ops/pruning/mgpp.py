"""MGPP: magnitude pruning under a mixture Gaussian prior (Zhang, Sun, Liang 2024; docs/design.md §2.1).

Every step the fused pass adds (1/n)·∂[−log π(w)]/∂w to the gradient of each targeted weight, with
π = λ·N(0, σ1²) + (1−λ)·N(0, σ0²) and λ annealed linearly from `lam` to `lam_final` over the ramp
(t_i → t_e). The pruning events are magnitude pruning's (global by default, every Δt from t_i to
t_e, the schedule jumping to s_i at t_i), but between events nothing is masked: pruned weights
may regrow until the next event. After t_e the mask is fixed.
"""

from __future__ import annotations

from ..ops.prior import mgp_threshold
from .magnitude import Magnitude


class MGPP(Magnitude):
    name = "mgpp"

    def mask_enforced(self, step: int) -> bool:
        """Masked at the events and after t_e only (regrowth in between)."""
        s = self.pruner.schedule
        return step >= s.t_i and (self.is_event(step) or step > s.t_e)

    def prior_args(self, step: int) -> dict:
        cfg = self.config
        return dict(prior_scale=1.0 / cfg.num_train_examples, lam=cfg.lam_at(step), var0=cfg.var0, var1=cfg.var1)

    def stats(self) -> dict[str, float]:
        cfg, lam = self.config, self.config.lam_at(self.pruner.step)
        return {"pruning/lambda": lam, "pruning/prior_threshold": mgp_threshold(lam, cfg.var0, cfg.var1)}
