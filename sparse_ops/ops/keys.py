"""Keys and masks: the float-order keys of the radix select, block keys, and the keep-masks a
threshold or the 2:4 rule gives. Shared by the selection, the pruning methods, the kernels'
launchers and the references (sparse_ops/ops/reference.py), so all of them order and cut alike."""

from __future__ import annotations

import torch

GRANULARITIES = ("element", "block", "2:4")
RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
NAN_BIN = RADIX_BINS  # histogram slot counting NaN (level 0 only)
KEY_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
_INT_VIEW = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def order_keys(x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Map floats to int64 keys whose unsigned order is the float order (−0 and +0 map alike).

    For 16/32-bit floats the keys are non-negative; for float64 they are the 64-bit unsigned key
    reinterpreted as int64 (so compare digits, not signed values).
    """
    bits = KEY_BITS[x.dtype]
    if absolute:
        x = x.abs()
    x = torch.where(x == 0, torch.zeros_like(x), x)  # canonical +0
    u = x.contiguous().view(_INT_VIEW[bits]).to(torch.int64)
    if bits < 64:
        u = u & ((1 << bits) - 1)
        sign = 1 << (bits - 1)
        return torch.where(u & sign != 0, (~u) & ((1 << bits) - 1), u | sign)
    sign = torch.tensor(-(1 << 63), dtype=torch.int64)
    return torch.where(u < 0, ~u, u ^ sign)


def key_to_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of order_keys (signed form) for one key: a 0-dim tensor of `dtype`."""
    bits = KEY_BITS[dtype]
    sign = 1 << (bits - 1)
    raw = key ^ sign if key & sign else (~key) & ((1 << bits) - 1)
    if raw >= sign:  # back to the signed integer the view expects
        raw -= 1 << bits
    return torch.tensor(raw, dtype=_INT_VIEW[bits]).view(dtype)


def block_keys(t: torch.Tensor, block_rows: int, block_cols: int, squared: bool) -> torch.Tensor:
    """One key per (block_rows × block_cols) block of a 2-D tensor (edge blocks are partial).

    squared=True: Σ t² (the squared L2 norm, ordered like the norm); False: Σ t. Summed in float64
    and rounded once to float32, so every implementation produces the same bits.
    """
    rows, cols = t.shape
    nbr, nbc = -(-rows // block_rows), -(-cols // block_cols)
    padded = torch.zeros(nbr * block_rows, nbc * block_cols, dtype=torch.float64, device=t.device)
    padded[:rows, :cols] = t.to(torch.float64)
    if squared:
        padded = padded * padded
    return padded.view(nbr, block_rows, nbc, block_cols).sum(dim=(1, 3)).to(torch.float32)


def expand_block_mask(block_mask: torch.Tensor, shape: tuple[int, int], block_rows: int, block_cols: int) -> torch.Tensor:
    full = block_mask.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
    return full[: shape[0], : shape[1]]


def threshold_keep(keys: torch.Tensor, threshold: float, tie_cut: int, index_offset: int, strict: bool) -> torch.Tensor:
    """Keep key > threshold; a key equal to it is kept iff its global flat index ≥ tie_cut
    (never when strict). Global index = index_offset + position in keys.flatten()."""
    flat = keys.flatten()
    thr = torch.tensor(threshold, dtype=flat.dtype, device=flat.device)
    keep = flat > thr
    if not strict:
        index = index_offset + torch.arange(flat.numel(), device=flat.device)
        keep |= (flat == thr) & (index >= tie_cut)
    return keep.view(keys.shape)


def two_four_keep(keys: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest keys of every 4 consecutive along the last dim (n_m_keep with 2:4)."""
    return n_m_keep(keys, 2, 4)


def n_m_keep(keys: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest keys of every m consecutive along the last dim (which m divides); among
    equal keys the lower index is pruned first."""
    groups = keys.reshape(-1, m)
    # rank r = number of group members that sort before this one under (key, index)
    a, b = groups.unsqueeze(2), groups.unsqueeze(1)
    idx = torch.arange(m, device=keys.device)
    before = (b < a) | ((b == a) & (idx.view(1, 1, m) < idx.view(1, m, 1)))
    return (before.sum(dim=2) >= m - n).view(keys.shape)


def lowest_per_row(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Prune-mask (True = pruned) of the `count` lowest keys of each row of a 2-D tensor: every key
    below the row's count-th smallest, plus as many of the keys equal to it as needed, lowest index
    first. O(n) per row (torch.kthvalue), no sort."""
    rows, cols = keys.shape
    if count <= 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    if count >= cols:
        return torch.ones_like(keys, dtype=torch.bool)
    kth = keys.kthvalue(count, dim=1, keepdim=True).values
    below = keys < kth
    ties = keys == kth
    need = count - below.sum(dim=1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=1) <= need))


def adam_constants(score_lr: float, score_step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(step_size, sqrt of the second bias correction) of the bias-corrected Adam step number
    `score_step` (1-based), computed in float64 as torch.optim.Adam computes them."""
    return score_lr / (1.0 - beta1 ** score_step), (1.0 - beta2 ** score_step) ** 0.5
