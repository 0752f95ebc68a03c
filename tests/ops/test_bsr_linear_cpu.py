"""bsr_linear on CPU (the C++ kernel of sparse_ops._C, csrc/cpu/bsr_linear.cpp, when built; the
reference otherwise, and SPARSE_OPS_REQUIRE_EXT=1 makes a missing kernel a failure) through
torch.ops.sparse_ops.bsr_linear, against a float64 dense reference with flash-attention's tolerance
rule (tests/_tolerance.py). The Triton kernels are tested in tests/ops/test_bsr_linear.py.

Every weight has shapes that are not multiples of the block, an empty block row and NaN in the
padding of its stored blocks: a kernel that reads x or W past in_features, or mixes padding rows into
real outputs, returns NaN and fails. Every path runs: dot products (M ≤ 4); token panels (M ≥ 5) of
16 tokens with AVX2 and of 16 to 64 tokens (1 to 4 zmm per row) with AVX-512, each with a narrower
last tile; the token-major path (float32, AVX-512, blocks of 16 or 32 rows, checked bit for bit
against the panel path); the AVX2 loops on AVX-512 CPUs (SPARSE_OPS_CPU_ISA=avx2) and the plain loops used without
AVX2/FMA.
"""

from __future__ import annotations

import os

import _bsr_weights
import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_tolerance
from conftest import FLOAT_DTYPES, run_in_fresh_process, run_with_cpu_baseline

from sparse_ops.sparse.formats import dense_to_bsr
from sparse_ops.ops import has_cpu_kernel, use_backend
from sparse_ops.ops.reference import bsr_to_dense_ref

OPS = torch.ops.sparse_ops
KERNEL = has_cpu_kernel("sparse_ops::bsr_linear_cpu")
REQUIRED = os.environ.get("SPARSE_OPS_REQUIRE_EXT") == "1"
needs_kernel = pytest.mark.skipif(not KERNEL and not REQUIRED,
                                  reason="sparse_ops._C (bsr_linear_cpu) was not built")

OUT, IN = 70, 150
BLOCKS = [(16, 16), (32, 32), (64, 64), (16, 32), (32, 8)]
TOKENS = [1, 4, 5, 17, 33, 64, 100, 300]  # AVX-512 tiles of 16, 32, 48, 64, 64 + 48, 4 × 64 + 48 tokens


def random_bsr_weight(out_features, in_features, block, density, dtype, generator, empty_rows=(1,)):
    return _bsr_weights.random_bsr_weight(out_features, in_features, block, density, dtype, "cpu", generator,
                                          empty_rows)


def check_against_float64(y, x, weight, bias):
    ref64 = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    same_dtype = F.linear(x, weight, bias) if x.dtype != torch.float64 else ref64
    assert_tolerance(y, ref64, same_dtype, "bsr_linear")


def run(x, weight, crow, col, values, bias):
    y = OPS.bsr_linear(x, crow, col, values, bias, weight.shape[0])
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    return y


def inputs(tokens, in_features, out_features, dtype, generator, with_bias):
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    return x, bias


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_matches_float64_reference(dtype, block, tokens):
    g = torch.Generator().manual_seed(tokens * 1000 + block[0] * 10 + block[1])
    weight, crow, col, values = random_bsr_weight(OUT, IN, block, 0.6, dtype, g)
    x, bias = inputs(tokens, IN, OUT, dtype, g, with_bias=tokens % 2 == 1)
    check_against_float64(run(x, weight, crow, col, values, bias), x, weight, bias)


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (37, 53)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("block", [(16, 16), (3, 5), (1, 1)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_odd_shapes_and_blocks(shape, block):
    g = torch.Generator().manual_seed(shape[0] + block[1])
    weight, crow, col, values = random_bsr_weight(*shape, block, 0.6, torch.float32, g, empty_rows=())
    for tokens in (1, 3, 9):
        x, bias = inputs(tokens, shape[1], shape[0], torch.float32, g, with_bias=True)
        check_against_float64(run(x, weight, crow, col, values, bias), x, weight, bias)


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64], ids=str)
def test_reference_backend_and_float64(dtype):
    """use_backend("reference") and float64 (which always runs the reference) meet the same bar."""
    g = torch.Generator().manual_seed(5)
    weight, crow, col, values = random_bsr_weight(OUT, IN, (16, 32), 0.6, dtype, g)
    x, bias = inputs(9, IN, OUT, dtype, g, with_bias=True)
    with use_backend("reference"):
        check_against_float64(run(x, weight, crow, col, values, bias), x, weight, bias)
    check_against_float64(run(x, weight, crow, col, values, bias), x, weight, bias)


@needs_kernel
@pytest.mark.parametrize("tokens", [2, 40])
def test_cpu_op_runs_the_cpp_kernel(tokens):
    assert KERNEL, "sparse_ops._C does not implement bsr_linear_cpu"
    g = torch.Generator().manual_seed(tokens)
    weight, crow, col, values = random_bsr_weight(OUT, IN, (32, 32), 0.6, torch.float32, g)
    x, bias = inputs(tokens, IN, OUT, torch.float32, g, with_bias=True)
    y = run(x, weight, crow, col, values, bias)
    assert torch.equal(y, OPS.bsr_linear_cpu(x, crow, col, values, bias, OUT))  # same kernel, same bits
    check_against_float64(y, x, weight, bias)


@pytest.mark.parametrize("case", ["dense", "no blocks", "one block", "zero blocks stored"])
@pytest.mark.parametrize("tokens", [1, 20])
def test_sparsity_extremes(case, tokens):
    """0% sparsity, no stored block (y = bias), 99.9% (one stored 16×16 block in 64×1000, partly
    zero) and stored blocks that hold only zeros."""
    g = torch.Generator().manual_seed(tokens)
    out_features, in_features = (64, 1000) if case == "one block" else (OUT, IN)
    density = {"dense": 1.0, "no blocks": 0.0, "one block": 0.0, "zero blocks stored": 0.5}[case]
    weight, crow, col, values = random_bsr_weight(out_features, in_features, (16, 16), density, torch.float32, g,
                                                  empty_rows=())
    if case == "one block":
        weight[17:29, 500:512] = torch.randn(12, 12, generator=g)
        crow, col, values = dense_to_bsr(weight, (16, 16))
        assert values.shape[0] == 1
    if case == "zero blocks stored":
        values = values.clone()
        values[::2] = 0.0
        weight = bsr_to_dense_ref(crow, col, values, (out_features, in_features))
    x, bias = inputs(tokens, in_features, out_features, torch.float32, g, with_bias=True)
    y = run(x, weight, crow, col, values, bias)
    check_against_float64(y, x, weight, bias)
    if case == "no blocks":
        assert values.shape[0] == 0 and torch.equal(y, bias.expand_as(y))
        assert torch.equal(run(x, weight, crow, col, values, None), torch.zeros_like(y))
    if case == "dense":
        assert values.shape[0] == (crow.numel() - 1) * -(-in_features // 16)  # every block stored


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_batched_non_contiguous_and_empty_inputs(dtype):
    g = torch.Generator().manual_seed(7)
    weight, crow, col, values = random_bsr_weight(OUT, IN, (16, 32), 0.6, dtype, g)
    x3 = torch.randn(3, 11, IN, generator=g).to(dtype)
    check_against_float64(run(x3, weight, crow, col, values, None), x3, weight, None)
    transposed = torch.randn(IN, 19, generator=g).to(dtype).T
    sliced = torch.randn(3, 200, generator=g).to(dtype)[:, 20:20 + IN]
    for x in (transposed, sliced):
        assert not x.is_contiguous()
        check_against_float64(run(x, weight, crow, col, values, None), x, weight, None)
    bias = torch.randn(2 * OUT, generator=g).to(dtype)[::2]
    check_against_float64(run(transposed, weight, crow, col, values, bias), transposed, weight, bias)
    for shape in [(0, IN), (2, 0, IN)]:
        assert run(torch.zeros(shape, dtype=dtype), weight, crow, col, values, None).shape == (*shape[:-1], OUT)


@needs_kernel
def test_block_rows_of_very_different_sizes_split_between_threads():
    """Full block rows among empty ones (the thread split follows stored blocks) and enough work for
    every thread; also checked with torch on one thread. 3 and 50 tokens (one tile) and 192 (3 tiles
    of 64 with AVX-512) split the block rows between the threads; 128 and 256 give each thread whole
    tiles that it packs itself."""
    g = torch.Generator().manual_seed(3)
    weight, crow, col, values = random_bsr_weight(512, 640, (32, 32), 0.05, torch.float32, g, empty_rows=range(3, 9))
    weight[64:96] = torch.randn(32, 640, generator=g)
    crow, col, values = dense_to_bsr(weight, (32, 32))
    for tokens in (3, 50, 128, 192, 256):
        x, bias = inputs(tokens, 640, 512, torch.float32, g, with_bias=True)
        y = run(x, weight, crow, col, values, bias)
        check_against_float64(y, x, weight, bias)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(OPS.bsr_linear_cpu(x, crow, col, values, bias, 512), y)  # the split changes no sum
        finally:
            torch.set_num_threads(threads)


_BASELINE_SCRIPT = """
import torch, torch.nn.functional as F
import sparse_ops
import _bsr_weights
from _tolerance import assert_tolerance
from test_bsr_linear_cpu import random_bsr_weight
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for block in ((16, 16), (32, 8), (3, 5)):
        w, crow, col, values = random_bsr_weight(70, 150, block, 0.6, dtype, g)
        for tokens in (1, 4, 21, 70):
            x = torch.randn(tokens, 150, generator=g).to(dtype)
            b = torch.randn(70, generator=g).to(dtype)
            y = torch.ops.sparse_ops.bsr_linear_cpu(x, crow, col, values, b, 70)
            assert_tolerance(y, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b), f"{dtype} {tokens}")
print("ok")
"""


@needs_kernel
def test_plain_loop_path_without_avx2():
    """SPARSE_OPS_CPU_BASELINE=1 forces the loops that run on CPUs without AVX2/FMA."""
    run_with_cpu_baseline(_BASELINE_SCRIPT)


@needs_kernel
def test_avx2_path_on_avx512_cpus():
    """SPARSE_OPS_CPU_ISA=avx2 keeps the 16-token ymm loops where AVX-512 would be used; elsewhere
    it is the default path, tested again."""
    run_in_fresh_process(_BASELINE_SCRIPT, SPARSE_OPS_CPU_ISA="avx2")


@needs_kernel
@pytest.mark.parametrize("block", ((16, 16), (32, 32), (16, 32)))
def test_token_major_path_matches_the_panel_path(block):
    """float32 with blocks of 16 or 32 rows on AVX-512 (bsr_token_major: x read in place, y written
    from the registers, 12 tokens per tile, so 5, 11, 13 and 25 tokens exercise the narrower last
    tile) sums in the same order as the panel path, which takes the same weight stored in blocks of
    8 rows: the same bits, with and without GELU (both use the ISA's FMA GELU). On other CPUs both
    sides run the panel path, with different strips. Each result also meets the float64 reference,
    with NaN in the stored blocks' padding."""
    g = torch.Generator().manual_seed(11)
    w, crow, col, values = random_bsr_weight(70, 150, block, 0.6, torch.float32, g)
    crow8, col8, values8 = dense_to_bsr(w, (8, block[1]))
    for tokens in (5, 11, 12, 13, 25, 130):
        x, b = torch.randn(tokens, 150, generator=g), torch.randn(70, generator=g)
        ys = {act: OPS.bsr_linear_cpu(x, crow, col, values, b, 70, act) for act in ("none", "gelu")}
        for act, y in ys.items():
            assert torch.equal(y, OPS.bsr_linear_cpu(x, crow8, col8, values8, b, 70, act)), (tokens, act)
        check_against_float64(ys["none"], x, w, b)


def _triple():
    weight = torch.zeros(40, 50)
    weight[0, 1] = weight[35, 49] = 1.0
    return dense_to_bsr(weight, (16, 16))  # 3 block rows, 4 block columns, 2 blocks


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x, c, k, v, b: (x, c.long(), k, v, b, 40), TypeError, "crow_indices"),
    (lambda x, c, k, v, b: (x, c, k.long(), v, b, 40), TypeError, "col_indices"),
    (lambda x, c, k, v, b: (x, c, k, v.bfloat16(), b, 40), TypeError, "values must have the dtype of x"),
    (lambda x, c, k, v, b: (x, c, k, v.flatten(1), b, 40), ValueError, "values must have shape"),
    (lambda x, c, k, v, b: (x, c, k, v, b, 60), ValueError, "crow_indices must have 5 entries"),
    (lambda x, c, k, v, b: (x, c, k[:1], v, b, 40), ValueError, "col_indices has 1 entries"),
    (lambda x, c, k, v, b: (x, c, k, v, b[:-1], 40), ValueError, "bias must be None or of shape"),
    (lambda x, c, k, v, b: (x, c, k, v, b, -1), ValueError, "out_features"),
])
def test_bad_inputs_name_the_argument(bad, exc, match):
    crow, col, values = _triple()
    args = bad(torch.randn(3, 50), crow, col, values, torch.randn(40))
    with pytest.raises(exc, match=match):
        OPS.bsr_linear(*args)


@needs_kernel
@pytest.mark.parametrize("bad,match", [
    (lambda c, k, v: (torch.tensor([0, 1, 1, 1], dtype=torch.int32), k, v), "crow_indices must start at 0 and end"),
    (lambda c, k, v: (torch.tensor([0, 2, 1, 2], dtype=torch.int32), k, v), "crow_indices must be non-decreasing"),
    (lambda c, k, v: (c, torch.tensor([0, 4], dtype=torch.int32), v), r"col_indices must lie in \[0, 4\)"),
    (lambda c, k, v: (c, k, v[:, :, :0]), "values must have shape"),
])
def test_kernel_rejects_malformed_indices(bad, match):
    """The C++ kernel checks block indices too (O(block rows + blocks)), so it never reads out of bounds."""
    crow, col, values = bad(*_triple())
    with pytest.raises(RuntimeError, match=match):
        OPS.bsr_linear_cpu(torch.randn(3, 50), crow, col, values, None, 40)
