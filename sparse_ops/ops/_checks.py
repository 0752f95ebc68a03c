"""Input checks shared by every op: each error names the argument and what was expected (docs/design.md §4)."""

from __future__ import annotations

import math

import torch

from .prior import check_prior_args
from .keys import GRANULARITIES, KEY_BITS, RADIX_BINS

FLOAT_DTYPES = tuple(KEY_BITS)


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}")


def check_finite_scalar(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_tensor_list(name: str, xs) -> None:
    if not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise ValueError(f"{name} must be a non-empty list of tensors")
    for i, x in enumerate(xs):
        check_float_tensor(f"{name}[{i}]", x)
        if x.dtype != xs[0].dtype:
            raise TypeError(f"{name}[{i}] has dtype {x.dtype} but {name}[0] has {xs[0].dtype}; all must match")
        if x.device != xs[0].device:
            raise ValueError(f"{name}[{i}] is on {x.device} but {name}[0] is on {xs[0].device}; all must match")


def check_kth(numel: int, k: int, name: str) -> None:
    if numel == 0:
        raise ValueError(f"{name} is empty: kthvalue needs at least one element")
    if not 1 <= k <= numel:
        raise ValueError(f"k must lie in [1, {numel}] (1-based, numel of {name}), got {k}")


def _check_same(name: str, t, weight: torch.Tensor, dtype=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != weight.shape:
        raise ValueError(f"{name} must have the shape of weight {tuple(weight.shape)}, got {tuple(t.shape)}")
    if t.device != weight.device:
        raise ValueError(f"{name} must be on the device of weight ({weight.device}), got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def check_fused_args(weight, grad, scores, mask, histogram, score_exp_avg=None, score_exp_avg_sq=None, *,
                     keys_from_scores=False, strict_threshold=False,
                     granularity="element", block_rows=1, block_cols=1, threshold=0.0, tie_cut=0, index_offset=0,
                     prior_scale=0.0, lam=0.1, var0=1e-10, var1=0.05, score_lr=0.0, sigmoid_l1=0.0, score_step=0,
                     score_beta1=0.9, score_beta2=0.999, score_eps=1e-8, mask_grad=True, mask_weight=False,
                     reuse_mask=False) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    check_float_tensor("weight", weight)
    _check_same("grad", grad, weight, weight.dtype)
    _check_same("mask", mask, weight, torch.bool)
    if scores is None:
        if keys_from_scores:
            raise ValueError("scores is required when keys_from_scores is true")
        if score_lr != 0.0:
            raise ValueError("score_lr is non-zero but scores is None")
    else:
        check_float_tensor("scores", scores)
        _check_same("scores", scores, weight)
    _check_adam(scores, score_exp_avg, score_exp_avg_sq, score_step, score_beta1, score_beta2, score_eps)
    if histogram is not None:
        if not keys_from_scores:
            raise ValueError("histogram is only emitted when keys_from_scores is true (the next selection's keys)")
        if histogram.dtype != torch.int64 or tuple(histogram.shape) != (RADIX_BINS + 1,):
            raise ValueError(f"histogram must be int64 of shape ({RADIX_BINS + 1},), got {histogram.dtype} {tuple(histogram.shape)}")
        if histogram.device != weight.device:
            raise ValueError(f"histogram must be on the device of weight ({weight.device}), got {histogram.device}")
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if granularity == "element" and (block_rows, block_cols) != (1, 1):
        raise ValueError(f"block_rows and block_cols must be 1 for granularity='element', got ({block_rows}, {block_cols})")
    if granularity in ("block", "2:4") and weight.dim() != 2:
        raise ValueError(f"weight must be 2-D for granularity={granularity!r}, got shape {tuple(weight.shape)}")
    if granularity == "2:4" and weight.shape[-1] % 4 != 0:
        raise ValueError(f"weight.shape[-1] must be a multiple of 4 for granularity='2:4', got {weight.shape[-1]}")
    if isinstance(threshold, float) and math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    for name, value in (("tie_cut", tie_cut), ("index_offset", index_offset)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    check_finite_scalar("prior_scale", prior_scale)
    check_finite_scalar("score_lr", score_lr)
    check_finite_scalar("sigmoid_l1", sigmoid_l1)
    if prior_scale != 0.0:
        check_prior_args(lam, var0, var1)


def _check_adam(scores, exp_avg, exp_avg_sq, step, beta1, beta2, eps) -> None:
    """The Adam moments of the scores: both or neither, with the scores' shape, device and dtype
    (float32 or float64)."""
    if (exp_avg is None) != (exp_avg_sq is None):
        raise ValueError("score_exp_avg and score_exp_avg_sq must be given together (Adam on the scores) or "
                         "both be None (the first-order update)")
    if exp_avg is None:
        return
    if scores is None:
        raise ValueError("score_exp_avg is given but scores is None")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"scores must be float32 or float64 when they learn by Adam, got {scores.dtype}")
    for name, t in (("score_exp_avg", exp_avg), ("score_exp_avg_sq", exp_avg_sq)):
        _check_same(name, t, scores, scores.dtype)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"score_step must be an int >= 1 (the 1-based Adam step) when moments are given, got {step!r}")
    for name, value in (("score_beta1", beta1), ("score_beta2", beta2)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"score_eps must be a finite number >= 0, got {eps!r}")


def check_compressed_counts(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int,
                            context: str = "") -> None:
    """The counts a compressed (CSR/BSR) triple must agree on: rows + 1 row pointers, and one column
    index per stored value (or block). O(1); the op checks it on every call, the layers at load
    (with the O(nnz) structure, sparse_ops/sparse/formats.check_compressed). context prefixes the
    message (e.g. "encoder.layer.0.output.dense: ")."""
    if crow.numel() != rows + 1:
        raise ValueError(f"{context}crow_indices must have {rows + 1} entries for {rows} rows, got {crow.numel()}")
    nnz = values.shape[0] if values.dim() > 0 else -1
    if col.numel() != nnz:
        raise ValueError(f"{context}col_indices has {col.numel()} entries but values has {nnz}; they must match")
