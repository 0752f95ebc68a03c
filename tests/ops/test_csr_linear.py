"""csr_linear through torch.ops.sparse_ops.csr_linear against a float64 dense reference, with
flash-attention's tolerance rule (tests/_tolerance.py).

On CPU the op runs the C++ kernel of sparse_ops._C (csrc/cpu/csr_linear.cpp) when it was built (the
reference otherwise; SPARSE_OPS_REQUIRE_EXT=1 makes a missing kernel a failure); on CUDA the CUDA
kernel. Shapes cover the kernel's paths: one token (dot products), tiles of up to 64 tokens with a
narrower last tile, several column chunks (in_features 2000), rows split between threads by stored
entries, and the plain-loop path that runs without AVX2/FMA (SPARSE_OPS_CPU_BASELINE=1, in a
subprocess).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_tolerance
from conftest import FLOAT_DTYPES, run_in_fresh_process, run_with_cpu_baseline

from sparse_ops.sparse.formats import dense_to_csr
from sparse_ops.ops import has_cpu_kernel, use_backend

OPS = torch.ops.sparse_ops
KERNEL = has_cpu_kernel("sparse_ops::csr_linear_cpu")
REQUIRED = os.environ.get("SPARSE_OPS_REQUIRE_EXT") == "1"
needs_kernel = pytest.mark.skipif(not KERNEL and not REQUIRED,
                                  reason="sparse_ops._C (csr_linear_cpu) was not built")

# (out_features, in_features): odd sizes, a single weight, a long row (several column chunks of a 64-token tile)
SHAPES = [(37, 53), (1, 1), (5, 300), (20, 2000)]
TOKENS = [1, 3, 8, 16, 17, 32, 47, 64, 100, 300]  # tile widths 8..64: both the 8- and 16-lane loops


def random_csr_weight(out_features, in_features, density, dtype, generator, empty_rows=(1,)):
    """A dense weight with entries kept with probability `density` (rows in `empty_rows` all zero) and
    its CSR triple."""
    weight = torch.randn(out_features, in_features, generator=generator)
    weight *= torch.rand(out_features, in_features, generator=generator) < density
    for r in empty_rows:
        if r < out_features:
            weight[r] = 0
    weight = weight.to(dtype)
    return (weight, *dense_to_csr(weight))


def check_against_float64(y, x, weight, bias):
    ref64 = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    same_dtype = F.linear(x, weight, bias) if x.dtype != torch.float64 else ref64
    assert_tolerance(y, ref64, same_dtype, "csr_linear")


def run(x, weight, crow, col, values, bias):
    device = x.device
    y = OPS.csr_linear(x, crow.to(device), col.to(device), values.to(device), bias, weight.shape[0])
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype and y.device == x.device
    return y


def inputs(tokens, in_features, out_features, dtype, device, generator, with_bias):
    x = torch.randn(tokens, in_features, generator=generator).to(dtype).to(device)
    bias = torch.randn(out_features, generator=generator).to(dtype).to(device) if with_bias else None
    return x, bias


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64_reference(device, dtype, shape, tokens):
    g = torch.Generator().manual_seed(tokens * 7919 + shape[0] * 31 + shape[1])
    weight, crow, col, values = random_csr_weight(*shape, 0.3, dtype, g)
    x, bias = inputs(tokens, shape[1], shape[0], dtype, device, g, with_bias=tokens % 2 == 1)
    check_against_float64(run(x, weight.to(device), crow, col, values, bias), x, weight.to(device), bias)


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64], ids=str)
def test_reference_backend_and_float64(device, dtype):
    """use_backend("reference") and float64 (which always runs the reference) meet the same bar."""
    g = torch.Generator().manual_seed(5)
    weight, crow, col, values = random_csr_weight(37, 53, 0.3, dtype, g)
    weight = weight.to(device)
    x, bias = inputs(9, 53, 37, dtype, device, g, with_bias=True)
    with use_backend("reference"):
        check_against_float64(run(x, weight, crow, col, values, bias), x, weight, bias)
    check_against_float64(run(x, weight, crow, col, values, bias), x, weight, bias)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 70])
def test_cpu_op_runs_the_cpp_kernel(tokens):
    assert KERNEL, "sparse_ops._C does not implement csr_linear_cpu"
    g = torch.Generator().manual_seed(tokens)
    weight, crow, col, values = random_csr_weight(40, 90, 0.3, torch.float32, g)
    x, bias = inputs(tokens, 90, 40, torch.float32, "cpu", g, with_bias=True)
    y = run(x, weight, crow, col, values, bias)
    assert torch.equal(y, OPS.csr_linear_cpu(x, crow, col, values, bias, 40))  # same kernel, same bits
    check_against_float64(y, x, weight, bias)


@pytest.mark.parametrize("case", ["dense", "all zero", "one entry", "empty rows"])
@pytest.mark.parametrize("tokens", [1, 20])
def test_sparsity_extremes(device, case, tokens):
    """0% sparsity, an all-zero weight (y = bias), 99.9%+ (one stored entry in 64×1000), half the rows empty."""
    g = torch.Generator().manual_seed(tokens)
    out_features, in_features = (64, 1000) if case == "one entry" else (40, 70)
    density = {"dense": 1.0, "all zero": 0.0, "one entry": 0.0, "empty rows": 0.5}[case]
    empty = range(0, out_features, 2) if case == "empty rows" else ()
    weight, crow, col, values = random_csr_weight(out_features, in_features, density, torch.float32, g, empty)
    if case == "one entry":
        weight[17, 503] = 1.5
        crow, col, values = dense_to_csr(weight)
    expected_entries = {"dense": out_features * in_features, "all zero": 0, "one entry": 1}
    assert values.numel() == expected_entries.get(case, int((weight != 0).sum()))
    weight = weight.to(device)
    x, bias = inputs(tokens, in_features, out_features, torch.float32, device, g, with_bias=True)
    y = run(x, weight, crow, col, values, bias)
    check_against_float64(y, x, weight, bias)
    if case == "all zero":
        assert torch.equal(y, bias.expand_as(y))
        assert torch.equal(run(x, weight, crow, col, values, None), torch.zeros_like(y))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_batched_non_contiguous_and_empty_inputs(device, dtype):
    g = torch.Generator().manual_seed(11)
    weight, crow, col, values = random_csr_weight(37, 53, 0.3, dtype, g)
    weight = weight.to(device)
    x3 = torch.randn(3, 11, 53, generator=g).to(dtype).to(device)
    check_against_float64(run(x3, weight, crow, col, values, None), x3, weight, None)
    transposed = torch.randn(53, 19, generator=g).to(dtype).to(device).T
    sliced = torch.randn(19, 120, generator=g).to(dtype).to(device)[:, 7:60]
    for x in (transposed, sliced):
        assert not x.is_contiguous()
        check_against_float64(run(x, weight, crow, col, values, None), x, weight, None)
    bias = torch.randn(74, generator=g).to(dtype).to(device)[::2]  # strided bias
    check_against_float64(run(sliced, weight, crow, col, values, bias), sliced, weight, bias)
    for shape in [(0, 53), (2, 0, 53)]:
        assert run(torch.zeros(shape, dtype=dtype, device=device), weight, crow, col, values, None).shape == (
            *shape[:-1], 37)


@needs_kernel
def test_rows_of_very_different_lengths_split_between_threads():
    """A few full rows among many empty or short ones (the thread split follows stored entries) and
    enough work for every thread; also checked with torch on one thread."""
    g = torch.Generator().manual_seed(3)
    weight, crow, col, values = random_csr_weight(500, 700, 0.02, torch.float32, g, empty_rows=range(100, 300))
    weight[::97] = torch.randn(6, 700, generator=g)
    crow, col, values = dense_to_csr(weight)
    x, bias = inputs(80, 700, 500, torch.float32, "cpu", g, with_bias=True)
    y = run(x, weight, crow, col, values, bias)
    check_against_float64(y, x, weight, bias)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(OPS.csr_linear_cpu(x, crow, col, values, bias, 500), y)  # the split changes no sum
    finally:
        torch.set_num_threads(threads)


def two_threads_equal_one(x, weight, crow, col, values, bias):
    """On two threads the result matches float64 and equals the single-thread result bit for bit."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = run(x, weight, crow, col, values, bias)
        check_against_float64(y, x, weight, bias)
        torch.set_num_threads(1)
        assert torch.equal(OPS.csr_linear_cpu(x, crow, col, values, bias, weight.shape[0]), y)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("tokens", [64, 128, 192, 520])
def test_threads_split_rows_or_token_tiles(tokens):
    """On two threads the kernel splits the rows (1 or 3 tiles of tokens: 64, 192) or gives each thread
    whole tiles that it packs itself (2 tiles, or ≥ 4 per thread: 128, 520); either way every sum is
    the one a single thread makes, and matches float64."""
    g = torch.Generator().manual_seed(7)
    weight, crow, col, values = random_csr_weight(300, 700, 0.3, torch.float32, g, empty_rows=range(0, 300, 11))
    x, bias = inputs(tokens, 700, 300, torch.float32, "cpu", g, with_bias=True)
    two_threads_equal_one(x, weight, crow, col, values, bias)


@needs_kernel
def test_one_token_split_between_threads():
    """M = 1 takes a second thread from 16K stored entries: a 600x900 layer at 10% (54K entries, uneven
    rows) split between the threads equals the single-thread result exactly and matches float64."""
    g = torch.Generator().manual_seed(5)
    weight, crow, col, values = random_csr_weight(600, 900, 0.1, torch.float32, g, empty_rows=range(0, 600, 7))
    x, bias = inputs(1, 900, 600, torch.float32, "cpu", g, with_bias=True)
    two_threads_equal_one(x, weight, crow, col, values, bias)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 40])
def test_unsorted_columns_give_the_same_result(tokens):
    """The kernel documents that columns need not be sorted within a row (only slower)."""
    g = torch.Generator().manual_seed(tokens)
    weight, crow, col, values = random_csr_weight(30, 600, 0.3, torch.float32, g)
    bounds = crow.tolist()
    order = torch.cat([torch.randperm(e - s, generator=g) + s for s, e in itertools.pairwise(bounds)])
    assert not torch.equal(order, torch.arange(order.numel()))
    x, _ = inputs(tokens, 600, 30, torch.float32, "cpu", g, with_bias=False)
    check_against_float64(OPS.csr_linear_cpu(x, crow, col[order], values[order], None, 30), x, weight, None)


_BASELINE_SCRIPT = """
import torch, torch.nn.functional as F
import sparse_ops
from sparse_ops.sparse.formats import dense_to_csr
from _tolerance import assert_tolerance
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for tokens, (n, k) in [(1, (37, 53)), (5, (37, 53)), (16, (37, 53)), (30, (41, 77)), (47, (9, 300)),
                           (70, (20, 2000)), (128, (40, 301))]:
        w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.3)
        w = w.to(dtype)
        x = torch.randn(tokens, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        crow, col, values = dense_to_csr(w)
        ref64, same = F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b)
        for index in (col, col.to(torch.uint16)):
            y = torch.ops.sparse_ops.csr_linear_cpu(x, crow, index, values, b, n)
            assert_tolerance(y, ref64, same, f"{dtype} {tokens} {index.dtype}")
print("ok")
"""


@needs_kernel
def test_plain_loop_path_without_avx2():
    """SPARSE_OPS_CPU_BASELINE=1 forces the loops that run on CPUs without AVX2/FMA."""
    run_with_cpu_baseline(_BASELINE_SCRIPT)


@needs_kernel
def test_avx2_path_on_avx512_cpus():
    """SPARSE_OPS_CPU_ISA=avx2 keeps the 8-lane tile loop where AVX-512 would be used (every tile
    width from 8 to 64 tokens, both index types); elsewhere it is the default path, tested again."""
    run_in_fresh_process(_BASELINE_SCRIPT, SPARSE_OPS_CPU_ISA="avx2")


def _triple(out_features=4, in_features=6):
    weight = torch.zeros(out_features, in_features)
    weight[0, 1] = weight[2, 5] = 1.0
    return dense_to_csr(weight)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x, c, k, v, b: (x.int(), c, k, v, b, 4), TypeError, "x must"),
    (lambda x, c, k, v, b: (x, c.long(), k, v, b, 4), TypeError, "crow_indices"),
    (lambda x, c, k, v, b: (x, c, k.long(), v, b, 4), TypeError, "col_indices"),
    (lambda x, c, k, v, b: (x, c, k, v.half(), b, 4), TypeError, "values must have the dtype of x"),
    (lambda x, c, k, v, b: (x, c, k, v[:, None], b, 4), ValueError, "values must be 1-D"),
    (lambda x, c, k, v, b: (x, c[:-1], k, v, b, 4), ValueError, "crow_indices must have 5 entries"),
    (lambda x, c, k, v, b: (x, c, k[:1], v, b, 4), ValueError, "col_indices has 1 entries"),
    (lambda x, c, k, v, b: (x, c, k, v, b[:3], 4), ValueError, "bias must be None or of shape"),
    (lambda x, c, k, v, b: (x, c, k, v, b.double(), 4), ValueError, "bias must be None or of shape"),
    (lambda x, c, k, v, b: (x, c, k, v, b, 0), ValueError, "out_features"),
    (lambda x, c, k, v, b: (x[:, :0], c, k, v, b, 4), ValueError, "in_features"),
])
def test_bad_inputs_name_the_argument(bad, exc, match):
    crow, col, values = _triple()
    args = bad(torch.randn(3, 6), crow, col, values, torch.randn(4))
    with pytest.raises(exc, match=match):
        OPS.csr_linear(*args)


@needs_kernel
@pytest.mark.parametrize("bad,match", [
    (lambda c, k, v: (torch.tensor([1, 1, 2, 2, 2], dtype=torch.int32), k, v), "crow_indices must start at 0"),
    (lambda c, k, v: (torch.tensor([0, 2, 1, 2, 2], dtype=torch.int32), k, v),
     "crow_indices must be non-decreasing"),
    (lambda c, k, v: (c, torch.tensor([1, 6], dtype=torch.int32), v), r"col_indices must lie in \[0, 6\)"),
    (lambda c, k, v: (c, torch.tensor([-1, 5], dtype=torch.int32), v), r"col_indices must lie in \[0, 6\)"),
])
def test_kernel_rejects_malformed_indices(bad, match):
    """The C++ kernel checks index contents too (O(rows + nnz)), so it never reads out of bounds."""
    crow, col, values = bad(*_triple())
    with pytest.raises(RuntimeError, match=match):
        OPS.csr_linear_cpu(torch.randn(3, 6), crow, col, values, None, 4)
    with pytest.raises(RuntimeError, match="x must have dtype float32, float16 or bfloat16"):
        OPS.csr_linear_cpu(torch.randn(3, 6).double(), *_triple(), None, 4)
