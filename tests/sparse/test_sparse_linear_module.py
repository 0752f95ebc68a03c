"""sparse_ops.SparseLinear (BSR, CSR, dense) against plain F.linear with the masked weight.

Forward outputs follow flash-attention's tolerance rule (tests/_tolerance.py) on fresh random
weights and masks: odd shapes not multiples of the block, empty rows and blocks, 0% to 100%
sparsity, 1 token, 3-D and non-contiguous inputs, fp32/fp16/bf16. Conversions (to_dense, state
dicts, dtype changes) must be bit-exact. format="auto" is checked with an injected timer, so no
assertion depends on measured time.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_tolerance
from torch import nn

from sparse_ops import SparseLinear
from sparse_ops.sparse import formats
from sparse_ops.ops._extension import has_cpu_kernel
from sparse_ops.sparse.linear import (
    FormatCache,
    choose_format,
    format_cache_key,
    time_forward,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


LAYOUTS = [("csr", None), ("bsr", (16, 16)), ("bsr", (32, 64)), ("bsr", (8, 4)), ("bsr", (64, 64)), ("dense", None)]


def layout_id(layout):
    fmt, block = layout
    return fmt if block is None else f"{fmt}{block[0]}x{block[1]}"


def masked_linear(out_features, in_features, sparsity, *, block=None, bias=True, dtype=torch.float32, seed=0):
    """An nn.Linear with a random weight: elements zeroed with probability `sparsity`; with `block`,
    whole blocks zeroed with that probability as well (so empty blocks and rows appear), and the
    first block row (or row) left empty."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
        keep = torch.rand(out_features, in_features, generator=g) >= sparsity
        if block is not None:
            br, bc = block
            nbr, nbc = -(-out_features // br), -(-in_features // bc)
            blocks = torch.rand(nbr, nbc, generator=g) >= sparsity
            keep &= blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:out_features, :in_features]
        keep[: (block or (1, 1))[0]] = False
        linear.weight.copy_(w * keep)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear.to(dtype)


def inputs(kind, in_features, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "1 token":
        x = torch.randn(1, in_features, generator=g)
    elif kind == "many":
        x = torch.randn(37, in_features, generator=g)
    elif kind == "3-D":
        x = torch.randn(3, 5, in_features, generator=g)
    else:  # non-contiguous: every other row of a transposed buffer
        x = torch.randn(in_features, 22, generator=g).T[::2]
        assert not x.is_contiguous()
    return x.to(dtype)


def check_against_linear(layer, linear, x):
    out = layer(x)
    ref64 = F.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
    assert_tolerance(out, ref64, linear(x), what=f"{layer.format} {x.dtype} {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["1 token", "many", "3-D", "non-contiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_forward_matches_masked_linear(layout, dtype, kind):
    fmt, block = layout
    linear = masked_linear(45, 70, 0.9 if block is None else 0.5, block=block, dtype=dtype)
    layer = SparseLinear.from_dense(linear, fmt, block_size=block or (32, 32))
    assert layer.format == fmt and layer.dtype == dtype and layer.block_size == block
    with torch.no_grad():
        x = inputs(kind, 70, dtype)
        y = layer(x)
        assert y.shape == (*x.shape[:-1], 45) and y.dtype == dtype
        check_against_linear(layer, linear, x)


@pytest.mark.parametrize("sparsity", [0.0, 0.999, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=layout_id)
def test_extreme_sparsity_and_no_bias(layout, sparsity):
    fmt, block = layout
    linear = masked_linear(64, 96, sparsity, bias=False, seed=3)
    layer = SparseLinear.from_dense(linear, fmt, block_size=block or (32, 32))
    if sparsity == 1.0:
        assert layer.nnz() == 0 and layer.sparsity() == 1.0
    with torch.no_grad():
        check_against_linear(layer, linear, inputs("many", 96, torch.float32, seed=4))


def test_float64_runs_through_the_reference():
    linear = masked_linear(20, 33, 0.8, block=(4, 8), dtype=torch.float64)
    layer = SparseLinear.from_dense(linear, "bsr", block_size=(4, 8))
    with torch.no_grad():
        x = inputs("3-D", 33, torch.float64)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-12, atol=1e-12)


def test_empty_batch():
    layer = SparseLinear.from_dense(masked_linear(8, 12, 0.5), "csr")
    assert layer(torch.randn(0, 4, 12)).shape == (0, 4, 8)


# ----------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_to_dense_round_trip_is_bit_exact(layout, dtype, bias):
    fmt, block = layout
    linear = masked_linear(45, 70, 0.7, block=block, bias=bias, dtype=dtype, seed=5)
    dense = SparseLinear.from_dense(linear, fmt, block_size=block or (32, 32)).to_dense()
    assert type(dense) is nn.Linear and dense.weight.dtype == dtype
    assert torch.equal(dense.weight, linear.weight)
    assert (dense.bias is None) == (not bias)
    if bias:
        assert torch.equal(dense.bias, linear.bias)


def test_stored_entries_and_repr():
    linear = masked_linear(40, 50, 0.6, block=(16, 16), seed=6)
    zeros = (linear.weight == 0).sum().item()
    csr = SparseLinear.from_dense(linear, "csr")
    assert csr.nnz() == 40 * 50 - zeros
    bsr = SparseLinear.from_dense(linear, "bsr", block_size=(16, 16))
    blocks = formats.dense_to_bsr(linear.weight.detach(), (16, 16))[2].shape[0]
    assert bsr.nnz() == blocks * 256
    for layer in (csr, bsr):
        assert layer.sparsity() == pytest.approx(zeros / 2000)
    text = repr(bsr)
    for part in ["format=bsr", "block_size=(16, 16)", f"nnz_blocks={blocks}", f"nnz={blocks * 256}",
                 f"sparsity={zeros / 2000:.4f}", "bias=True"]:
        assert part in text, (part, text)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_dtype_conversions_keep_int32_indices(layout):
    fmt, block = layout
    linear = masked_linear(45, 70, 0.6, block=block, seed=7)
    layer = SparseLinear.from_dense(linear, fmt, block_size=block or (32, 32))
    x = inputs("many", 70, torch.float32)
    for convert, dtype in [(lambda m: m.half(), torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                           (lambda m: m.type(torch.float16), torch.float16), (lambda m: m.double(), torch.float64),
                           (lambda m: m.float(), torch.float32)]:
        converted = convert(layer)
        assert converted.dtype == dtype
        if fmt != "dense":
            assert converted.crow_indices.dtype == converted.col_indices.dtype == torch.int32
            assert torch.equal(converted.crow_indices, layer.crow_indices)
        expected = linear.to(dtype)
        assert torch.equal(converted.to_dense().weight, expected.weight)
        with torch.no_grad():
            check_against_linear(converted, expected, x.to(dtype))
        layer = converted


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=layout_id)
def test_state_dict_loads_any_nnz(layout):
    fmt, block = layout
    block_size = block or (32, 32)
    source = SparseLinear.from_dense(masked_linear(45, 70, 0.95, block=block, seed=8), fmt, block_size=block_size)
    target = SparseLinear.from_dense(masked_linear(45, 70, 0.3, block=block, seed=9), fmt, block_size=block_size)
    fresh = SparseLinear(70, 45, fmt, block_size=block_size)
    assert source.nnz() != target.nnz()
    x = inputs("many", 70, torch.float32)
    with torch.no_grad():
        for layer in (target, fresh):
            layer.load_state_dict(source.state_dict())
            assert torch.equal(layer(x), source(x))
            for name, t in source.state_dict().items():
                assert torch.equal(layer.state_dict()[name], t) and layer.state_dict()[name].dtype == t.dtype


def test_bsr_state_dict_with_another_block_size():
    source = SparseLinear.from_dense(masked_linear(45, 70, 0.5, block=(8, 16), seed=10), "bsr", block_size=(8, 16))
    layer = SparseLinear(70, 45, "bsr", block_size=(32, 32))
    layer.load_state_dict(source.state_dict())
    assert layer.block_size == (8, 16)
    x = inputs("3-D", 70, torch.float32)
    with torch.no_grad():
        assert torch.equal(layer(x), source(x))


def corrupt(state, fmt):
    """(description, state dict) pairs, each broken in one way."""
    bad = []
    s = dict(state)
    s["crow_indices"] = state["crow_indices"].clone()
    s["crow_indices"][1] = state["crow_indices"][2].item() + 1  # row 1 ends after row 2 does
    bad.append(("non-decreasing", s))
    s = dict(state, col_indices=state["col_indices"].clone())
    s["col_indices"][-1] = 10_000
    bad.append(("must lie in", s))
    bad.append(("int32", dict(state, col_indices=state["col_indices"].long())))
    bad.append(("loaded together", {k: v for k, v in state.items() if k != "values"}))
    values = state["values"]
    other = values.flatten(1) if fmt == "bsr" else values.view(-1, 1, 1)
    bad.append(("values must", dict(state, values=other)))
    return bad


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_load_rejects_bad_indices_naming_them(fmt):
    source = SparseLinear.from_dense(masked_linear(40, 64, 0.5, block=(8, 8), seed=11), fmt, block_size=(8, 8))
    for message, state in corrupt(source.state_dict(), fmt):
        layer = SparseLinear(64, 40, fmt, block_size=(8, 8))
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(RuntimeError, match=message):
            layer.load_state_dict(state)
        for k, v in layer.state_dict().items():  # a rejected load leaves the layer as it was
            assert torch.equal(v, before[k]), (message, k)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_compile_fullgraph_calls_the_custom_op(fmt):
    linear = masked_linear(45, 70, 0.8, block=(16, 16), seed=12)
    layer = SparseLinear.from_dense(linear, fmt, block_size=(16, 16))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=capture)
    x = inputs("3-D", 70, torch.float32)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    # on CPU with a C++ kernel: its direct call, the indices checked by the kernel on every call
    kernel = f"sparse_ops.{fmt}_linear_cpu" if has_cpu_kernel(f"sparse_ops::{fmt}_linear_cpu") else f"sparse_ops.{fmt}_linear"
    assert any(t.startswith(kernel) for t in targets), targets
    assert not any("to_sparse" in t for t in targets)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_compiled_layer_still_checks_indices_written_in_place(fmt):
    linear = masked_linear(45, 70, 0.8, block=(16, 16), seed=14)
    layer = SparseLinear.from_dense(linear, fmt, block_size=(16, 16)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = inputs("many", 70, torch.float32)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
        col = layer.col_indices
        good, past_end = col[0].item(), 70 if fmt == "csr" else 5  # bsr: in 16-wide block columns
        col[0] = past_end  # corrupt in place: a column past in_features
        with pytest.raises(RuntimeError, match="col_indices"):
            compiled(x)
        col[0] = (good + 1) % past_end  # valid again, but another column: the compiled call reads it now
        expected = F.linear(x, layer.dense_weight(), layer.bias)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_compiled_layer_differentiates_x_through_the_checked_op():
    linear = masked_linear(45, 70, 0.8, seed=15)
    layer = SparseLinear.from_dense(linear, "csr")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = inputs("many", 70, torch.float32).requires_grad_()
    compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_inductor():
    linear = masked_linear(45, 70, 0.8, block=(16, 16), seed=13)
    layer = SparseLinear.from_dense(linear, "bsr", block_size=(16, 16))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        x = inputs("many", 70, torch.float32)
        assert torch.equal(compiled(x), layer(x))


# ----------------------------------------------------------------------------------------------
# bad input (docs/design.md §4)
# ----------------------------------------------------------------------------------------------
def test_forward_rejects_bad_input():
    layer = SparseLinear.from_dense(masked_linear(8, 12, 0.5), "bsr", block_size=(4, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=12\)"):
        layer(torch.randn(3, 13))
    with pytest.raises(TypeError, match="x must have the layer's dtype torch.float32, got torch.float16"):
        layer(torch.randn(3, 12, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([1.0] * 12)


def test_constructor_and_from_dense_reject_bad_arguments():
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear(4, 4, "coo")
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear(4, 4, "auto")  # auto is a from_dense choice, not a storage format
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        SparseLinear(0, 4, "csr")
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        SparseLinear(4, 2.5, "csr")
    with pytest.raises(ValueError, match="block_size must be a positive int or a pair"):
        SparseLinear(4, 4, "bsr", block_size=(0, 32))
    with pytest.raises(TypeError, match="dtype must be one of"):
        SparseLinear(4, 4, "csr", dtype=torch.int32)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_dense(nn.Conv1d(4, 4, 1), "csr")
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear.from_dense(nn.Linear(4, 4), "blocked")
    with pytest.raises(ValueError, match="block_size must be"):
        SparseLinear.from_dense(nn.Linear(4, 4), "bsr", block_size=(16, -1))
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        SparseLinear.from_dense(nn.Linear(4, 4), "auto", tokens=0, cache=None)


# ----------------------------------------------------------------------------------------------
# format="auto": choice and cache, with an injected timer
# ----------------------------------------------------------------------------------------------
class FakeTimer:
    """ms per format from a table; counts the timings it was asked for."""

    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, layer, x):
        assert isinstance(layer, SparseLinear) and x.dim() == 2 and x.shape[1] == layer.in_features
        self.calls.append(layer.format)
        return self.ms[layer.format]


@pytest.mark.parametrize("ms, expected", [({"dense": 1.0, "csr": 0.2, "bsr": 0.5}, "csr"),
                                          ({"dense": 1.0, "csr": 0.9, "bsr": 0.3}, "bsr"),
                                          ({"dense": 0.3, "csr": 0.3, "bsr": 0.4}, "dense")])
def test_auto_keeps_the_fastest_and_dense_on_ties(ms, expected):
    timer = FakeTimer(ms)
    linear = masked_linear(45, 70, 0.9, seed=14)
    choice = choose_format(linear.weight.detach(), linear.bias.detach(), (16, 16), 24, timer=timer, cache=None)
    assert choice.format == expected and choice.ms == ms and not choice.cached
    assert sorted(timer.calls) == ["bsr", "csr", "dense"]
    layer = SparseLinear.from_dense(linear, "auto", block_size=(16, 16), tokens=24, timer=timer, cache=None)
    assert layer.format == expected
    with torch.no_grad():
        check_against_linear(layer, linear, inputs("many", 70, torch.float32))


def test_auto_decisions_are_cached_in_memory_and_in_a_file(tmp_path):
    timer = FakeTimer({"dense": 1.0, "csr": 0.2, "bsr": 0.5})
    cache = FormatCache(directory=tmp_path)
    weight = masked_linear(45, 70, 0.9, seed=15).weight.detach()
    first = choose_format(weight, None, (16, 16), 8, timer=timer, cache=cache)
    assert not first.cached and len(timer.calls) == 3
    again = choose_format(weight, None, (16, 16), 8, timer=timer, cache=cache)
    assert again.cached and again.format == "csr" and again.ms == first.ms and len(timer.calls) == 3
    # a new process: memory is empty, the file answers
    stored = json.loads((tmp_path / FormatCache.FILE_NAME).read_text())
    assert stored["entries"][format_cache_key(weight, (16, 16), 8)] == {"format": "csr", "ms": first.ms}
    fresh = FormatCache(directory=tmp_path)
    assert choose_format(weight, None, (16, 16), 8, timer=timer, cache=fresh).cached and len(timer.calls) == 3
    # a different token count, block size, dtype or bias is timed anew
    choose_format(weight, None, (16, 16), 9, timer=timer, cache=cache)
    choose_format(weight, None, (8, 8), 8, timer=timer, cache=cache)
    choose_format(weight.half(), None, (16, 16), 8, timer=timer, cache=cache)
    choose_format(weight, torch.zeros(45), (16, 16), 8, timer=timer, cache=cache)
    assert len(timer.calls) == 3 + 4 * 3


def test_cache_key_holds_the_sparsity_level_not_the_pattern(monkeypatch, tmp_path):
    base = torch.randn(100, 100, generator=torch.Generator().manual_seed(16))
    assert torch.count_nonzero(base) == base.numel()

    def with_zeros(count, seed):
        w = base.clone()
        w.view(-1)[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(seed))[:count]] = 0
        return w

    key = format_cache_key(with_zeros(9020, 1), (16, 16), 128)
    assert format_cache_key(with_zeros(9040, 2), (16, 16), 128) == key  # 90.2% and 90.4%: one level
    assert format_cache_key(with_zeros(8500, 3), (16, 16), 128) != key
    assert "shape=100x100" in key and "tokens=128" in key and "block=16x16" in key and "dtype=float32" in key
    # the default cache reads $SPARSE_OPS_CACHE_DIR when used; an empty value keeps it in memory
    monkeypatch.setenv("SPARSE_OPS_CACHE_DIR", str(tmp_path))
    assert FormatCache().path() == str(tmp_path / FormatCache.FILE_NAME)
    monkeypatch.setenv("SPARSE_OPS_CACHE_DIR", "")
    memory_only = FormatCache()
    assert memory_only.path() is None
    timer = FakeTimer({"dense": 1.0, "csr": 2.0, "bsr": 3.0})
    choose_format(base, None, (16, 16), 4, timer=timer, cache=memory_only)
    assert choose_format(base, None, (16, 16), 4, timer=timer, cache=memory_only).cached
    assert list(tmp_path.iterdir()) == []


def test_unreadable_cache_file_is_ignored(tmp_path):
    (tmp_path / FormatCache.FILE_NAME).write_text("{not json")
    timer = FakeTimer({"dense": 1.0, "csr": 2.0, "bsr": 0.5})
    with pytest.warns(RuntimeWarning, match="unreadable format cache"):
        choice = choose_format(torch.randn(8, 8), None, (4, 4), 2, timer=timer, cache=FormatCache(tmp_path))
    assert choice.format == "bsr" and not choice.cached


def test_real_timer_measures_and_auto_builds_a_working_layer():
    linear = masked_linear(64, 48, 0.9, block=(16, 16), seed=17)
    ms = time_forward(linear, torch.randn(16, 48), repeats=2)
    assert ms > 0
    layer = SparseLinear.from_dense(linear, "auto", block_size=(16, 16), tokens=16, cache=None)
    assert layer.format in ("dense", "csr", "bsr")
    with torch.no_grad():
        check_against_linear(layer, linear, inputs("3-D", 48, torch.float32))
