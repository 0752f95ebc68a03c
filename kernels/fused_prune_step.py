"""The single-pass pruning step in Triton (contract: sparse_ops/ops/__init__.py, reference:
sparse_ops/ops/reference.py fused_prune_step_ref).

One read of weight, grad (and scores, and the scores' Adam moments) and one write of grad, mask
(and scores and moments, and weight when it is masked) per element. In that pass: the mask from
the entry keys (|w| or scores, per element, per block or 2:4) against the selected threshold with
index tie-break; the movement update of the scores from the raw gradient G = g·w (+ the
soft-movement penalty sigmoid_l1·σ(s)(1−σ(s))), first-order S ← S − lr·G, or, with the moment
buffers, torch.optim.Adam's bias-corrected step; the masked gradient plus the scaled prior
gradient; and the level-0 radix histogram of the updated keys for the next selection.
Numerics: float32 arithmetic in the reference's operation order, with FMA contraction disabled
(enable_fp_fusion=False); block keys summed in float64 and rounded once to float32. Adam (float32
scores and moments): step_size = lr/(1−β1^t) and √(1−β2^t) are computed in float64 on the host
(adam_constants) and passed, like 1−β1, β2, 1−β2 and eps, as float32 scalars; then
m ← m + (1−β1)(G−m); v ← v·β2 + ((1−β2)·G)·G; S ← S + (−step_size·m) / (√v/√(1−β2^t) + eps),
with IEEE-rounded sqrt and division (tl.sqrt_rn, tl.div_rn), so the scores and moments match the
reference to about an ulp (torch's own sqrt on CPU and division by a scalar on CUDA are not always
correctly rounded; under the interpreter the moments of the movement method are bit for bit).
"""

import torch
import triton
import triton.language as tl

from sparse_ops.ops.prior import mgp_constants
from sparse_ops.ops.keys import KEY_BITS, RADIX_BINS, adam_constants

from . import _runtime  # noqa: F401  (first: see its docstring)
from ._numerics import on_device, round_to
from .kthvalue import INF_BITS, SLOTS, order_key
from .mgp_prior_grad import prior_grad

ELEMENT_BLOCK = 1024
GROUPS_24 = 256  # groups of 4 per program for 2:4


@triton.jit
def _adam(s, m_raw, v_raw, score_grad, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt,
          eps):
    """torch.optim.Adam's bias-corrected step on float32 s: new (s, m, v), in the reference's order."""
    m = m_raw.to(tl.float32)
    m = m + one_minus_beta1 * (score_grad - m)
    v = v_raw.to(tl.float32) * beta2 + (one_minus_beta2 * score_grad) * score_grad
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    return s + tl.div_rn(neg_step_size * m, denom), m, v


@triton.jit
def _update(w_raw, g_raw, s_raw, m_raw, v_raw, keep, prior_scale, c1, c2, inv0, inv1, score_lr, sigmoid_l1,
            one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps,
            UPDATE_SCORES: tl.constexpr, ADAM: tl.constexpr, SIGMOID_L1: tl.constexpr, ADD_PRIOR: tl.constexpr,
            MASK_GRAD: tl.constexpr, MASK_WEIGHT: tl.constexpr):
    """New (grad, scores, weight, exp_avg, exp_avg_sq) values, in float32 / storage dtypes as noted."""
    w = w_raw.to(tl.float32)
    g = g_raw.to(tl.float32)
    s_new = s_raw
    m_new = m_raw
    v_new = v_raw
    if UPDATE_SCORES:
        s = s_raw.to(tl.float32)
        score_grad = g * w
        if SIGMOID_L1:
            sig = 1.0 / (1.0 + tl.exp(-s))
            score_grad = score_grad + sigmoid_l1 * sig * (1.0 - sig)
        if ADAM:
            s_upd, m_new, v_new = _adam(s, m_raw, v_raw, score_grad, one_minus_beta1, beta2, one_minus_beta2,
                                        neg_step_size, bias2_sqrt, eps)
            s_new = round_to(s_upd, s_raw.dtype)
        else:
            s_new = round_to(s - score_lr * score_grad, s_raw.dtype)
    g_new = g
    if MASK_GRAD:
        g_new = tl.where(keep, g, 0.0)
    if ADD_PRIOR:
        g_new = g_new + prior_scale * prior_grad(w, c1, c2, inv0, inv1)
    w_new = w_raw
    if MASK_WEIGHT:
        w_new = tl.where(keep, w_raw, 0.0).to(w_raw.dtype)
    return g_new, s_new, w_new, m_new, v_new


@triton.jit
def _load(w_ptr, g_ptr, s_ptr, ea_ptr, eas_ptr, offs, inside, HAS_SCORES: tl.constexpr, ADAM: tl.constexpr):
    """Raw weight, grad, scores and Adam moments (the weight stands in for absent scores, the
    scores for absent moments)."""
    w_raw = tl.load(w_ptr + offs, mask=inside, other=0.0)
    g_raw = tl.load(g_ptr + offs, mask=inside, other=0.0)
    s_raw = w_raw
    if HAS_SCORES:
        s_raw = tl.load(s_ptr + offs, mask=inside, other=0.0)
    m_raw = s_raw
    v_raw = s_raw
    if ADAM:
        m_raw = tl.load(ea_ptr + offs, mask=inside, other=0.0)
        v_raw = tl.load(eas_ptr + offs, mask=inside, other=0.0)
    return w_raw, g_raw, s_raw, m_raw, v_raw


@triton.jit
def _element_key(w_raw, s_raw, KEY_FROM_SCORES: tl.constexpr):
    """The scores (keys_from_scores) or |w|, as float32 (exact for every input dtype)."""
    if KEY_FROM_SCORES:
        return s_raw.to(tl.float32)
    return tl.abs(w_raw).to(tl.float32)


@triton.jit
def _store(w_ptr, g_ptr, s_ptr, m_ptr, ea_ptr, eas_ptr, offs, inside, w_new, g_new, s_new, keep, ea_new, eas_new,
           UPDATE_SCORES: tl.constexpr, ADAM: tl.constexpr, MASK_WEIGHT: tl.constexpr):
    """Write grad and mask, and scores, moments and weight where they changed."""
    tl.store(g_ptr + offs, round_to(g_new, g_ptr.dtype.element_ty), mask=inside)
    tl.store(m_ptr + offs, keep, mask=inside)
    if UPDATE_SCORES:
        tl.store(s_ptr + offs, s_new, mask=inside)
        if ADAM:
            tl.store(ea_ptr + offs, round_to(ea_new, ea_ptr.dtype.element_ty), mask=inside)
            tl.store(eas_ptr + offs, round_to(eas_new, eas_ptr.dtype.element_ty), mask=inside)
    if MASK_WEIGHT:
        tl.store(w_ptr + offs, w_new, mask=inside)


@triton.jit
def _store_histogram(hist_ptr, keys_raw, valid, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr,
                     SLOTS: tl.constexpr, NUMEL: tl.constexpr):
    """Add the level-0 digit histogram of the NUMEL float keys (NaN to slot 256) to hist_ptr."""
    if KEY_BITS == 16:
        raw = keys_raw.to(tl.int16, bitcast=True)
    else:
        raw = keys_raw.to(tl.int32, bitcast=True)
    key, is_nan = order_key(raw, KEY_BITS, INF_BITS, False)
    slot = tl.where(is_nan, 256, (key >> (KEY_BITS - 8)) & 255)
    slot = tl.where(valid, slot, 257)
    counts = tl.histogram(tl.reshape(slot, [NUMEL]).to(tl.int32), SLOTS)
    tl.atomic_add(hist_ptr + tl.arange(0, SLOTS), counts.to(tl.int64))


@triton.jit
def _keep(key, threshold, index, tie_cut, STRICT: tl.constexpr):
    keep = key > threshold
    if not STRICT:
        keep = keep | ((key == threshold) & (index >= tie_cut))
    return keep


@triton.jit
def _fused_prune_step_kernel(
        w_ptr, g_ptr, s_ptr, m_ptr, hist_ptr, ea_ptr, eas_ptr, n, threshold, tie_cut, index_offset,
        prior_scale, c1, c2, inv0, inv1, score_lr, sigmoid_l1, one_minus_beta1, beta2, one_minus_beta2,
        neg_step_size, bias2_sqrt, eps,
        KEY_FROM_SCORES: tl.constexpr, STRICT: tl.constexpr, HAS_SCORES: tl.constexpr,
        UPDATE_SCORES: tl.constexpr, ADAM: tl.constexpr, SIGMOID_L1: tl.constexpr, ADD_PRIOR: tl.constexpr,
        MASK_GRAD: tl.constexpr, MASK_WEIGHT: tl.constexpr, REUSE_MASK: tl.constexpr, EMIT_HIST: tl.constexpr,
        KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """Element granularity: flat BLOCK elements per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    w_raw, g_raw, s_raw, ea_raw, eas_raw = _load(w_ptr, g_ptr, s_ptr, ea_ptr, eas_ptr, offs, inside, HAS_SCORES,
                                                 ADAM)
    key = _element_key(w_raw, s_raw, KEY_FROM_SCORES)
    if REUSE_MASK:
        keep = tl.load(m_ptr + offs, mask=inside, other=0) != 0
    else:
        keep = _keep(key, threshold, index_offset + offs, tie_cut, STRICT)
    g_new, s_new, w_new, ea_new, eas_new = _update(
        w_raw, g_raw, s_raw, ea_raw, eas_raw, keep, prior_scale, c1, c2, inv0, inv1, score_lr, sigmoid_l1,
        one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps,
        UPDATE_SCORES, ADAM, SIGMOID_L1, ADD_PRIOR, MASK_GRAD, MASK_WEIGHT)
    _store(w_ptr, g_ptr, s_ptr, m_ptr, ea_ptr, eas_ptr, offs, inside, w_new, g_new, s_new, keep, ea_new, eas_new,
           UPDATE_SCORES, ADAM, MASK_WEIGHT)
    if EMIT_HIST:
        _store_histogram(hist_ptr, s_new, inside, KEY_BITS, INF_BITS, SLOTS, BLOCK)


@triton.jit
def _fused_prune_step_block_kernel(
        w_ptr, g_ptr, s_ptr, m_ptr, hist_ptr, ea_ptr, eas_ptr, rows, cols, block_rows, block_cols,
        blocks_per_row, threshold, tie_cut, index_offset, prior_scale, c1, c2, inv0, inv1, score_lr, sigmoid_l1,
        one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps,
        KEY_FROM_SCORES: tl.constexpr, STRICT: tl.constexpr, HAS_SCORES: tl.constexpr,
        UPDATE_SCORES: tl.constexpr, ADAM: tl.constexpr, SIGMOID_L1: tl.constexpr, ADD_PRIOR: tl.constexpr,
        MASK_GRAD: tl.constexpr, MASK_WEIGHT: tl.constexpr, REUSE_MASK: tl.constexpr, EMIT_HIST: tl.constexpr,
        SLOTS: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """Block granularity: one (block_rows × block_cols) block per program, padded to a pow2 tile."""
    block = tl.program_id(0).to(tl.int64)
    br, bc = block // blocks_per_row, block % blocks_per_row
    r = br * block_rows + tl.arange(0, TILE_R)
    c = bc * block_cols + tl.arange(0, TILE_C)
    r_ok = (r < rows) & (tl.arange(0, TILE_R) < block_rows)
    c_ok = (c < cols) & (tl.arange(0, TILE_C) < block_cols)
    inside = r_ok[:, None] & c_ok[None, :]
    offs = r[:, None] * cols + c[None, :]
    w_raw, g_raw, s_raw, ea_raw, eas_raw = _load(w_ptr, g_ptr, s_ptr, ea_ptr, eas_ptr, offs, inside, HAS_SCORES,
                                                 ADAM)
    if KEY_FROM_SCORES:
        key = tl.sum(tl.sum(s_raw.to(tl.float64), axis=1), axis=0).to(tl.float32)
    else:
        w64 = w_raw.to(tl.float64)
        key = tl.sum(tl.sum(w64 * w64, axis=1), axis=0).to(tl.float32)
    if REUSE_MASK:
        keep = inside & (tl.load(m_ptr + offs, mask=inside, other=0) != 0)
    else:
        keep_block = _keep(key, threshold, index_offset + block, tie_cut, STRICT)
        keep = tl.where(keep_block, inside, tl.zeros_like(inside))
    g_new, s_new, w_new, ea_new, eas_new = _update(
        w_raw, g_raw, s_raw, ea_raw, eas_raw, keep, prior_scale, c1, c2, inv0, inv1, score_lr, sigmoid_l1,
        one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps,
        UPDATE_SCORES, ADAM, SIGMOID_L1, ADD_PRIOR, MASK_GRAD, MASK_WEIGHT)
    _store(w_ptr, g_ptr, s_ptr, m_ptr, ea_ptr, eas_ptr, offs, inside, w_new, g_new, s_new, keep, ea_new, eas_new,
           UPDATE_SCORES, ADAM, MASK_WEIGHT)
    if EMIT_HIST:
        next_key = tl.sum(tl.sum(tl.where(inside, s_new.to(tl.float64), 0.0), axis=1), axis=0).to(tl.float32)
        key_bits, is_nan = order_key(next_key.to(tl.int32, bitcast=True), 32, 0x7F800000, False)
        tl.atomic_add(hist_ptr + tl.where(is_nan, 256, (key_bits >> 24) & 255), 1)  # the block's one key


@triton.jit
def _fused_prune_step_24_kernel(
        w_ptr, g_ptr, s_ptr, m_ptr, hist_ptr, ea_ptr, eas_ptr, groups, prior_scale, c1, c2, inv0, inv1, score_lr,
        sigmoid_l1, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps,
        KEY_FROM_SCORES: tl.constexpr, HAS_SCORES: tl.constexpr, UPDATE_SCORES: tl.constexpr, ADAM: tl.constexpr,
        SIGMOID_L1: tl.constexpr, ADD_PRIOR: tl.constexpr, MASK_GRAD: tl.constexpr, MASK_WEIGHT: tl.constexpr,
        REUSE_MASK: tl.constexpr, EMIT_HIST: tl.constexpr, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, SLOTS: tl.constexpr,
        GROUPS: tl.constexpr):
    """2:4: keep the 2 largest keys of each 4 consecutive elements (lower index pruned on ties)."""
    g_idx = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    lane = tl.arange(0, 4)
    offs = g_idx[:, None] * 4 + lane[None, :]
    inside = (g_idx < groups)[:, None] & (lane < 4)[None, :]
    w_raw, g_raw, s_raw, ea_raw, eas_raw = _load(w_ptr, g_ptr, s_ptr, ea_ptr, eas_ptr, offs, inside, HAS_SCORES,
                                                 ADAM)
    key = _element_key(w_raw, s_raw, KEY_FROM_SCORES)
    if REUSE_MASK:
        keep = tl.load(m_ptr + offs, mask=inside, other=0) != 0
    else:
        mine = key[:, :, None]    # [G, j, 1]
        other = key[:, None, :]   # [G, 1, i]
        earlier = lane[None, None, :] < lane[None, :, None]
        before = (other < mine) | ((other == mine) & earlier)
        keep = tl.sum(before.to(tl.int32), axis=2) >= 2
    g_new, s_new, w_new, ea_new, eas_new = _update(
        w_raw, g_raw, s_raw, ea_raw, eas_raw, keep, prior_scale, c1, c2, inv0, inv1, score_lr, sigmoid_l1,
        one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias2_sqrt, eps,
        UPDATE_SCORES, ADAM, SIGMOID_L1, ADD_PRIOR, MASK_GRAD, MASK_WEIGHT)
    _store(w_ptr, g_ptr, s_ptr, m_ptr, ea_ptr, eas_ptr, offs, inside, w_new, g_new, s_new, keep, ea_new, eas_new,
           UPDATE_SCORES, ADAM, MASK_WEIGHT)
    if EMIT_HIST:
        _store_histogram(hist_ptr, s_new, inside, KEY_BITS, INF_BITS, SLOTS, GROUPS * 4)


def _threshold_as(value: float, dtype: torch.dtype) -> float:
    """The threshold as the key dtype holds it (keys are compared in their own precision)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _adam_scalars(adam, score_lr, score_step, beta1, beta2, eps):
    """(1−β1, β2, 1−β2, −step_size, √(1−β2^t), eps): float64 on the host, rounded to float32 at launch."""
    if not adam:
        return 0.0, 0.0, 0.0, 0.0, 1.0, 0.0
    step_size, bias2_sqrt = adam_constants(score_lr, score_step, beta1, beta2)
    return 1.0 - beta1, float(beta2), 1.0 - beta2, -step_size, bias2_sqrt, float(eps)


def fused_prune_step_triton(weight, grad, scores, mask, histogram, score_exp_avg=None, score_exp_avg_sq=None, *,
                            keys_from_scores=False, strict_threshold=False, granularity="element", block_rows=1,
                            block_cols=1, threshold=0.0, tie_cut=0,
                            index_offset=0, prior_scale=0.0, lam=0.1, var0=1e-10, var1=0.05, score_lr=0.0,
                            sigmoid_l1=0.0, score_step=0, score_beta1=0.9, score_beta2=0.999, score_eps=1e-8,
                            mask_grad=True, mask_weight=False, reuse_mask=False) -> None:
    """Launch the kernel for `granularity` on contiguous tensors (arguments checked by the op).
    With score_exp_avg/score_exp_avg_sq (float32, like the scores) the scores take Adam step
    `score_step`; the moments are read and written in the same pass."""
    key_dtype = (scores.dtype if keys_from_scores else weight.dtype) if granularity != "block" else torch.float32
    threshold = _threshold_as(threshold, key_dtype)
    c1, c2, inv0, inv1 = mgp_constants(lam, var0, var1) if prior_scale != 0.0 else (0.0, 0.0, 0.0, 0.0)
    hist = torch.zeros(SLOTS, dtype=torch.int64, device=weight.device) if histogram is not None else None
    hist_dtype = scores.dtype if scores is not None else torch.float32  # element keys of the histogram
    update_scores = scores is not None and score_lr != 0.0
    adam = update_scores and score_exp_avg is not None
    adam_args = _adam_scalars(adam, score_lr, score_step, score_beta1, score_beta2, score_eps)
    flags = dict(KEY_FROM_SCORES=keys_from_scores, HAS_SCORES=scores is not None,
                 UPDATE_SCORES=update_scores, ADAM=adam, SIGMOID_L1=sigmoid_l1 != 0.0,
                 ADD_PRIOR=prior_scale != 0.0, MASK_GRAD=mask_grad, MASK_WEIGHT=mask_weight,
                 REUSE_MASK=reuse_mask, EMIT_HIST=histogram is not None, SLOTS=SLOTS,
                 enable_fp_fusion=False)  # no FMA contraction: the reference's rounding
    key_type = dict(KEY_BITS=KEY_BITS[hist_dtype], INF_BITS=INF_BITS[hist_dtype])
    s_arg = scores if scores is not None else weight
    ea_arg, eas_arg = (score_exp_avg, score_exp_avg_sq) if adam else (s_arg, s_arg)  # unread without ADAM
    with on_device(weight):
        if granularity == "element":
            n = weight.numel()
            _fused_prune_step_kernel[(triton.cdiv(n, ELEMENT_BLOCK),)](
                weight, grad, s_arg, mask, hist, ea_arg, eas_arg, n, threshold, tie_cut, index_offset, prior_scale,
                c1, c2, inv0, inv1, score_lr, sigmoid_l1, *adam_args, STRICT=strict_threshold, BLOCK=ELEMENT_BLOCK,
                **key_type, **flags)
        elif granularity == "block":
            rows, cols = weight.shape
            blocks_per_row = triton.cdiv(cols, block_cols)
            _fused_prune_step_block_kernel[(triton.cdiv(rows, block_rows) * blocks_per_row,)](
                weight, grad, s_arg, mask, hist, ea_arg, eas_arg, rows, cols, block_rows, block_cols, blocks_per_row,
                threshold, tie_cut, index_offset, prior_scale, c1, c2, inv0, inv1, score_lr, sigmoid_l1, *adam_args,
                STRICT=strict_threshold,
                TILE_R=triton.next_power_of_2(block_rows), TILE_C=triton.next_power_of_2(block_cols), **flags)
        else:
            groups = weight.numel() // 4
            _fused_prune_step_24_kernel[(triton.cdiv(groups, GROUPS_24),)](
                weight, grad, s_arg, mask, hist, ea_arg, eas_arg, groups, prior_scale, c1, c2, inv0, inv1, score_lr,
                sigmoid_l1, *adam_args, GROUPS=GROUPS_24, **key_type, **flags)
    if histogram is not None:
        histogram += hist[: RADIX_BINS + 1]
