"""kthvalue / kthvalue_multi / radix_histogram / prune_threshold: bit-identical to torch.kthvalue,
exact counts with ties, every dtype, odd sizes, special values, contract and bad input."""

import pytest
import torch
from conftest import FLOAT_DTYPES
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_ops
from sparse_ops.ops.reference import radix_histogram_ref

ALL_DTYPES = FLOAT_DTYPES + [torch.float64]


def assert_bit_identical(got, want):
    assert got.dtype == want.dtype and got.dim() == 0
    assert torch.equal(got, want), (got, want)


def special_values(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(dtype)
    picks = torch.randint(0, n, (min(n, 12),), generator=g)
    values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-30, -1e-30, 65504.0, -65504.0,
                           1.0, 1.0, -1.0, 2.0], dtype=torch.float64)[: len(picks)]
    x[picks] = values.to(dtype)
    return x.to(device)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4099])
def test_bit_identical_to_torch(device, dtype, n):
    x = special_values(n, dtype, device, seed=n)
    for k in sorted({1, 2, n // 3 + 1, n // 2 + 1, max(1, n - 1), n}):
        if k <= n:
            assert_bit_identical(torch.ops.sparse_ops.kthvalue(x, k), torch.kthvalue(x.flatten(), k).values)


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_signed_zero_result_has_the_sign_of_the_input_zeros(device, zero):
    x = torch.tensor([zero, 1.0, zero, -2.0], device=device)
    for k in (2, 3):
        want = torch.kthvalue(x, k).values.view(torch.int32)
        assert torch.equal(torch.ops.sparse_ops.kthvalue(x, k).view(torch.int32), want)
        assert torch.equal(torch.ops.sparse_ops.kthvalue_multi([x[:1], x[1:]], k).view(torch.int32), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heavy_ties_and_shapes(device, dtype):
    x = torch.randint(-3, 4, (17, 9, 5), device=device).to(dtype)
    x_nc = x.transpose(0, 2)  # non-contiguous
    for k in (1, 100, 383, 765):
        want = torch.kthvalue(x.flatten(), k).values
        assert_bit_identical(torch.ops.sparse_ops.kthvalue(x, k), want)
        assert_bit_identical(torch.ops.sparse_ops.kthvalue(x_nc, k), want)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=300), st.data())
def test_property_any_float_list(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    assert_bit_identical(torch.ops.sparse_ops.kthvalue(x, k), torch.kthvalue(x, k).values)


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_multi_equals_kthvalue_of_concatenation(device, dtype, absolute):
    xs = [torch.randn(s, device=device).to(dtype) for s in [(31, 7), (1,), (0,), (5, 64)]]
    cat = torch.cat([x.flatten() for x in xs])
    cat = cat.abs() if absolute else cat
    for k in (1, 50, cat.numel()):
        assert_bit_identical(torch.ops.sparse_ops.kthvalue_multi(xs, k, absolute), torch.kthvalue(cat, k).values)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("absolute", [False, True])
def test_triton_histogram_matches_reference(device, dtype, absolute):
    from conftest import triton_device, triton_kernels

    kernels = triton_kernels()
    device = triton_device(device)
    xs = [special_values(n, dtype, device, seed=n) for n in (37 * 53, 1000, 3)]
    xs[1][5] = float("nan")
    levels = torch.finfo(dtype).bits // 8
    state = torch.tensor([0, 1], device=device)
    for level in range(levels):
        got = kernels.kthvalue.radix_histogram_triton(xs, state, level, absolute)
        want = radix_histogram_ref(xs, state, level, absolute)
        assert torch.equal(got, want), level
        state[0] = state[0] * 256 + int(torch.argmax(want[:256]))  # descend into the fullest bucket


@pytest.mark.parametrize("count_fraction", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prune_threshold_prunes_exact_count_with_deterministic_ties(device, dtype, count_fraction):
    # integer-valued keys: massive ties at the threshold value
    keys = [torch.randint(0, 5, s, device=device).to(dtype) for s in [(13, 11), (40,), (3, 3)]]
    total = sum(k.numel() for k in keys)
    count = min(total - 1, int(count_fraction * total)) if count_fraction < 1 else total
    thr = sparse_ops.prune_threshold(keys, count)
    offset, pruned, tie_positions = 0, 0, []
    for k in keys:
        flat = k.flatten().double()
        index = offset + torch.arange(flat.numel(), device=device)
        keep = (flat > thr.value) | ((flat == thr.value) & (index >= thr.tie_cut))
        pruned += int((~keep).sum())
        tie_positions += index[(flat == thr.value) & ~keep].tolist()
        offset += flat.numel()
    assert pruned == count
    # the ties that go are the lowest-indexed ones
    all_ties = [i for i in range(total) if torch.cat([k.flatten() for k in keys]).double()[i] == thr.value]
    assert tie_positions == all_ties[: len(tie_positions)]


def test_first_histogram_shortcut_gives_same_selection(device):
    x = torch.randn(3000, device=device)
    state = torch.zeros(2, dtype=torch.int64, device=device)
    first = torch.ops.sparse_ops.radix_histogram([x], state, 0, True)
    for k in (1, 1500, 3000):
        a = sparse_ops.radix_select([x], k, absolute=True, first_histogram=first)
        assert_bit_identical(a.value, torch.kthvalue(x.abs(), k).values)


def test_reduce_hook_sees_every_histogram(device):
    x = torch.randn(500, device=device)
    seen = []
    sel = sparse_ops.radix_select([x], 10, reduce=lambda t: seen.append(t.numel()))
    assert seen == [1, 257, 257, 257, 257]  # the element count, then one histogram per level
    assert_bit_identical(sel.value, torch.kthvalue(x, 10).values)


def test_opcheck_and_compile(device):
    x = torch.randn(257, device=device)
    torch.library.opcheck(torch.ops.sparse_ops.kthvalue.default, (x, 5))
    torch.library.opcheck(torch.ops.sparse_ops.kthvalue_multi.default, ([x, x[:9]], 5, True))
    compiled = torch.compile(lambda t: torch.ops.sparse_ops.kthvalue(t, 100) + 1, fullgraph=True)
    assert torch.equal(compiled(x), torch.kthvalue(x, 100).values + 1)


@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.sparse_ops.kthvalue(torch.randn(5), 0), r"k must lie in \[1, 5\]"),
    (lambda: torch.ops.sparse_ops.kthvalue(torch.randn(5), 6), r"k must lie in \[1, 5\]"),
    (lambda: torch.ops.sparse_ops.kthvalue(torch.randn(0), 1), "x is empty"),
    (lambda: torch.ops.sparse_ops.kthvalue(torch.tensor([1.0, float("nan")]), 1), "NaN"),
    (lambda: torch.ops.sparse_ops.kthvalue(torch.arange(5), 1), "x must have a floating dtype"),
    (lambda: torch.ops.sparse_ops.kthvalue_multi([], 1), "xs must be a non-empty list"),
    (lambda: torch.ops.sparse_ops.kthvalue_multi([torch.randn(3), torch.randn(3).half()], 1), r"xs\[1\] has dtype"),
    (lambda: torch.ops.sparse_ops.kthvalue_multi([torch.randn(3), torch.randn(3)], 7), r"k must lie in \[1, 6\]"),
    (lambda: sparse_ops.prune_threshold([torch.tensor([0.0, float("inf"), float("nan")])], 1), "NaN"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
