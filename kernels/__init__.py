"""Triton kernels and their launchers, installed as sparse_ops.kernels.

Each module holds `_<op>_kernel` (the @triton.jit code) and `<op>_triton` (the launcher). They run on
CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (set before this package is imported).
"""

from . import bsr_linear, fused_prune_step, kthvalue, mgp_prior_grad

__all__ = ["bsr_linear", "fused_prune_step", "kthvalue", "mgp_prior_grad"]
