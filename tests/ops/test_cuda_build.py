"""The CUDA sources without a GPU: scripts/check_cuda.sh (plain nvcc for sm_80/sm_90, bindings against
the torch headers), and the csr_linear kernels themselves run on the CPU by the warp emulator of
csrc/cuda/emulation/ (the same kernel and plan code, lanes as fibers, shuffles exchanged when all 32
lanes of a warp reach them; misaligned or out-of-buffer loads and divergent shuffles are reported).
The emulated results are checked against an independent float64 computation: exactly on small
integers (every sum is exact in float32, so one rounding to the dtype must give the reference
rounded), and within a rounding-error bound on random normal data."""

import ctypes
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csr_linear.cuh CsrDType


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA compile check needs the CUDA toolkit")
    return nvcc


def test_cuda_sources_compile_with_plain_nvcc():
    _nvcc()
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_cuda.sh")], cwd=ROOT,
                         check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "check_cuda: ok" in run.stdout or "bindings not checked" in run.stdout


# ---------------------------------------------------------------------------------------------
# the kernels, emulated on the CPU
# ---------------------------------------------------------------------------------------------
def _cuda_include_dir() -> str | None:
    """The CUDA headers nvcc uses (cuda_fp16.h etc. compile as host code too), else CUDA_HOME's."""
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc is not None:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             check=False, capture_output=True, text=True)
        candidates += re.findall(r'INCLUDES="-I([^" ]+)', dry.stdout + dry.stderr)
    candidates += [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    candidates.append("/usr/local/cuda/include")
    return next((c for c in candidates if os.path.isfile(os.path.join(c, "cuda_fp16.h"))), None)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("the kernel emulator needs a C++ compiler and the CUDA headers (cuda_fp16.h)")
    lib = str(tmp_path_factory.mktemp("emulator") / "csr_linear_emulated.so")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
                            "-Wno-unknown-pragmas", "-shared", "-fPIC", "-isystem", include,
                            os.path.join(CUDA_DIR, "emulation", "csr_linear_emulated.cpp"), "-o", lib],
                           check=False, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    emu = ctypes.CDLL(lib)
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    emu.sparse_ops_emulated_workspace_bytes.restype = ctypes.c_size_t
    emu.sparse_ops_emulated_workspace_bytes.argtypes = [c_int, i64, i64]
    emu.sparse_ops_emulated_plan.restype = None
    emu.sparse_ops_emulated_plan.argtypes = [c_int, p, p, i64, i64, i64, ctypes.POINTER(i64)]
    emu.sparse_ops_emulated_csr_linear.restype = c_int
    emu.sparse_ops_emulated_csr_linear.argtypes = [c_int, p, p, p, p, p, p, p, i64, i64, i64, i64, c_int, c_int,
                                                   ctypes.c_char_p, ctypes.c_size_t]
    return emu


GUARD = 64  # elements of sentinel on both sides of every buffer the kernels write


def _guarded(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n + 2 * GUARD,), float("nan") if dtype.is_floating_point else 0x5A, dtype=dtype)


def emulate(emu, x, crow, col, values, bias, out_features, group=0, scalar_loads=False):
    """csr_linear on the emulator: (M, out_features) result. Checks that nothing outside the output
    and the workspace was written."""
    M, K = x.shape
    dt = DTYPES[x.dtype]
    ws_bytes = emu.sparse_ops_emulated_workspace_bytes(dt, M, K)
    assert ws_bytes % x.element_size() == 0
    ws = _guarded(ws_bytes // x.element_size(), x.dtype)
    out = _guarded(M * out_features, x.dtype)
    error = ctypes.create_string_buffer(512)
    rc = emu.sparse_ops_emulated_csr_linear(
        dt, x.data_ptr(), crow.data_ptr(), col.data_ptr(), values.data_ptr(),
        None if bias is None else bias.data_ptr(), out[GUARD:].data_ptr(),
        ws[GUARD:].data_ptr() if ws_bytes else None, M, K, out_features, col.numel(), group, int(scalar_loads),
        error, len(error))
    assert rc == 0, error.value.decode()
    for buf in (out, ws):
        assert buf[:GUARD].isnan().all() and buf[buf.numel() - GUARD:].isnan().all(), "write outside a buffer"
    return out[GUARD:GUARD + M * out_features].view(M, out_features)


def plan(emu, dtype, col, values, M, N, nnz):
    got = (ctypes.c_int64 * 4)()
    emu.sparse_ops_emulated_plan(DTYPES[dtype], col.data_ptr(), values.data_ptr(), M, N, nnz, got)
    return {"tile": got[0], "group": got[1], "tiles": got[2], "vector_loads": bool(got[3])}


def to_csr(w: torch.Tensor, dtype: torch.dtype):
    """crow (int32), col (int32), values (dtype) of the nonzeros of w, built with plain torch."""
    rows, cols = w.nonzero(as_tuple=True)
    crow = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    crow[1:] = torch.bincount(rows, minlength=w.shape[0]).cumsum(0)
    return crow, cols.to(torch.int32).contiguous(), w[rows, cols].to(dtype).contiguous()


def reference(x, crow, col, values, bias, out_features):
    """x @ W^T + bias in float64 with W scattered densely from the CSR arrays."""
    rows = torch.repeat_interleave(torch.arange(out_features), (crow[1:] - crow[:-1]).long())
    w = torch.zeros(out_features, x.shape[1], dtype=torch.float64)
    w.index_put_((rows, col.long()), values.double(), accumulate=True)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def random_weight(n, k, density, gen, integers):
    w = torch.randint(-3, 4, (n, k), generator=gen).double() if integers else torch.randn(n, k, generator=gen,
                                                                                          dtype=torch.float64)
    w *= torch.rand(n, k, generator=gen) < density
    if n > 3:
        w[1::3] = 0  # some rows empty whatever the density
    return w


# M: one token (no regrouping), every token tile (2, 4, 8, 16), and several tiles with a ragged last one
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("M", [1, 2, 3, 5, 16, 17, 37])
def test_emulated_kernel_is_exact_on_integers(emulator, dtype, M):
    # integers: |x|, |w| <= 3, K <= 24, so every partial sum is an integer below 256 and exact in
    # float32 and bfloat16 alike; the result must equal the float64 reference exactly
    gen = torch.Generator().manual_seed(M)
    for n, k, density in [(29, 24, 0.5), (8, 7, 1.0), (33, 19, 0.1)]:
        w = random_weight(n, k, density, gen, integers=True)
        crow, col, values = to_csr(w, dtype)
        x = torch.randint(-3, 4, (M, k), generator=gen).to(dtype)
        bias = torch.randint(-9, 10, (n,), generator=gen).to(dtype)
        want = reference(x, crow, col, values, bias, n)
        assert want.abs().max() < 256
        for group in (4, 8, 16, 32):  # every lane-group size the kernel is compiled for
            for scalar_loads in (False, True):
                for b in (bias, None):
                    got = emulate(emulator, x, crow, col, values, b, n, group, scalar_loads)
                    expected = want if b is not None else want - bias.double()
                    assert torch.equal(got.double(), expected), (n, k, group, scalar_loads, b is None)


def rounding_bound(x, crow, col, values, bias, out_features, dtype):
    """|kernel - exact| allowed: float32 accumulation of a row's n + 1 terms (bias included), at most
    (n + 2)·2^-24 times the sum of their magnitudes, then one round-to-nearest to dtype, at most half
    an ulp: eps/2 relative, or half float16's subnormal spacing. Rounding in any other mode fails."""
    magnitude = reference(x.abs(), crow, col, values.abs(), None if bias is None else bias.abs(), out_features)
    row_terms = (crow[1:] - crow[:-1]).double() + 2
    accumulation = row_terms * 2.0**-24 * magnitude
    exact = reference(x, crow, col, values, bias, out_features)
    finfo = torch.finfo(dtype)
    return accumulation + finfo.eps / 2 * (exact.abs() + accumulation) + finfo.smallest_normal * finfo.eps / 2


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("M", [1, 4, 16, 19])
@pytest.mark.parametrize("density", [1.0, 0.1, 0.001])
def test_emulated_kernel_matches_float64_within_rounding(emulator, dtype, M, density):
    gen = torch.Generator().manual_seed(1000 + M)
    n, k = 45, 131  # odd sizes: ragged row blocks, rows starting at any alignment
    w = random_weight(n, k, density, gen, integers=False)
    crow, col, values = to_csr(w, dtype)
    x = torch.randn(M, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    for b in (bias, None):
        got = emulate(emulator, x, crow, col, values, b, n)
        err = (got.double() - reference(x, crow, col, values, b, n)).abs()
        bound = rounding_bound(x, crow, col, values, b, n, dtype)
        assert (err <= bound).all(), (err - bound).max()


def test_emulated_kernel_with_unaligned_inputs_uses_scalar_loads(emulator):
    gen = torch.Generator().manual_seed(7)
    n, k, M = 21, 50, 3
    w = random_weight(n, k, 0.6, gen, integers=True)
    crow, col, values = to_csr(w, torch.float16)
    # views one element into their storage: col is not 16-byte aligned, values not 8-byte aligned
    col_off = torch.empty(col.numel() + 1, dtype=torch.int32)[1:].copy_(col)
    values_off = torch.empty(values.numel() + 1, dtype=torch.float16)[1:].copy_(values)
    assert plan(emulator, torch.float16, col, values, M, n, col.numel())["vector_loads"]
    assert not plan(emulator, torch.float16, col_off, values, M, n, col.numel())["vector_loads"]
    assert not plan(emulator, torch.float16, col, values_off, M, n, col.numel())["vector_loads"]
    x = torch.randint(-3, 4, (M, k), generator=gen).to(torch.float16)
    want = reference(x, crow, col, values, None, n)
    # the emulator faults any misaligned vector load, so a wrong plan would fail here
    assert torch.equal(emulate(emulator, x, crow, col_off, values_off, None, n).double(), want)


def test_emulated_kernel_edge_shapes(emulator):
    gen = torch.Generator().manual_seed(3)
    for M, n, k, density in [(1, 1, 1, 1.0), (5, 3, 1, 1.0), (2, 4, 0, 1.0), (17, 40, 9, 0.0), (1, 300, 5, 0.3)]:
        w = random_weight(n, k, density, gen, integers=True)
        crow, col, values = to_csr(w, torch.float32)
        x = torch.randint(-3, 4, (M, k), generator=gen).float()
        bias = torch.randint(-3, 4, (n,), generator=gen).float()
        got = emulate(emulator, x, crow, col, values, bias, n)
        assert torch.equal(got.double(), reference(x, crow, col, values, bias, n)), (M, n, k)
    # nothing to compute: no launch, nothing written
    x = torch.ones(0, 4)
    crow, col, values = to_csr(torch.ones(3, 4, dtype=torch.float64), torch.float32)
    assert emulate(emulator, x, crow, col, values, None, 3).shape == (0, 3)
    assert emulate(emulator, torch.ones(2, 4), torch.zeros(1, dtype=torch.int32), col[:0], values[:0], None,
                   0).shape == (2, 0)


def test_plan_and_workspace(emulator):
    col = torch.zeros(16, dtype=torch.int32)
    values = torch.zeros(16, dtype=torch.float16)
    for M, tile in [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (9, 16), (16, 16), (17, 16), (2048, 16)]:
        got = plan(emulator, torch.float16, col, values, M, 768, 768 * 300)
        assert (got["tile"], got["tiles"]) == (tile, math.ceil(M / tile))
        want_ws = 0 if tile == 1 else math.ceil(M / tile) * 3072 * tile * 2
        assert emulator.sparse_ops_emulated_workspace_bytes(DTYPES[torch.float16], M, 3072) == want_ws
    # lanes per row: the smallest power of two in [4, 32] covering the mean row in chunks of 4
    for mean_nnz, group in [(0, 4), (1, 4), (16, 4), (17, 8), (33, 16), (64, 16), (65, 32), (3000, 32)]:
        assert plan(emulator, torch.float32, col, values, 1, 10, 10 * mean_nnz)["group"] == group
