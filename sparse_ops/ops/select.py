"""Exact k-th smallest key over one or many tensors by radix select (docs/design.md §2.6).

Keys are order-preserving integer images of the floats (16, 32 or 64 bits). Each level reads the
data once and histograms one 8-bit digit of the keys whose higher digits match the prefix found so
far (torch.ops.sparse_ops.radix_histogram: Triton on CUDA, C++ or PyTorch on CPU). The digit
holding the k-th key is chosen on the device, so levels run without a host round trip; one sync at
the end reads the result and the NaN count. O(n·levels), no sort, no concatenated copy. Histograms
are plain int64 tensors, so several processes can all-reduce them (`reduce=`) and agree exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from . import _checks
from .keys import KEY_BITS, NAN_BIN, RADIX_BINS, RADIX_BITS, key_to_value


@dataclasses.dataclass(frozen=True)
class Selection:
    """The k-th smallest key: its value (0-dim tensor in the inputs' dtype), how many keys are
    strictly smaller, and how many equal it."""

    value: torch.Tensor
    count_less: int
    count_equal: int


def _select_digit(hist: torch.Tensor, state: torch.Tensor) -> None:
    """state = [prefix, k_remaining]: move to the digit whose cumulative count reaches k (on device)."""
    counts = hist[:RADIX_BINS]
    cumulative = counts.cumsum(0)
    digit = (cumulative < state[1]).sum()
    below = torch.where(torch.arange(RADIX_BINS, device=hist.device) < digit, counts, 0).sum()
    state[1] -= below
    state[0] = state[0] * RADIX_BINS + digit


def radix_select(xs: Sequence[torch.Tensor], k: int, *, absolute: bool = False,
                 first_histogram: torch.Tensor | None = None,
                 reduce: Callable[[torch.Tensor], None] | None = None, name: str = "xs") -> Selection:
    """k-th smallest (1-based) of the keys of all `xs` (of |x| when absolute), exactly.

    first_histogram: the level-0 histogram if already known (fused_prune_step emits it); it saves
    one read of the data. reduce: called in place on every histogram (e.g. an all-reduce) so the
    selection spans processes. NaN anywhere raises ValueError. `name` is the argument named in errors.
    Keys treat −0.0 and +0.0 alike, so a zero result is +0.0 (see signed_zero_like_input).
    """
    xs = list(xs)
    _checks.check_tensor_list(name, xs)
    numel = sum(x.numel() for x in xs)
    if reduce is not None:
        total = torch.tensor([numel], dtype=torch.int64, device=xs[0].device)
        reduce(total)
        numel = int(total)
    _checks.check_kth(numel, k, name)
    flat = [x.reshape(-1) if x.is_contiguous() else x.contiguous().view(-1) for x in xs]
    device = xs[0].device
    levels = KEY_BITS[xs[0].dtype] // RADIX_BITS
    state = torch.tensor([0, k], dtype=torch.int64, device=device)
    nan_count = None
    last = None
    for level in range(levels):
        if level == 0 and first_histogram is not None:
            hist = first_histogram.clone()
        else:
            hist = torch.ops.sparse_ops.radix_histogram(flat, state, level, absolute)
            if reduce is not None:
                reduce(hist)
        if level == 0:
            nan_count = hist[NAN_BIN].clone()
        _select_digit(hist, state)
        last = hist
    # the last level's histogram counts full keys: the slot of the selected digit is the tie count
    prefix, k_rem, n_nan, n_equal = torch.stack([state[0], state[1], nan_count, last[state[0] % RADIX_BINS]]).tolist()
    if n_nan:
        raise ValueError(f"{name} contains {n_nan} NaN value(s); thresholds need NaN-free keys")
    key = prefix & ((1 << KEY_BITS[xs[0].dtype]) - 1)
    value = key_to_value(key, xs[0].dtype).to(device)
    return Selection(value=value, count_less=k - k_rem, count_equal=n_equal)


def signed_zero_like_input(value: torch.Tensor, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """−0.0 for a zero k-th value when every zero of `xs` is −0.0, as torch.kthvalue returns the
    element itself (where both signs occur its choice depends on its partition order; the values
    compare equal). One extra read of the data, only when the result is zero."""
    if value == 0 and not any(bool((x == 0).logical_and(~x.signbit()).any()) for x in xs):
        return -value
    return value


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Prune exactly `count` keys: every key < value, and the keys == value at global flat index
    < tie_cut (lowest indices first). Kernels keep key > value, or key == value at index ≥ tie_cut."""

    value: float
    tie_cut: int
    count: int


def prune_threshold(keys: Sequence[torch.Tensor], count: int, *, absolute: bool = False,
                    first_histogram: torch.Tensor | None = None,
                    reduce: Callable[[torch.Tensor], None] | None = None,
                    hist_keys: Sequence[torch.Tensor] | None = None) -> Threshold:
    """The threshold that prunes exactly `count` of the keys of `keys` (global over the list;
    global flat index = position in the concatenation of the flattened tensors, in list order).

    Several processes holding the same `keys` (data-parallel replicas) can split the work: each
    passes its share as `hist_keys` (e.g. keys[rank::world]) and a sum all-reduce as `reduce`; the
    histograms then cover all keys once, and ties are resolved locally over the full `keys`.
    """
    if count == 0:
        return Threshold(value=float("-inf"), tie_cut=0, count=0)
    sel = radix_select(keys if hist_keys is None else hist_keys, count, absolute=absolute,
                       first_histogram=first_histogram, reduce=reduce)
    value = float(sel.value)
    ties_to_prune = count - sel.count_less
    if ties_to_prune == sel.count_equal:
        return Threshold(value=value, tie_cut=sum(k.numel() for k in keys), count=count)
    # Only some of the ties go: find the global index of the ties_to_prune-th tie (one extra pass,
    # needed only in this case).
    offset = 0
    remaining = ties_to_prune
    for k in keys:
        equal = (k.abs() if absolute else k).reshape(-1) == sel.value
        n_eq = int(equal.sum())
        if remaining <= n_eq:
            position = int(torch.nonzero(equal)[remaining - 1])
            return Threshold(value=value, tie_cut=offset + position + 1, count=count)
        remaining -= n_eq
        offset += k.numel()
    raise AssertionError("tie accounting failed: the keys changed during the selection?")
