"""y = x @ Wᵀ + bias with W in BSR by rows, in Triton (contract: sparse_ops/ops/__init__.py, reference:
sparse_ops/ops/reference.py bsr_linear_ref).

W (N × K) is stored as crow (ceil(N/br)+1,) int32, col (nnz_blocks,) int32 block columns and values
(nnz_blocks, br, bc); x is (M, K). Both paths take U stored blocks of a block row per step (they
are consecutive in `values`), side by side as one tile of depth U·bc: more bytes in flight per
program and a deeper tl.dot. Each stored block is streamed once per tile of tokens.

  tiled   (M > 16)  one program per (block row, BLOCK_M tokens): acc[BLOCK_M, br] += x[:, cols] @ Wᵀ
                    with tl.dot (tensor cores for fp16/bf16, wgmma from BLOCK_M = 64 on Hopper; fp32
                    uses input_precision="ieee", never tf32), software-pipelined over num_stages.
                    Programs run with the block row varying fastest, so those in flight share one
                    x tile in L2.
  skinny  (M ≤ 16)  bound by the bytes of W. A program owns SUB_N rows of a block row and one of
                    `split` contiguous shares of its stored blocks, so the grid fills the GPU while
                    each stored element is still loaded by one program only. Per configuration
                    either fp32 multiply-adds into a [M, SUB_N, U·bc] accumulator, reduced once at
                    the end (no shuffles in the loop, no padding of 1 token to 16 rows, loads straight
                    to registers), or tl.dot on 16 padded token rows (pipelined through shared
                    memory); the autotuner picks, the interpreter runs multiply-adds up to 8 tokens
                    and tl.dot above. With split > 1 the shares write fp32 partials to a
                    (split, M, N) workspace and a second launch sums them in share order
                    (deterministic: no atomics, no memset).

Numerics: products and sums in float32, bias added in float32, one rounding to x.dtype (bfloat16 with
round-to-nearest-even, as torch). Not in place: returns a new (M, N) tensor. Indices past in_features
are never read (x and W's padding columns are masked), outputs past out_features never written, so
whatever the padding of the last block row/column holds (NaN included) does not matter.

Block sizes: br, bc ≤ 128, any value (tiles are padded to powers of two ≥ 16 and masked); blocks of
16..128 that are powers of two waste nothing, smaller ones (e.g. 8×8) run correctly but pad each tile
to 16, so SparseLinear should pick br, bc ∈ {16, 32, 64, 128} for the Triton backend.

Configurations are autotuned on CUDA (keyed on the token bucket, N, K, block size, split and dtype;
configurations that cannot fit registers or shared memory are pruned first; the choice is cached by
triton.autotune for the process; SPARSE_OPS_AUTOTUNE=0 launches the first one kept, untimed). Under
TRITON_INTERPRET=1 one fixed configuration runs, untimed.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import _runtime  # noqa: F401  (first: see its docstring)
from ._numerics import on_device, round_to

SKINNY_MAX_TOKENS = 16
MAX_BLOCK = 128
MAX_SPLIT = 16
REDUCE_BLOCK = 1024
_SMEM_BYTES = 200 * 1024  # what a config's pipelined tiles may use of an H100's 228 KB per SM
# The one configuration per path that runs under TRITON_INTERPRET=1 (untimed): U = 2 covers a masked
# tail of blocks, the skinny path takes multiply-adds up to 8 tokens and tl.dot for 9..16.
INTERPRETER_TILED = {"BLOCK_M": 32, "U": 2}
INTERPRETER_SKINNY = {False: {"SUB_N": 8, "U": 2, "USE_DOT": False}, True: {"SUB_N": 16, "U": 2, "USE_DOT": True}}


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _x_tile(x_ptr, col_ptr, rows, row_ok, k0, hi, stride_xm, K, BC: tl.constexpr, BC_P: tl.constexpr,
            U: tl.constexpr):
    """The x columns of stored blocks k0 .. k0+U-1 (those < hi), side by side: [len(rows), U*BC_P], zero
    outside M, K and the blocks. Also returns the column mask, which the W tile reuses, so neither x nor
    W is ever read past in_features or past the last stored block."""
    j = tl.arange(0, U * BC_P)
    block = k0 + j // BC_P
    c = j % BC_P
    stored = block < hi
    kk = tl.load(col_ptr + block, mask=stored, other=0) * BC + c
    col_ok = stored & (c < BC) & (kk < K)
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + kk[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0), col_ok


@triton.jit
def _w_tile(val_ptr, rows, k0, col_ok, BR: tl.constexpr, BC: tl.constexpr, BC_P: tl.constexpr, U: tl.constexpr):
    """Rows `rows` of stored blocks k0 .. k0+U-1 (k0 an int64 index), side by side: [len(rows), U*BC_P],
    zero past the block rows and where col_ok is False."""
    j = tl.arange(0, U * BC_P)
    ptrs = val_ptr + (k0 + j // BC_P)[None, :] * (BR * BC) + rows[:, None] * BC + (j % BC_P)[None, :]
    return tl.load(ptrs, mask=(rows < BR)[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _dot_acc(x, w, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ wᵀ in float32. UPCAST (bfloat16 under the interpreter only, whose tl.dot multiplies the
    raw uint16 words of bfloat16) feeds float32 copies instead: the same exact products."""
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _row_range(crow_ptr, r, share, SPLIT: tl.constexpr):
    """[lo, hi): share `share` of SPLIT contiguous shares of block row r's stored blocks, as int64 (block
    index × BR × BC may pass 2**31)."""
    start = tl.load(crow_ptr + r).to(tl.int64)
    end = tl.load(crow_ptr + r + 1).to(tl.int64)
    chunk = tl.cdiv(end - start, SPLIT)
    lo = start + share * chunk
    return lo, tl.minimum(lo + chunk, end)


@triton.jit
def _store_output(y_ptr, bias_ptr, acc, m, n, M, N, stride_ym, n_ok, HAS_BIAS: tl.constexpr):
    """y[m, n] = round(acc + bias[n]) for the rows m < M and the columns n_ok & n < N."""
    n_ok = n_ok & (n < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + m.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(ptrs, round_to(acc, y_ptr.dtype.element_ty), mask=(m < M)[:, None] & n_ok[None, :])


@triton.jit
def _store_share(out_ptr, bias_ptr, acc, m, n, share, M, N, stride_om, stride_os, n_ok,
                 SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """SPLIT == 1: y = round(acc + bias). Else: acc as fp32 partial sums into out[share]."""
    if SPLIT == 1:
        _store_output(out_ptr, bias_ptr, acc, m, n, M, N, stride_om, n_ok, HAS_BIAS)
    else:
        ptrs = out_ptr + share.to(tl.int64) * stride_os + m[:, None] * stride_om + n[None, :]
        tl.store(ptrs, acc, mask=(m < M)[:, None] & (n_ok & (n < N))[None, :])


@triton.jit
def _bsr_linear_kernel(x_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                       num_block_rows, m_bucket,
                       BR: tl.constexpr, BC: tl.constexpr, BR_P: tl.constexpr, BC_P: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, U: tl.constexpr):
    """Tiled path. One program: block row r, tokens [tile*BLOCK_M, (tile+1)*BLOCK_M), U stored blocks
    (one tl.dot of depth U*BC_P) per step. `m_bucket` only keys the autotuner (M rounded up to a
    power of two)."""
    pid = tl.program_id(0)
    r = pid % num_block_rows
    m = (pid // num_block_rows) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    w_rows = tl.arange(0, BR_P)
    lo, hi = _row_range(crow_ptr, r, 0, 1)
    acc = tl.zeros([BLOCK_M, BR_P], dtype=tl.float32)
    for k0 in range(lo, hi, U):
        x, col_ok = _x_tile(x_ptr, col_ptr, m, m_ok, k0, hi, stride_xm, K, BC, BC_P, U)
        w = _w_tile(val_ptr, w_rows, k0, col_ok, BR, BC, BC_P, U)
        acc = _dot_acc(x, w, acc, PRECISION, UPCAST)
    _store_output(y_ptr, bias_ptr, acc, m, r * BR + w_rows, M, N, stride_ym, w_rows < BR, HAS_BIAS)


@triton.jit
def _bsr_linear_skinny_kernel(x_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                              stride_om, stride_os,
                              BR: tl.constexpr, BC: tl.constexpr, BC_P: tl.constexpr, MB: tl.constexpr,
                              SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                              UPCAST: tl.constexpr, SUB_N: tl.constexpr, U: tl.constexpr, USE_DOT: tl.constexpr):
    """Skinny path (M ≤ MB ≤ 16). Program (p, s): rows [sub*SUB_N, (sub+1)*SUB_N) of block row
    r = p // SUBS over share s of its stored blocks, U blocks per step. USE_DOT: tl.dot on 16 padded
    token rows; else fp32 multiply-adds into a [MB, SUB_N, U*BC_P] accumulator, reduced once at the
    end. SPLIT == 1 writes y; else fp32 partials to out[s] for _bsr_linear_reduce_kernel."""
    SUBS: tl.constexpr = (BR + SUB_N - 1) // SUB_N
    pid = tl.program_id(0)
    share = tl.program_id(1)
    r = pid // SUBS
    w_rows = (pid % SUBS) * SUB_N + tl.arange(0, SUB_N)
    n = r * BR + w_rows
    lo, hi = _row_range(crow_ptr, r, share, SPLIT)
    if USE_DOT:
        m = tl.arange(0, 16)
        acc = tl.zeros([16, SUB_N], dtype=tl.float32)
        for k0 in range(lo, hi, U):
            x, col_ok = _x_tile(x_ptr, col_ptr, m, m < M, k0, hi, stride_xm, K, BC, BC_P, U)
            w = _w_tile(val_ptr, w_rows, k0, col_ok, BR, BC, BC_P, U)
            acc = _dot_acc(x, w, acc, PRECISION, UPCAST)
        _store_share(out_ptr, bias_ptr, acc, m, n, share, M, N, stride_om, stride_os, w_rows < BR, SPLIT, HAS_BIAS)
    else:
        m = tl.arange(0, MB)
        acc3 = tl.zeros([MB, SUB_N, U * BC_P], dtype=tl.float32)
        for k0 in range(lo, hi, U):
            x, col_ok = _x_tile(x_ptr, col_ptr, m, m < M, k0, hi, stride_xm, K, BC, BC_P, U)
            w = _w_tile(val_ptr, w_rows, k0, col_ok, BR, BC, BC_P, U)
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        acc = tl.sum(acc3, axis=2)
        _store_share(out_ptr, bias_ptr, acc, m, n, share, M, N, stride_om, stride_os, w_rows < BR, SPLIT, HAS_BIAS)


@triton.jit
def _bsr_linear_reduce_kernel(ws_ptr, bias_ptr, y_ptr, numel, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr):
    """y = round(sum_s ws[s] + bias), summed in share order, over the flat (M, N) outputs."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * numel + offs, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, round_to(acc, y_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
def _tiled_configs():
    """(BLOCK_M tokens, U blocks per step, warps, stages)."""
    shapes = [(32, 4, 4, 3), (64, 1, 4, 4), (64, 2, 4, 3), (64, 4, 4, 3), (64, 4, 4, 4), (128, 1, 4, 4),
              (128, 2, 4, 3), (128, 2, 8, 3), (128, 4, 8, 3), (32, 1, 8, 3), (32, 2, 8, 3), (64, 1, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "U": u}, num_warps=w, num_stages=s) for bm, u, w, s in shapes]


def _skinny_configs():
    """(SUB_N rows, U blocks per step, warps, stages, tl.dot or multiply-adds)."""
    shapes = [(8, 1, 4, 2, False), (8, 4, 4, 2, False), (16, 4, 4, 2, False), (32, 2, 4, 2, False),
              (32, 4, 8, 2, False), (16, 8, 8, 2, False),
              (16, 1, 4, 3, True), (16, 4, 4, 3, True), (32, 4, 4, 3, True), (32, 2, 4, 4, True),
              (64, 2, 4, 3, True), (16, 8, 4, 3, True)]
    return [triton.Config({"SUB_N": sub, "U": u, "USE_DOT": dot}, num_warps=w, num_stages=s)
            for sub, u, w, s, dot in shapes]


def _tiled_tile_registers(config: triton.Config, br_p: int, bc_p: int, itemsize: int) -> float:
    """32-bit registers per thread that the tiles of one step hold: the fp32 accumulator
    [BLOCK_M, BR_P] and the x and W operand tiles of depth U·BC_P."""
    bm, depth = config.kwargs["BLOCK_M"], config.kwargs["U"] * bc_p
    return (bm * br_p + (bm + br_p) * depth * itemsize / 4) / (32 * config.num_warps)


def max_tile_registers(arch: int) -> int:
    """Tile registers per thread a tiled configuration may hold on compute capability `arch` (e.g. 90):
    in scripts/check_triton.py ptxas spilled above 96 on sm_90 and above 40 on sm_80 (Hopper's
    wgmma keeps the accumulator out of the operand registers), never at or below, for 16, 32 and 64
    blocks in fp32 and bf16."""
    return 96 if arch >= 90 else 40


def _tiled_fits(config: triton.Config, m_bucket: int, br_p: int, bc_p: int, itemsize: int, arch: int) -> bool:
    """Whether the autotuner may try `config`: tokens to fill BLOCK_M, pipelined tiles within shared
    memory, and no more tile registers than max_tile_registers(arch)."""
    bm, depth = config.kwargs["BLOCK_M"], config.kwargs["U"] * bc_p
    return (bm <= max(64, m_bucket) and depth <= 256
            and _tiled_tile_registers(config, br_p, bc_p, itemsize) <= max_tile_registers(arch)
            and config.num_stages * (bm + br_p) * depth * itemsize <= _SMEM_BYTES)


def _skinny_fits(config: triton.Config, mb: int, br: int, bc_p: int) -> bool:
    sub, depth, dot = config.kwargs["SUB_N"], config.kwargs["U"] * bc_p, config.kwargs["USE_DOT"]
    if depth > 256 or sub > max(16 if dot else 8, triton.next_power_of_2(br)):
        return False
    return dot or mb * sub * depth <= 64 * 32 * config.num_warps  # the 3-D accumulator: ≤ 64 fp32 per thread


def _prune_tiled(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    itemsize = x.element_size()
    major, minor = torch.cuda.get_device_capability(x.device)
    kept = [c for c in configs
            if _tiled_fits(c, named_args["m_bucket"], kwargs["BR_P"], kwargs["BC_P"], itemsize, 10 * major + minor)]
    return kept or [min(configs, key=lambda c: _tiled_tile_registers(c, kwargs["BR_P"], kwargs["BC_P"], itemsize))]


def _prune_skinny(configs, named_args, **kwargs):
    # never empty: (SUB_N=16, U=1, tl.dot) fits every block size up to MAX_BLOCK
    return [c for c in configs if _skinny_fits(c, kwargs["MB"], kwargs["BR"], kwargs["BC_P"])]


_bsr_linear_tuned = triton.autotune(
    _tiled_configs(), key=["m_bucket", "N", "K", "BR", "BC"], prune_configs_by={"early_config_prune": _prune_tiled},
)(_bsr_linear_kernel)
_bsr_linear_skinny_tuned = triton.autotune(
    _skinny_configs(), key=["MB", "N", "K", "BR", "BC", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_skinny},
)(_bsr_linear_skinny_kernel)

INTERPRETED = not isinstance(_bsr_linear_kernel, triton.runtime.JITFunction)
# SPARSE_OPS_AUTOTUNE=0: on CUDA, launch the first configuration the pruning keeps instead of timing
# them all (the tests do: they check every configuration on its own, and timing each new shape
# would cost seconds)
AUTOTUNE = os.environ.get("SPARSE_OPS_AUTOTUNE", "1") != "0"


def _launch(tuned, prune, grid, args: tuple, meta: dict) -> None:
    if AUTOTUNE:
        tuned[grid](*args, **meta)
    else:
        config = prune(tuned.configs, dict(zip(tuned.arg_names, args)), **meta)[0]
        tuned.fn[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                      num_stages=config.num_stages)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_split(num_block_rows: int, nnz_blocks: int, br: int, sm_count: int) -> int:
    """Shares per block row for the skinny path: doubled while the grid (about cdiv(br, 16) programs
    per block row) is under 4 programs per SM and each share keeps ≥ 2 stored blocks on average."""
    programs = num_block_rows * triton.cdiv(br, 16)
    split = 1
    while split < MAX_SPLIT and programs * split < 4 * sm_count and nnz_blocks >= 4 * split * num_block_rows:
        split *= 2
    return split


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------
def _check_launch(x: torch.Tensor, values: torch.Tensor, split) -> tuple[int, int]:
    if not x.is_cuda and not (INTERPRETED and x.device.type == "cpu"):
        raise RuntimeError(f"bsr_linear_triton runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1 (set before "
                           f"sparse_ops.kernels is imported); got x on {x.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16 for the Triton kernel, got {x.dtype}")
    br, bc = values.shape[1], values.shape[2]
    if not (1 <= br <= MAX_BLOCK and 1 <= bc <= MAX_BLOCK):
        raise ValueError(f"block_size (values.shape[1:]) must lie in [1, {MAX_BLOCK}] × [1, {MAX_BLOCK}] for the "
                         f"Triton kernel, got {(br, bc)}")
    if split is not None and not (isinstance(split, int) and 1 <= split <= MAX_SPLIT):
        raise ValueError(f"split must be None or an int in [1, {MAX_SPLIT}], got {split!r}")
    return br, bc


def bsr_linear_triton(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor | None, out_features: int, *, split: int | None = None) -> torch.Tensor:
    """(M, out_features) = x @ Wᵀ + bias for x (M, K) and W in BSR (int32 crow/col, values (nnz, br, bc) in
    x.dtype, checked by the op layer). `split` forces the number of shares per block row of the skinny
    path (M ≤ 16); None picks it from the grid size and the SM count."""
    br, bc = _check_launch(x, values, split)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    meta = {"BR": br, "BC": bc, "BC_P": max(16, triton.next_power_of_2(bc)), "HAS_BIAS": bias is not None,
            # fp32 products stay exact ("ieee", never tf32); "tf32" only names the default for 16-bit inputs
            "PRECISION": "ieee" if x.dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}
    operands = (x, crow, col, values, y if bias is None else bias)  # the bias pointer is unread without bias
    with on_device(x):
        if x.shape[0] > SKINNY_MAX_TOKENS:
            _launch_tiled(operands, y, meta)
        else:
            if split is None:
                split = 1 if INTERPRETED else choose_split(crow.numel() - 1, values.shape[0], br,
                                                           _sm_count(x.device.index))
            _launch_skinny(operands, y, meta, split)
    return y


def _launch_tiled(operands, y, meta):
    x, crow = operands[0], operands[1]
    (M, K), N = x.shape, y.shape[1]
    num_block_rows = crow.numel() - 1
    m_bucket = min(triton.next_power_of_2(M), 4096)
    args = (*operands, y, M, N, K, x.stride(0), y.stride(0), num_block_rows, m_bucket)
    meta = {**meta, "BR_P": max(16, triton.next_power_of_2(meta["BR"]))}

    def grid(cfg):
        return (num_block_rows * triton.cdiv(M, cfg["BLOCK_M"]),)

    if INTERPRETED:
        _bsr_linear_kernel[grid(INTERPRETER_TILED)](*args, **meta, **INTERPRETER_TILED)
    else:
        _launch(_bsr_linear_tuned, _prune_tiled, grid, args, meta)


def _launch_skinny(operands, y, meta, split):
    x, crow, bias = operands[0], operands[1], operands[4]
    (M, K), N = x.shape, y.shape[1]
    num_block_rows = crow.numel() - 1
    mb = triton.next_power_of_2(M)
    out = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    args = (*operands, out, M, N, K, x.stride(0), out.stride(-2), out.stride(0))
    meta = {**meta, "MB": mb, "SPLIT": split}

    def grid(cfg):
        return (num_block_rows * triton.cdiv(meta["BR"], cfg["SUB_N"]), split)

    if INTERPRETED:
        config = INTERPRETER_SKINNY[mb == SKINNY_MAX_TOKENS]
        _bsr_linear_skinny_kernel[grid(config)](*args, **meta, **config)
    else:
        _launch(_bsr_linear_skinny_tuned, _prune_skinny, grid, args, meta)
    if split > 1:
        numel = M * N
        _bsr_linear_reduce_kernel[(triton.cdiv(numel, REDUCE_BLOCK),)](
            out, bias, y, numel, N, SPLIT=split, HAS_BIAS=meta["HAS_BIAS"], BLOCK=REDUCE_BLOCK)
