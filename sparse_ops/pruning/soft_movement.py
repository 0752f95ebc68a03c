"""Soft movement pruning (Sanh, Wolf, Rush 2020; docs/design.md §2.3).

The scores learn as hard movement's do (Adam by default, see movement.py; the magnitude start is
scaled by `init_scale` below), and the mask is a
threshold instead of a TopK: M = (S > τ) per key (element, or block sum of scores). The loss gains
λ_mvp·mean(sigmoid(S)) over all N targeted weights, which the fused pass folds into the score
gradient as (λ_mvp/N)·σ(S)(1 − σ(S)). No key count is forced: the sparsity is whatever S > τ
gives, set by λ_mvp. Each matrix keeps at least soft_min_keep of its keys, plus one (the top
scores), as the reference keeps 0.5% + 1.

Before t_i nothing is masked. At t_i, τ is set just below the lowest key (unless `soft_threshold`
fixes it), so the first mask still keeps everything. λ_mvp then either
  * follows the schedule, λ_mvp(t) = soft_l1 · s(t)/s_f (when `soft_l1` is given: the reference's
    fixed final λ, whatever sparsity it reaches), or
  * by default is steered so the sparsity tracks the schedule s(t), cool-down included: every step,
    log λ_mvp += KI·(s(t+H) − the sparsity S > τ would give if every score kept its current Adam step
    for H steps), by at most ±MAX_LOG_STEP. The projection leads the sparsity by about the lag of
    Adam's momentum, which keeps λ_mvp from overshooting (a controller on the sparsity reached now
    overshoots). λ_mvp starts at t_i with the penalty's gradient at the median |∂L/∂W'⊙W|. The
    sparsity is reported, not forced (the sparsity each run reached is in its results).
"""

from __future__ import annotations

import math

import torch

from ..ops.select import Threshold
from .base import KEEP_ALL
from .movement import Movement, keep_top

KI = 5.0             # log λ_mvp += KI·(s(t+H) − projected sparsity at t+H) per step ...
MAX_LOG_STEP = 0.1   # ... by at most ±10% per step
HORIZON = 10         # H: steps ahead the sparsity is projected (about Adam's momentum memory, 1/(1−β1))
SAMPLE = 1 << 16     # gradient entries sampled per matrix to start λ_mvp


class SoftMovement(Movement):
    name = "soft_movement"
    selects_from_histograms = False  # a threshold τ, no TopK

    def __init__(self, pruner):
        self.tau: float | None = None
        self.lam = 0.0    # λ_mvp of this step
        self.level = 0.0  # the controller's integrated λ_mvp level (λ0 at t_i)
        self.start = 0.0  # λ0
        self.numel = sum(t.mask.numel() for t in pruner.targets)
        super().__init__(pruner)

    def init_scale(self) -> float:
        """The magnitude start spans an eighth of the farthest an Adam-trained score can travel over
        the ramp (score_lr per step), so the penalty can still carry the weights τ must prune below it
        (|w|/std(|w|) itself spans about 3, more than 250 steps at 1e-2 can move). An eighth, chosen on a
        test layer: wider starts overshoot the target, narrower ones fall short."""
        sched = self.pruner.schedule
        return self.config.score_lr * (sched.t_e - sched.t_i) / 8

    # -- masks ----------------------------------------------------------------------------------
    def set_rules(self, g: int, group: list, step: int) -> None:
        if step < self.pruner.schedule.t_i:
            for t in group:
                t.rule = ("", KEEP_ALL)
            return
        if self.tau is None:
            self.tau = self._start_threshold()
        cfg = self.config
        for t in group:
            keys = self.score_keys(t)
            kept = int((keys > self.tau).sum())
            floor = min(t.num_keys, math.ceil(cfg.soft_min_keep * t.num_keys) + 1)
            if kept >= floor:
                t.rule = (self.name, Threshold(value=self.tau, tie_cut=0, count=t.num_keys - kept))
            else:  # keep the top `floor` keys of this matrix
                t.rule = ("movement", keep_top(keys, floor, t.index_offset))

    def _start_threshold(self) -> float:
        if self.config.soft_threshold is not None:
            return float(self.config.soft_threshold)
        lowest = min(float(self.score_keys(t).min()) for t in self.pruner.targets)
        return math.nextafter(lowest, -math.inf)

    # -- λ_mvp ----------------------------------------------------------------------------------
    def after_backward(self) -> None:
        p, cfg = self.pruner, self.config
        step = p.step
        if step >= p.schedule.t_i and cfg.sparsity > 0:
            if cfg.soft_l1 is not None:
                self.lam = cfg.soft_l1 * p.schedule.sparsity(step) / cfg.sparsity
            else:
                if self.start == 0.0:
                    self.start = self.level = self._start_lambda()
                error = p.schedule.sparsity(step + HORIZON) - self.projected(HORIZON)
                self.level *= math.exp(max(-MAX_LOG_STEP, min(MAX_LOG_STEP, KI * error)))
                self.lam = self.level
        super().after_backward()

    def _start_lambda(self) -> float:
        """λ_mvp whose penalty gradient, at σ' = ¼, equals the median |∂L/∂W'⊙W| (sampled)."""
        samples = []
        for t in self.pruner.targets:
            g, w = t.weight.grad.reshape(-1), t.weight.detach().reshape(-1)
            stride = max(1, g.numel() // SAMPLE)
            samples.append((g[::stride].float() * w[::stride].float()).abs())
        median = float(torch.cat(samples).median())
        return 4.0 * self.numel * max(median, 1e-30)

    def projected(self, horizon: int) -> float:
        """Fraction of the targeted weights S > τ would prune if every score kept moving for `horizon`
        steps as its last update did (Adam: the current step −lr·m̂/(√v̂ + eps); first-order: none).
        It leads the sparsity by about the lag of Adam's momentum, which keeps λ_mvp from overshooting."""
        if not self.adam or self.score_step == 0:
            return self.reached()
        cfg, p = self.config, self.pruner
        beta1, beta2 = cfg.score_betas
        scale = horizon * cfg.score_lr * p.lr_ratio() / (1.0 - beta1 ** self.score_step)
        bias2 = math.sqrt(1.0 - beta2 ** self.score_step)
        pruned = 0
        for t in p.targets:
            ahead = t.scores - scale * t.exp_avg / (t.exp_avg_sq.sqrt() / bias2 + cfg.score_eps)
            keep = p.keys(t, ahead, squared=False) > self.tau
            kept = int(keep.sum()) * (t.mask.numel() // t.num_keys if p.granularity == "block" else 1)
            pruned += t.mask.numel() - min(kept, t.mask.numel())
        return pruned / self.numel

    def reached(self) -> float:
        """Fraction of the targeted weights the current masks prune."""
        return sum(self.pruned_count(t) for t in self.pruner.targets) / self.numel

    def sigmoid_l1(self) -> float:
        return self.lam / self.numel

    # -- logging and state ----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        out = {"pruning/lambda_mvp": self.lam}
        if self.tau is not None:
            out["pruning/threshold"] = self.tau
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tau": self.tau, "lambda_mvp": self.lam, "level": self.level,
                "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tau, self.lam, self.level, self.start = state["tau"], state["lambda_mvp"], state["level"], state["start"]
