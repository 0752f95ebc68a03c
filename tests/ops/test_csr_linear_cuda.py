"""csr_linear on CUDA: the kernel of csrc/cuda/csr_linear.cu through torch.ops.sparse_ops.csr_linear
(and its private twin csr_linear_cuda for what the public op never passes it). Skipped without a GPU.

Outputs follow flash-attention's rule (tests/_tolerance.py) against a float64 dense reference, with
F.linear on the masked dense weight in the same dtype as the baseline: odd shapes, M in
{1, 3, 16, 17, 128, 2048} (one token, one tile, several tiles), empty rows, 0% / 90% / 99.9%
sparsity, fp32/fp16/bf16, with and without bias. The CSR arrays are built with plain torch.
scripts/sanitize_cuda.sh runs this file under compute-sanitizer.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_tolerance

import sparse_ops  # noqa: F401  (registers the ops, loads sparse_ops._C)
from sparse_ops.ops._extension import has_cuda_kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def cuda_kernel():
    """The CUDA kernel must be registered: else the public op would silently use the reference."""
    if not has_cuda_kernel("sparse_ops::csr_linear_cuda"):
        message = ("sparse_ops._C has no CUDA kernel for csr_linear_cuda (built without CUDA: torch without "
                   "CUDA, or nvcc missing at build time; rebuild with bash scripts/setup.sh)")
        if os.environ.get("SPARSE_OPS_REQUIRE_EXT") == "1":
            pytest.fail(message)
        pytest.skip(message)


def make_csr(n, k, density, dtype, gen, empty_rows=True):
    """A random (n, k) weight with the given density, rounded to dtype; returns the float64 dense
    weight and its CSR arrays on the GPU (crow/col int32, values in dtype)."""
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * (torch.rand(n, k, generator=gen) < density)
    if empty_rows and n > 2:
        w[::5] = 0
    w = w.to(dtype).double()
    rows, cols = w.nonzero(as_tuple=True)
    crow = torch.zeros(n + 1, dtype=torch.int32)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    values = w[rows, cols].to(dtype)
    return w.cuda(), crow.cuda(), cols.to(torch.int32).cuda(), values.cuda()


def check(y, x, w, bias):
    """y against float64 x @ wᵀ + bias, with F.linear in y's dtype as the baseline."""
    ref = x.double() @ w.T
    if bias is not None:
        ref = ref + bias.double()
    assert_tolerance(y, ref, F.linear(x, w.to(x.dtype), bias), what=f"csr_linear {tuple(x.shape)} {x.dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 128])
@pytest.mark.parametrize("density", [1.0, 0.1, 0.001])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_reference(dtype, M, density, with_bias):
    gen = torch.Generator().manual_seed(M * 7 + int(density * 1000))
    for n, k in [(333, 517), (65, 4099)]:
        w, crow, col, values = make_csr(n, k, density, dtype, gen)
        x = torch.randn(M, k, generator=gen).to(dtype).cuda()
        bias = torch.randn(n, generator=gen).to(dtype).cuda() if with_bias else None
        y = torch.ops.sparse_ops.csr_linear(x, crow, col, values, bias, n)
        assert y.shape == (M, n) and y.dtype == dtype and y.device == x.device
        check(y, x, w, bias)
        empty = (crow[1:] == crow[:-1]).nonzero().flatten()
        assert empty.numel() > 0
        # rows without nonzeros are exactly the bias (or 0)
        want = bias[empty].expand(M, -1) if with_bias else torch.zeros(M, empty.numel(), dtype=dtype, device="cuda")
        assert torch.equal(y[:, empty], want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bert_shapes_many_tokens(dtype):
    gen = torch.Generator().manual_seed(11)
    for n, k in [(3072, 768), (768, 3072)]:
        w, crow, col, values = make_csr(n, k, 0.1, dtype, gen, empty_rows=False)
        bias = torch.randn(n, generator=gen).to(dtype).cuda()
        for M in (1, 16, 2048):
            x = torch.randn(M, k, generator=gen).to(dtype).cuda()
            check(torch.ops.sparse_ops.csr_linear(x, crow, col, values, bias, n), x, w, bias)


def test_leading_dims_and_non_contiguous_x():
    gen = torch.Generator().manual_seed(5)
    w, crow, col, values = make_csr(40, 70, 0.2, torch.float16, gen)
    x = torch.randn(70, 3, 2, generator=gen).half().cuda().permute(2, 1, 0)  # (2, 3, 70), non-contiguous
    assert not x.is_contiguous()
    y = torch.ops.sparse_ops.csr_linear(x, crow, col, values, None, 40)
    assert y.shape == (2, 3, 40)
    check(y.reshape(6, 40), x.reshape(6, 70), w, None)


def test_deterministic():
    gen = torch.Generator().manual_seed(6)
    _, crow, col, values = make_csr(500, 900, 0.3, torch.float32, gen)
    x = torch.randn(19, 900, generator=gen).cuda()
    first = torch.ops.sparse_ops.csr_linear(x, crow, col, values, None, 500)
    for _ in range(3):
        assert torch.equal(torch.ops.sparse_ops.csr_linear(x, crow, col, values, None, 500), first)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_index_and_value_storage(dtype):
    # views one element into their storage: the kernel must fall back to scalar loads
    gen = torch.Generator().manual_seed(8)
    w, crow, col, values = make_csr(77, 301, 0.3, dtype, gen)
    col_off = torch.empty(col.numel() + 1, dtype=torch.int32, device="cuda")[1:].copy_(col)
    values_off = torch.empty(values.numel() + 1, dtype=dtype, device="cuda")[1:].copy_(values)
    x = torch.randn(5, 301, generator=gen).to(dtype).cuda()
    check(torch.ops.sparse_ops.csr_linear_cuda(x, crow, col_off, values_off, None, 77), x, w, None)


def test_private_op_edge_shapes():
    gen = torch.Generator().manual_seed(9)
    _, crow, col, values = make_csr(10, 12, 0.5, torch.float32, gen)
    y = torch.ops.sparse_ops.csr_linear_cuda(torch.empty(0, 12, device="cuda"), crow, col, values, None, 10)
    assert y.shape == (0, 10)


def test_private_op_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(10)
    _, crow, col, values = make_csr(10, 12, 0.5, torch.float32, gen)
    x = torch.randn(3, 12, device="cuda")
    op = torch.ops.sparse_ops.csr_linear_cuda
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        op(x.cpu(), crow, col, values, None, 10)
    with pytest.raises(RuntimeError, match="x must have dtype"):
        op(x.double(), crow, col, values.double(), None, 10)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(x[None], crow, col, values, None, 10)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(12, 3, device="cuda").T, crow, col, values, None, 10)
    with pytest.raises(RuntimeError, match="crow_indices must have dtype Int"):
        op(x, crow.long(), col, values, None, 10)
    with pytest.raises(RuntimeError, match="crow_indices must have 12 elements"):
        op(x, crow, col, values, None, 11)
    with pytest.raises(RuntimeError, match="col_indices must be on"):
        op(x, crow, col.cpu(), values, None, 10)
    with pytest.raises(RuntimeError, match="values must have dtype Float"):
        op(x, crow, col, values.half(), None, 10)
    with pytest.raises(RuntimeError, match="values must have"):
        op(x, crow, col, values[1:], None, 10)
    with pytest.raises(RuntimeError, match="bias must have 10 elements"):
        op(x, crow, col, values, torch.zeros(9, device="cuda"), 10)
