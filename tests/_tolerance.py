"""flash-attention's tolerance rule for matmul-like kernels (docs/development.md).

A kernel's max error against a float64 reference must be at most twice the max error of the same
computation done by plain PyTorch in the kernel's dtype, plus a tiny absolute floor. The floor only
matters when PyTorch happens to be exact (e.g. all-zero rows, outputs that are exactly
representable): then a kernel that accumulates in another order may still be off by rounding.
  float32: 1e-6 · scale   (a few ulps of fp32 at the output's magnitude, ulp(1) = 1.2e-7)
  fp16/bf16: 1e-3 · scale (below one ulp of either 16-bit format at 1: 9.8e-4 for fp16, 7.8e-3 for bf16)
  float64: 1e-12 · scale
where scale = max(1, max |reference|), so the floor follows the size of the outputs.
"""

from __future__ import annotations

import torch

_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def max_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    return (out.double() - ref64).abs().max().item() if out.numel() else 0.0


def assert_tolerance(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, what: str = "output") -> None:
    """Assert max|out − ref64| ≤ 2·max|same_dtype − ref64| + floor(out.dtype)·max(1, max|ref64|).

    out: the kernel's result; ref64: the float64 reference; same_dtype: plain PyTorch's result in
    out's dtype (e.g. F.linear in that dtype). Shapes must match; NaNs fail."""
    assert out.shape == ref64.shape == same_dtype.shape, (out.shape, ref64.shape, same_dtype.shape)
    assert out.dtype == same_dtype.dtype, (out.dtype, same_dtype.dtype)
    assert not torch.isnan(out).any(), f"{what}: NaN in the result"
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
    err, base = max_error(out, ref64), max_error(same_dtype, ref64)
    bound = 2 * base + _FLOOR[out.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > 2 × {base:.3g} (PyTorch in {out.dtype}) + floor = {bound:.3g}"
