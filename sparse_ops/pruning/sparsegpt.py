"""SparseGPT, one-shot (docs/design.md, "One-shot pruning with calibration"): prune a layer and update
its kept weights so that its output on the calibration inputs changes as little as possible.

With H = XᵀX (X: calibration tokens × in), dampened by δ·mean(diag H)·I, and U the upper Cholesky
factor of H⁻¹, the columns are visited in blocks of B: in each block the mask is chosen on w²/U_jj²,
then column by column a pruned weight's error e = w_j/U_jj is carried to the block's later columns
(W[:, k] −= e·U_jk), and after the block to all later columns. Inputs never active (H_jj = 0) get
H_jj = 1 and their weights pruned. Everything runs in float64.
"""

from __future__ import annotations

import torch

from ..ops.keys import lowest_per_row, n_m_keep
from .schedule import rounded_count

BLOCK_SIZE = 128
DAMP = 0.01


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    n_m: tuple[int, int] | None = None, *, block_size: int = BLOCK_SIZE,
                    damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight in float64, prune-mask) of an (out, in) weight, from hessian = Σ_t x_t x_tᵀ (in × in).

    Unstructured: block [i1, i2) prunes round(s·out·i2) − round(s·out·i1) of its entries (so the
    layer's count is exactly round(s·out·in)), lowest w²/U_jj² first, ties lowest index first.
    N:M (n_m = (N, M)): in each group of M consecutive columns of a row the N highest stay."""
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    if n_m is not None:
        block_size = max(n_m[1], block_size - block_size % n_m[1])  # groups never straddle blocks
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        err = torch.zeros_like(w1)
        if n_m is None:
            count = rounded_count(sparsity, rows * i2) - rounded_count(sparsity, rows * i1)
            mask1 = lowest_per_row((w1 * w1 / (d * d)).reshape(1, -1), count).view(rows, i2 - i1)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                mask1[:, group] = ~n_m_keep(w1[:, group] ** 2 / d[group] ** 2, *n_m)
            col = w1[:, i]
            kept = col.masked_fill(mask1[:, i], 0.0)
            err[:, i] = (col - kept) / d[i]
            w1[:, i:] -= err[:, i : i + 1] * u1[i : i + 1, i:]
            w1[:, i] = kept
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    return w, mask
