"""The sparse linear ops' newer paths, against float64 references with flash-attention's tolerance rule
(tests/_tolerance.py):

* activation="gelu": act(x @ Wᵀ + bias) with the erf GELU fused into the C++ kernels' write-back
  (csr and bsr; one token, tiles of up to 64 tokens, several tiles), and applied after the product
  on the reference backend;
* uint16 column indices (csr): bit-identical to int32 ones, at in_features = 65,536 (the last width
  they address, columns up to 65,535 used) and refused past it; SparseLinear uses them on CPU up to
  that width and int32 beyond;
* SparseLinear's fast path (one direct kernel call on indices validated once): the same bits as the
  public op, re-validation after the buffers are written to or assigned, deepcopy and pickle, and
  autograd through the activation.
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_tolerance
from conftest import FLOAT_DTYPES, run_in_fresh_process, run_with_cpu_baseline

import sparse_ops
from sparse_ops import SparseLinear
from sparse_ops.sparse.formats import dense_to_bsr, dense_to_csr
from sparse_ops.ops import has_cpu_kernel, use_backend

OPS = torch.ops.sparse_ops
KERNEL = has_cpu_kernel("sparse_ops::csr_linear_cpu") and has_cpu_kernel("sparse_ops::bsr_linear_cpu")
needs_kernel = pytest.mark.skipif(not KERNEL and os.environ.get("SPARSE_OPS_REQUIRE_EXT") != "1",
                                  reason="sparse_ops._C was not built")


def pruned(out_features, in_features, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5 * 3
    weight *= torch.rand(out_features, in_features, generator=g) < density
    bias = torch.randn(out_features, generator=g)
    return weight.to(dtype), bias.to(dtype), g


def gelu_reference(x, weight, bias):
    """(float64 reference, plain PyTorch in x.dtype) of gelu(x @ Wᵀ + bias)."""
    ref64 = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    if x.dtype in (torch.float16, torch.bfloat16):  # PyTorch's own: linear in the dtype, GELU in float32
        same = F.gelu(F.linear(x, weight, bias).float()).to(x.dtype)
    else:
        same = F.gelu(F.linear(x, weight, bias))
    return ref64, same


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 37, 130])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_gelu_epilogue_matches_float64(fmt, tokens, dtype):
    weight, bias, g = pruned(70, 45, 0.3, dtype, seed=tokens * 13 + len(fmt))
    x = (torch.randn(tokens, 45, generator=g) * 2).to(dtype)
    triple = dense_to_csr(weight) if fmt == "csr" else dense_to_bsr(weight, (16, 8))
    op = OPS.csr_linear if fmt == "csr" else OPS.bsr_linear
    y = op(x, *triple, bias, 70, "gelu")
    ref64, same = gelu_reference(x, weight, bias)
    assert_tolerance(y, ref64, same, f"{fmt}_linear gelu")
    assert (ref64 < 0).any() and (ref64 > 1).any(), "the inputs must reach both sides of the GELU"
    with use_backend("reference"):  # the activation applied after the product
        assert_tolerance(op(x, *triple, bias, 70, "gelu"), ref64, same, f"{fmt}_linear gelu (reference)")


@needs_kernel
def test_gelu_of_extreme_values():
    """Large negative and positive pre-activations (the erfc tail and the saturation), zero, no bias."""
    pre = torch.tensor([[-30.0, -9.0, -5.0, -3.0, -1e-3, 0.0, 1e-3, 0.7, 3.0, 9.0, 30.0, 1e4]])
    eye = torch.eye(pre.shape[1])
    y = OPS.csr_linear(pre, *dense_to_csr(eye), None, pre.shape[1], "gelu")
    ref64 = F.gelu(pre.double())
    assert_tolerance(y, ref64, F.gelu(pre), "gelu tails")


def check_gelu_grid():
    """Every pre-activation in [-10, 10] by steps of 1/202, at 1 and 40 tokens (one token, and token
    tiles, whose widths are not all multiples of the vector width), CSR and BSR, then the tails, 9
    tokens: against float64. Also run in fresh processes on the other ISA paths (below)."""
    for tokens in (1, 40):
        pre = torch.linspace(-10.0, 10.0, 4040).view(tokens, -1)
        eye = torch.eye(pre.shape[1])
        for fmt, triple in (("csr", dense_to_csr(eye)), ("bsr", dense_to_bsr(eye, (4, 4)))):
            op = OPS.csr_linear if fmt == "csr" else OPS.bsr_linear
            y = op(pre, *triple, None, pre.shape[1], "gelu")
            assert_tolerance(y, F.gelu(pre.double()), F.gelu(pre), f"{fmt} gelu grid, {tokens} tokens")
    tails = torch.tensor([-1e4, -90.0, -30.0, -13.3, -13.0, -9.0, 0.0, 9.0, 30.0, 1e4]).repeat(9, 1)
    y = OPS.csr_linear(tails, *dense_to_csr(torch.eye(10)), None, 10, "gelu")
    assert_tolerance(y, F.gelu(tails.double()), F.gelu(tails), "gelu tails")


@needs_kernel
@pytest.mark.parametrize("isa", ["default", "avx2", "baseline"])
def test_gelu_on_a_fine_grid(isa):
    """check_gelu_grid on this CPU's GELU (in this process), on the AVX2 GELU (SPARSE_OPS_CPU_ISA=avx2,
    on AVX-512 CPUs) and on the plain loop (SPARSE_OPS_CPU_BASELINE=1); the last two in fresh processes
    (the kernels read the switches once)."""
    script = "from test_sparse_linear_epilogue import check_gelu_grid\ncheck_gelu_grid()\nprint('ok')\n"
    if isa == "default":
        check_gelu_grid()
    elif isa == "avx2":
        run_in_fresh_process(script, SPARSE_OPS_CPU_ISA="avx2")
    else:
        run_with_cpu_baseline(script)


def test_activation_is_checked():
    weight, bias, _ = pruned(4, 6, 0.5, torch.float32, seed=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        OPS.csr_linear(torch.randn(2, 6), *dense_to_csr(weight), bias, 4, "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseLinear(6, 4, "csr", activation="tanh")


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 5, 70])
def test_uint16_columns_at_the_boundary(tokens):
    """in_features = 65,536: uint16 columns reach 65,535 and give the very bits of int32 ones."""
    k = 1 << 16
    weight = torch.zeros(3, k)
    g = torch.Generator().manual_seed(tokens)
    cols = torch.tensor([0, 1, 40000, k - 2, k - 1])
    weight[0, cols] = torch.randn(5, generator=g)
    weight[2, torch.randint(0, k, (300,), generator=g)] = torch.randn(300, generator=g)
    crow, col, values = dense_to_csr(weight)
    assert int(col.max()) == k - 1
    x = torch.randn(tokens, k, generator=g)
    bias = torch.randn(3, generator=g)
    y32 = OPS.csr_linear(x, crow, col, values, bias, 3)
    y16 = OPS.csr_linear(x, crow, col.to(torch.uint16), values, bias, 3)
    assert torch.equal(y16, y32)
    ref64 = F.linear(x.double(), weight.double(), bias.double())
    assert_tolerance(y16, ref64, F.linear(x, weight, bias), "uint16 columns")
    layer = SparseLinear.from_dense(_linear(weight, bias), format="csr")
    assert layer._fast[2].dtype == torch.uint16
    assert torch.equal(layer(x), y32)


@needs_kernel
def test_past_the_boundary_int32_columns():
    """in_features = 65,537: uint16 indices are refused by the op; SparseLinear keeps int32 and reaches
    column 65,536."""
    k = (1 << 16) + 1
    weight = torch.zeros(2, k)
    weight[0, [0, k - 1]] = torch.tensor([1.5, -2.0])
    weight[1, k - 2] = 3.0
    crow, col, values = dense_to_csr(weight)
    x = torch.randn(4, k)
    with pytest.raises(ValueError, match="uint16 indices address in_features <= 65536"):
        OPS.csr_linear(x, crow, col.to(torch.uint16), values, None, 2)
    layer = SparseLinear.from_dense(_linear(weight, None), format="csr")
    assert layer._fast[2].dtype == torch.int32
    assert_tolerance(layer(x), F.linear(x.double(), weight.double()), F.linear(x, weight), "int32 columns")


def test_uint16_columns_are_csr_only():
    weight, bias, _ = pruned(8, 8, 0.5, torch.float32, seed=1)
    crow, col, values = dense_to_bsr(weight, (4, 4))
    with pytest.raises(TypeError, match="col_indices must be a 1-D int32 tensor"):
        OPS.bsr_linear(torch.randn(2, 8), crow, col.to(torch.uint16), values, bias, 8)


def _linear(weight, bias):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@needs_kernel
@pytest.mark.parametrize("fmt", ["csr", "bsr", "2:4"])
def test_fast_path_is_the_public_op(fmt):
    weight, bias, g = pruned(33, 40, 0.5, torch.float32, seed=3)
    if fmt == "2:4":
        weight = weight * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(10)
    layer = SparseLinear.from_dense(_linear(weight, bias), format=fmt, block_size=(8, 8), activation="gelu")
    assert layer._fast is not None
    x = torch.randn(2, 7, 40, generator=g)
    op = OPS.bsr_linear if fmt == "bsr" else OPS.csr_linear
    expected = op(x, layer.crow_indices, layer.col_indices, layer.values, layer.bias, 33, "gelu")
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x[0]), expected[0])  # 2-D input: no reshape


@needs_kernel
def test_fast_path_revalidates_changed_buffers():
    weight, bias, g = pruned(16, 24, 0.4, torch.float32, seed=4)
    weight[0] = 0
    weight[0, 2] = 1.25  # row 0: one entry, the first stored one
    layer = SparseLinear.from_dense(_linear(weight, bias), format="csr")
    x = torch.randn(3, 24, generator=g)
    with torch.no_grad():
        layer.col_indices[0] = 24  # out of range, written in place
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 24\)"):
        layer(x)
    with torch.no_grad():
        layer.col_indices[0] = 23  # a valid column again: the new pattern is used, not a stale copy
    moved = weight.clone()
    moved[0, 2], moved[0, 23] = 0.0, 1.25
    assert_tolerance(layer(x), F.linear(x.double(), moved.double(), bias.double()),
                     F.linear(x, moved, bias), "after an in-place index change")
    layer.values = layer.values * 2  # a new tensor assigned: picked up too
    assert_tolerance(layer(x), F.linear(x.double(), 2 * moved.double(), bias.double()),
                     F.linear(x, 2 * moved, bias), "after assigning new values")


@needs_kernel
def test_fast_path_survives_copies():
    weight, bias, g = pruned(10, 12, 0.5, torch.float32, seed=5)
    layer = SparseLinear.from_dense(_linear(weight, bias), format="csr", activation="gelu")
    x = torch.randn(4, 12, generator=g)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._fast is not None and other._buffers_unchanged()
        assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_autograd_through_the_activation(fmt):
    """x.requires_grad: the public op with its backward (gelu'(pre) · grad, then @ W), in float64."""
    weight, bias, g = pruned(9, 11, 0.5, torch.float64, seed=6)
    layer = SparseLinear.from_dense(_linear(weight, bias), format=fmt, block_size=(4, 4), activation="gelu")
    x = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    xf = x.detach().float().requires_grad_()
    layer32 = layer.float()
    layer32(xf).sum().backward()
    ref = x.detach().clone().requires_grad_()
    F.gelu(F.linear(ref, weight, bias)).sum().backward()
    torch.testing.assert_close(xf.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_opcheck_with_activation_and_uint16():
    weight, bias, g = pruned(12, 20, 0.4, torch.float32, seed=7)
    crow, col, values = dense_to_csr(weight)
    x = torch.randn(6, 20, generator=g)
    torch.library.opcheck(OPS.csr_linear.default, (x, crow, col.to(torch.uint16), values, bias, 12, "gelu"))
    bcrow, bcol, bvalues = dense_to_bsr(weight, (4, 4))
    torch.library.opcheck(OPS.bsr_linear.default, (x, bcrow, bcol, bvalues, bias, 12, "gelu"))


def test_dense_format_applies_the_activation():
    weight, bias, g = pruned(6, 8, 0.5, torch.float32, seed=8)
    layer = SparseLinear.from_dense(_linear(weight, bias), format="dense", activation="gelu")
    x = torch.randn(3, 8, generator=g)
    assert torch.equal(layer(x), F.gelu(F.linear(x, weight, bias)))
    assert "activation=gelu" in repr(layer)


@needs_kernel
def test_compiled_forward_with_activation():
    weight, bias, g = pruned(20, 30, 0.3, torch.float32, seed=9)
    layer = SparseLinear.from_dense(_linear(weight, bias), format="csr", activation="gelu")
    x = torch.randn(5, 30, generator=g)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))
    assert sparse_ops.SparseLinear is SparseLinear


def test_a_forced_backend_bypasses_the_direct_call(monkeypatch):
    """use_backend("reference") reaches the reference kernel: the fast path does not skip the dispatch."""
    from sparse_ops.ops import reference

    calls = []
    original = reference.csr_linear_ref
    monkeypatch.setattr(reference, "csr_linear_ref", lambda *args: calls.append(1) or original(*args))
    weight, bias, g = pruned(8, 10, 0.5, torch.float32, seed=10)
    layer = SparseLinear.from_dense(_linear(weight, bias), format="csr")
    x = torch.randn(3, 10, generator=g)
    with use_backend("reference"):
        y = layer(x)
    assert calls == [1]
    assert_tolerance(y, F.linear(x.double(), weight.double(), bias.double()), F.linear(x, weight, bias), "reference")
