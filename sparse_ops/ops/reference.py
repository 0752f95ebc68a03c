"""Plain-PyTorch references of every op: the CPU fallback, the test oracle and the benchmark baseline.

They are written for clarity, not speed, and share no code with the Triton or C++ kernels.
Numerics: everything is computed in float32 (float64 for float64 inputs) and stored back in the
input's dtype.
"""

from __future__ import annotations

import torch

from .keys import (GRANULARITIES, KEY_BITS, NAN_BIN, RADIX_BINS, RADIX_BITS, adam_constants,  # noqa: F401
                   block_keys, expand_block_mask, key_to_value, order_keys, threshold_keep, two_four_keep)
from .prior import mgp_constants


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# 3.1 prior gradient
# ---------------------------------------------------------------------------------------------
def mgp_prior_grad_ref(w: torch.Tensor, lam: float, var0: float, var1: float, scale: float = 1.0) -> torch.Tensor:
    """scale · θ·(p0/v0 + (1−p0)/v1), p0 = sigmoid(−(c2θ² + c1)); fp32 math, returned in w.dtype."""
    c1, c2, inv0, inv1 = mgp_constants(lam, var0, var1)
    theta = w.to(compute_dtype(w.dtype))
    p0 = torch.sigmoid(-(c2 * theta * theta + c1))
    return (scale * theta * (p0 * inv0 + (1.0 - p0) * inv1)).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# 3.5 order keys and selection
# ---------------------------------------------------------------------------------------------
def kthvalue_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(x.flatten(), k).values


def radix_histogram_ref(xs: list[torch.Tensor], state: torch.Tensor, level: int, absolute: bool) -> torch.Tensor:
    """Histogram of the 8-bit digit `level` (0 = most significant) of the order keys of all `xs`,
    counting only keys whose higher digits equal state[0]. Slot 256 counts NaN (level 0 only)."""
    bits = KEY_BITS[xs[0].dtype]
    shift = bits - RADIX_BITS * (level + 1)
    hist = torch.zeros(RADIX_BINS + 1, dtype=torch.int64, device=state.device)
    prefix = int(state[0])
    for x in xs:
        flat = x.flatten()
        keys = order_keys(flat, absolute)
        digits = (keys >> shift) & (RADIX_BINS - 1)
        keep = ~torch.isnan(flat)
        if level > 0:
            high = keys >> (shift + RADIX_BITS)
            if bits == 64:
                high = high & ((1 << (64 - shift - RADIX_BITS)) - 1)
            keep &= high == prefix
        hist[:RADIX_BINS] += torch.bincount(digits[keep], minlength=RADIX_BINS).to(hist.device)
        if level == 0:
            hist[NAN_BIN] += int(torch.isnan(flat).sum())
    return hist


# ---------------------------------------------------------------------------------------------
# 3.3/3.4 keys, masks and the fused step
# ---------------------------------------------------------------------------------------------
def prune_keys_ref(weight: torch.Tensor, scores: torch.Tensor | None, keys_from_scores: bool, granularity: str,
                   block_rows: int, block_cols: int) -> torch.Tensor:
    """The keys a mask is thresholded on: |w|, or the scores when keys_from_scores; per block: Σw² or
    Σscores (keys.block_keys)."""
    source = scores if keys_from_scores else weight
    if granularity == "block":
        return block_keys(source, block_rows, block_cols, squared=not keys_from_scores)
    return source if keys_from_scores else source.abs()


def fused_prune_step_ref(weight, grad, scores, mask, histogram, score_exp_avg=None, score_exp_avg_sq=None, *,
                         keys_from_scores=False, strict_threshold=False, granularity="element", block_rows=1, block_cols=1, threshold=0.0, tie_cut=0,
                         index_offset=0, prior_scale=0.0, lam=0.1, var0=1e-10, var1=0.05, score_lr=0.0,
                         sigmoid_l1=0.0, score_step=0, score_beta1=0.9, score_beta2=0.999, score_eps=1e-8,
                         mask_grad=True, mask_weight=False, reuse_mask=False) -> None:
    """Reference of torch.ops.sparse_ops.fused_prune_step (see sparse_ops/ops/__init__.py for the contract).

    Scores learn from G = ∂L/∂W'⊙W (+ sigmoid_l1·σ(S)(1−σ(S)), the soft-movement penalty), by
    S ← S − score_lr·G without moment buffers, or by torch.optim.Adam's bias-corrected step number
    `score_step` with them (no weight decay), in the order torch's single-tensor Adam computes it:
    m ← m + (1−β1)(G−m); v ← β2·v + (1−β2)·G·G; S ← S − (lr/(1−β1^t))·m / (√v/√(1−β2^t) + eps)."""
    keys = prune_keys_ref(weight, scores, keys_from_scores, granularity, block_rows, block_cols)
    if reuse_mask:  # a fixed mask: keep what `mask` already keeps
        keep = mask.clone()
    elif granularity == "2:4":
        keep = two_four_keep(keys)
    else:
        keep = threshold_keep(keys, threshold, tie_cut, index_offset, strict=strict_threshold)
        if granularity == "block":
            keep = expand_block_mask(keep, tuple(weight.shape), block_rows, block_cols)
    ct = compute_dtype(weight.dtype)
    w, g = weight.to(ct), grad.to(ct)
    if scores is not None and score_lr != 0.0:
        s = scores.to(ct)
        score_grad = g * w
        if sigmoid_l1 != 0.0:  # ∂/∂S of sigmoid_l1·Σ sigmoid(S): the soft-movement L1 penalty
            sig = torch.sigmoid(s)
            score_grad = score_grad + sigmoid_l1 * sig * (1.0 - sig)
        if score_exp_avg is None:
            scores.copy_(s - score_lr * score_grad)
        else:
            step_size, bias2_sqrt = adam_constants(score_lr, score_step, score_beta1, score_beta2)
            m = score_exp_avg.to(ct)
            m = m + (1.0 - score_beta1) * (score_grad - m)
            v = score_exp_avg_sq.to(ct) * score_beta2 + ((1.0 - score_beta2) * score_grad) * score_grad
            scores.copy_(s + (-step_size * m) / (v.sqrt() / bias2_sqrt + score_eps))
            score_exp_avg.copy_(m)
            score_exp_avg_sq.copy_(v)
    new_grad = g.masked_fill(~keep, 0.0) if mask_grad else g
    if prior_scale != 0.0:
        new_grad = new_grad + mgp_prior_grad_ref(w, lam, var0, var1, prior_scale)
    grad.copy_(new_grad)
    if mask_weight:
        weight.masked_fill_(~keep, 0.0)
    mask.copy_(keep)
    if histogram is not None:
        next_keys = prune_keys_ref(weight, scores, keys_from_scores, granularity, block_rows, block_cols)
        state = torch.zeros(2, dtype=torch.int64, device=histogram.device)
        histogram += radix_histogram_ref([next_keys], state, 0, absolute=False)[: histogram.numel()]


# ---------------------------------------------------------------------------------------------
# sparse linear layers (inference): y = x @ Wᵀ + bias with W stored as CSR or BSR
# ---------------------------------------------------------------------------------------------
def csr_to_dense_ref(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense (rows, cols) matrix of a CSR triple (int32 or int64 indices), in values.dtype."""
    rows = torch.repeat_interleave(torch.arange(shape[0], device=values.device), (crow[1:] - crow[:-1]).long())
    dense = values.new_zeros(shape)
    dense[rows, col.long()] = values
    return dense


def bsr_to_dense_ref(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense (rows, cols) matrix of a BSR triple with blocks values[i] of shape (br, bc); the block grid
    covers ceil(rows/br) × ceil(cols/bc) blocks and whatever lies past (rows, cols) is dropped."""
    br, bc = values.shape[1], values.shape[2]
    nbr, nbc = -(-shape[0] // br), -(-shape[1] // bc)
    block_rows = torch.repeat_interleave(torch.arange(nbr, device=values.device), (crow[1:] - crow[:-1]).long())
    grid = values.new_zeros(nbr, nbc, br, bc)
    grid[block_rows, col.long()] = values
    return grid.permute(0, 2, 1, 3).reshape(nbr * br, nbc * bc)[: shape[0], : shape[1]]


def _linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    cdt = compute_dtype(x.dtype)
    y = x.to(cdt) @ weight.to(cdt).T
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype)


def csr_linear_ref(x, crow, col, values, bias, out_features: int) -> torch.Tensor:
    """x @ Wᵀ + bias for W in CSR (rows = output features); float32 math (float64 for float64), one rounding."""
    return _linear_ref(x, csr_to_dense_ref(crow, col, values, (out_features, x.shape[-1])), bias)


def bsr_linear_ref(x, crow, col, values, bias, out_features: int) -> torch.Tensor:
    """x @ Wᵀ + bias for W in BSR (block rows = output features); float32 math (float64 for float64)."""
    return _linear_ref(x, bsr_to_dense_ref(crow, col, values, (out_features, x.shape[-1])), bias)
