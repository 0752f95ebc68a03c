"""Gradual magnitude pruning (Zhu & Gupta's cubic schedule): the baseline of every paper.

At t_i and every Δt (`interval`) steps until t_e, prune the s(t) smallest |w| (per element), block
L2 norms (per block) or the 2 smallest of every 4 (2:4), over all targets (global scope) or per
matrix (local). The mask persists between events: gradients of pruned weights are zeroed and the
weights are re-zeroed after every optimizer step. One fused pass per matrix and step
(torch.ops.sparse_ops.fused_prune_step); the threshold is exact (radix select).

magnitude_mask is the one-shot form, the baseline of sparse_ops.oneshot.
"""

from __future__ import annotations

import torch

from ..ops.keys import lowest_per_row, n_m_keep
from .base import KEEP_ALL, PruningMethod
from .schedule import rounded_count


class Magnitude(PruningMethod):
    name = "magnitude"

    def is_event(self, step: int) -> bool:
        """A pruning event: t_i, every Δt after it, and t_e."""
        s = self.pruner.schedule
        return s.t_i <= step <= s.t_e and ((step - s.t_i) % self.config.interval == 0 or step == s.t_e)

    def mask_enforced(self, step: int) -> bool:
        """Is the mask applied at `step`? From t_i on."""
        return step >= self.pruner.schedule.t_i

    def prior_args(self, step: int) -> dict:
        """Extra fused-pass arguments (MGPP adds its prior)."""
        return {}

    def after_backward(self) -> None:
        p, step = self.pruner, self.pruner.step
        event, enforced = self.is_event(step), self.mask_enforced(step)
        for group in p.groups():
            thr = KEEP_ALL
            if event and p.granularity != "2:4":  # 2:4 needs no threshold: the kernel picks 2 of 4
                keys = [p.keys(t, t.matrix, squared=True) for t in group]
                thr = p.select(keys, p.count(group, step))
            for t in group:
                torch.ops.sparse_ops.fused_prune_step(
                    t.matrix, t.matrix_grad, None, t.mask, None, keys_from_scores=False, threshold=thr.value,
                    tie_cut=thr.tie_cut, mask_grad=enforced, mask_weight=event, reuse_mask=enforced and not event,
                    **self.prior_args(step), **p.kernel_args(t))

    def after_optimizer_step(self) -> None:
        if self.mask_enforced(self.pruner.step):
            with torch.no_grad():
                for t in self.pruner.targets:
                    t.matrix.masked_fill_(~t.mask, 0.0)

    def pruned_count(self, t) -> int:
        return int((t.weight == 0).sum())


def magnitude_mask(weight: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """One-shot magnitude pruning of one matrix: prune-mask (True = pruned) of its round(s·numel)
    smallest |w| (ties: lowest flat index first), or, with n_m = (N, M), all but the N largest of
    every M consecutive entries of a row."""
    keys = weight.detach().abs()
    if n_m is not None:
        return ~n_m_keep(keys, *n_m)
    return lowest_per_row(keys.reshape(1, -1), rounded_count(sparsity, keys.numel())).view(keys.shape)
