"""Elementwise gradient of the negative log mixture Gaussian prior (docs/design.md §2.1), in Triton.

Numerics: loads any float dtype, computes in float32 with the sigmoid form
p0 = 1/(1 + exp(c2·θ² + c1)) (exp overflows to +inf, giving p0 = 0, never NaN), stores in the
input dtype. Not in place: returns a new contiguous tensor.
"""

import torch
import triton
import triton.language as tl

from sparse_ops.ops.prior import mgp_constants

from . import _runtime  # noqa: F401  (first: see its docstring)
from ._numerics import on_device, round_to

BLOCK = 1024


@triton.jit
def prior_grad(theta, c1, c2, inv0, inv1):
    """θ·(p0/v0 + (1 − p0)/v1) for float32 θ."""
    p0 = 1.0 / (1.0 + tl.exp(c2 * theta * theta + c1))
    return theta * (p0 * inv0 + (1.0 - p0) * inv1)


@triton.jit
def _mgp_prior_grad_kernel(w_ptr, out_ptr, n, c1, c2, inv0, inv1, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    theta = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    out = scale * prior_grad(theta, c1, c2, inv0, inv1)
    tl.store(out_ptr + offs, round_to(out, out_ptr.dtype.element_ty), mask=inside)


def mgp_prior_grad_triton(w: torch.Tensor, lam: float, var0: float, var1: float, scale: float = 1.0) -> torch.Tensor:
    c1, c2, inv0, inv1 = mgp_constants(lam, var0, var1)
    w = w.contiguous()
    out = torch.empty_like(w)
    n = w.numel()
    if n:
        with on_device(w):
            _mgp_prior_grad_kernel[(triton.cdiv(n, BLOCK),)](w, out, n, c1, c2, inv0, inv1, scale, BLOCK=BLOCK,
                                                             enable_fp_fusion=False)
    return out
