"""Wanda, one-shot (docs/design.md, "One-shot pruning with calibration"): prune by |W_ij|·‖X_:,j‖₂.

W is (out, in) and X the layer's calibration inputs (tokens × in); the score of a weight is its
magnitude times the L2 norm of the input feature it multiplies. Each output row loses its
round(s·in) lowest scores (N:M: in each group of M consecutive inputs of a row the N highest stay).
Kept weights do not change.
"""

from __future__ import annotations

import torch

from ..ops.keys import lowest_per_row, n_m_keep
from .schedule import rounded_count


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_:,j‖₂ in float64; input_sq_sum[j] = Σ_t X_tj² over the calibration tokens."""
    return weight.double().abs() * input_sq_sum.double().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, sparsity: float,
               n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Prune-mask (True = pruned) of an (out, in) weight: per row the round(sparsity·in) lowest
    scores (ties: lowest index first), or, with n_m = (N, M), all but the N highest of each M-group."""
    scores = wanda_scores(weight, input_sq_sum)
    if n_m is not None:
        return ~n_m_keep(scores, *n_m)
    return lowest_per_row(scores, rounded_count(sparsity, weight.shape[1]))
