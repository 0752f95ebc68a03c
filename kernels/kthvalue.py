"""Multi-tensor radix histogram in Triton: the one pass per level of sparse_ops' radix select.

One launch covers every tensor of a list: a table of data pointers and a table of fixed-size
chunks (tensor id, start) lets each program stream CHUNK elements of one tensor. Keys are the
order-preserving integer images of the floats (see sparse_ops.ops.reference.order_keys), computed in
int64 registers from the raw 16/32-bit words. Each program accumulates a private 512-slot
histogram (256 digits, slot 256 = NaN, slot 257 = ignored) and adds it to the global one with
512 atomics, so the result is exact and independent of scheduling.
"""

import functools

import torch
import triton
import triton.language as tl

from sparse_ops.ops.keys import KEY_BITS, RADIX_BINS

from . import _runtime  # noqa: F401  (first: see its docstring)
from ._numerics import on_device

BLOCK = 1024
CHUNK = 64 * BLOCK
SLOTS = 2 * RADIX_BINS
INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000}


@triton.jit
def order_key(raw, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, ABSOLUTE: tl.constexpr):
    """(key, is_nan) for raw float words: unsigned-order key in int64, +0 and −0 alike."""
    u = raw.to(tl.int64) & ((1 << KEY_BITS) - 1)
    sign_bit = 1 << (KEY_BITS - 1)
    magnitude = u & (sign_bit - 1)
    is_nan = magnitude > INF_BITS
    if ABSOLUTE:
        u = magnitude
    u = tl.where(magnitude == 0, 0, u)
    key = tl.where((u & sign_bit) != 0, (~u) & ((1 << KEY_BITS) - 1), u | sign_bit)
    return key, is_nan


@triton.jit
def _radix_histogram_kernel(ptr_table, sizes, chunk_tensor, chunk_start, state_ptr, hist_ptr,
                            LEVEL: tl.constexpr, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr,
                            ABSOLUTE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                            SLOTS: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(sizes + tensor)
    if KEY_BITS == 16:
        data = tl.load(ptr_table + tensor).to(tl.pointer_type(tl.int16))
    else:
        data = tl.load(ptr_table + tensor).to(tl.pointer_type(tl.int32))
    prefix = tl.load(state_ptr)
    shift: tl.constexpr = KEY_BITS - 8 * (LEVEL + 1)
    counts = tl.zeros([SLOTS], dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        inside = offs < n
        raw = tl.load(data + offs, mask=inside, other=0)
        key, is_nan = order_key(raw, KEY_BITS, INF_BITS, ABSOLUTE)
        wanted = inside & ~is_nan
        if LEVEL > 0:
            wanted = wanted & ((key >> (shift + 8)) == prefix)
        slot = tl.where(wanted, (key >> shift) & 255, 257)
        if LEVEL == 0:
            slot = tl.where(inside & is_nan, 256, slot)
        counts += tl.histogram(slot.to(tl.int32), SLOTS)
    tl.atomic_add(hist_ptr + tl.arange(0, SLOTS), counts.to(tl.int64))


def _chunk_size(sizes) -> int:
    """CHUNK, or less for small tensors (a power of two multiple of BLOCK)."""
    return min(CHUNK, BLOCK * triton.next_power_of_2(triton.cdiv(max(sizes), BLOCK)))


@functools.lru_cache(maxsize=64)
def _chunk_tables(ptrs: tuple, sizes: tuple, chunk: int, device: torch.device):
    tensor_ids, starts = [], []
    for t, size in enumerate(sizes):
        for start in range(0, size, chunk):
            tensor_ids.append(t)
            starts.append(start)
    as_tensor = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    return as_tensor(list(ptrs)), as_tensor(list(sizes)), as_tensor(tensor_ids), as_tensor(starts)


def radix_histogram_triton(xs, state: torch.Tensor, level: int, absolute: bool) -> torch.Tensor:
    """int64[257] histogram of digit `level` of the keys of all contiguous tensors in `xs`."""
    xs = [x if x.is_contiguous() else x.contiguous() for x in xs if x.numel()]
    hist = torch.zeros(SLOTS, dtype=torch.int64, device=state.device)
    if not xs:
        return hist[: RADIX_BINS + 1]
    dtype = xs[0].dtype
    bits = KEY_BITS[dtype]
    numels = tuple(x.numel() for x in xs)
    chunk = _chunk_size(numels)
    ptr_table, sizes, chunk_tensor, chunk_start = _chunk_tables(
        tuple(x.data_ptr() for x in xs), numels, chunk, state.device)
    with on_device(state):
        _radix_histogram_kernel[(chunk_tensor.numel(),)](
            ptr_table, sizes, chunk_tensor, chunk_start, state, hist,
            LEVEL=level, KEY_BITS=bits, INF_BITS=INF_BITS[dtype], ABSOLUTE=absolute,
            CHUNK=chunk, BLOCK=BLOCK, SLOTS=SLOTS)
    return hist[: RADIX_BINS + 1]
