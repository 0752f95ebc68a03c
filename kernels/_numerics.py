"""Helpers shared by the kernels and their launchers."""

import contextlib

import torch
import triton
import triton.language as tl


def on_device(t: torch.Tensor):
    """Launch on t's GPU (not the current one), so tensors on cuda:1 work too."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 -> dtype with round-to-nearest-even. bfloat16 is rounded with integer ops, exactly as
    torch and the GPU do (the Triton interpreter's own float32->bfloat16 cast does not round to even)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
