"""Q, K and V stacked into one sparse op (sparse_ops.sparse.stacked.StackedLinears, export(stack_qkv=True)).

Every member's output must equal that member's own product: against float64 references with
flash-attention's tolerance rule (tests/_tolerance.py) and bit for bit against the same layer
unstacked; at odd shapes, in fp32/fp16/bf16, csr, 2:4 and bsr, 1-D to 3-D inputs, and at the 16-bit
column boundary. The sharing is checked: one kernel call per round, and no reuse for another input
(cross-attention), an input written in place, or buffers changed since.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_tolerance
from conftest import FLOAT_DTYPES
from test_export import BLOCK, FakeTimer, batch, outputs, pruned_bert
from test_sparse_linear_epilogue import _linear, needs_kernel, pruned

from sparse_ops import SparseLinear, export, load_exported, save_exported
from sparse_ops.sparse.stacked import StackedLinears


def members(fmt, dtype, in_features=45, outs=(31, 17, 40), density=0.3, seed=0):
    """Sibling layers of one in_features (and their dense weights and biases), the last one without bias;
    for 2:4 the width is rounded down to a multiple of 4."""
    if fmt == "2:4":
        in_features -= in_features % 4
    layers, dense = [], []
    for i, out in enumerate(outs):
        weight, bias, _ = pruned(out, in_features, density, dtype, seed=seed + i)
        if fmt == "2:4":
            weight = weight * torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=dtype).repeat(-(-in_features // 4))[:in_features]
        bias = None if i == len(outs) - 1 else bias
        layers.append(SparseLinear.from_dense(_linear(weight, bias), format=fmt, block_size=(8, 4)))
        dense.append((weight, bias))
    return layers, dense


class CountingKernel:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args):
        self.calls += 1
        return self.kernel(*args)


def count_stacked_calls(group):
    group.prepare()
    counter = CountingKernel(group._fast[0])
    group._fast = (counter, *group._fast[1:])
    return counter


def reference(x, weight, bias):
    b64 = None if bias is None else bias.double()
    return F.linear(x.double(), weight.double(), b64), F.linear(x, weight, bias)


@needs_kernel
@pytest.mark.filterwarnings("ignore:SparseLinear format=.2.4. computes through CSR")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(), (1,), (37,), (2, 70)], ids=str)
@pytest.mark.parametrize("fmt", ["csr", "2:4", "bsr"])
def test_each_member_gets_its_own_product(fmt, lead, dtype):
    layers, dense = members(fmt, dtype, seed=len(lead))
    group = StackedLinears(layers)
    counter = count_stacked_calls(group)
    k = layers[0].in_features
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        ys = [layer(x) for layer in layers]
    assert counter.calls == 1, "the three members must share one kernel call"
    for y, layer, (weight, bias) in zip(ys, layers, dense):
        assert y.shape == (*lead, layer.out_features)
        assert_tolerance(y, *reference(x, weight, bias), f"{fmt} member {layer.out_features}x{k}")
        group_of_one = layer._stack
        layer._stack = None  # the same layer, unstacked: the very same bits
        assert torch.equal(layer(x), y)
        layer._stack = group_of_one


@needs_kernel
@pytest.mark.parametrize("k", [1 << 16, (1 << 16) + 1], ids=["65536", "65537"])
def test_stacked_columns_at_the_16_bit_boundary(k):
    """in_features = 65,536: the stacked op reads uint16 columns up to 65,535; past it, int32."""
    g = torch.Generator().manual_seed(k)
    layers, dense = [], []
    for out in (3, 2, 4):
        weight = torch.zeros(out, k)
        weight[0, [0, k - 1]] = torch.randn(2, generator=g)
        weight[-1, torch.randint(0, k, (200,), generator=g)] = torch.randn(200, generator=g)
        bias = torch.randn(out, generator=g)
        layers.append(SparseLinear.from_dense(_linear(weight, bias), format="csr"))
        dense.append((weight, bias))
    group = StackedLinears(layers).prepare()
    assert group._fast[2].dtype == (torch.uint16 if k <= 1 << 16 else torch.int32)
    x = torch.randn(5, k, generator=g)
    for layer, (weight, bias) in zip(layers, dense):
        assert_tolerance(layer(x), *reference(x, weight, bias), f"in_features={k}")


@needs_kernel
def test_another_input_ends_the_sharing():
    """Cross-attention: the query reads x, key and value the encoder's states."""
    layers, dense = members("csr", torch.float32)
    group = StackedLinears(layers)
    x, states = torch.randn(4, 45), torch.randn(6, 45)
    inputs = [x, states, states]
    for _ in range(2):
        for layer, inp, (weight, bias) in zip(layers, inputs, dense):
            assert_tolerance(layer(inp), *reference(inp, weight, bias), "cross-attention member")
    assert not group.shared


@needs_kernel
def test_an_input_written_in_place_is_not_reused():
    layers, dense = members("csr", torch.float32)
    StackedLinears(layers)
    x = torch.randn(3, 45)
    layers[0](x)
    x.mul_(2)
    for layer, (weight, bias) in zip(layers, dense):
        assert_tolerance(layer(x), *reference(x, weight, bias), "after x.mul_")


@needs_kernel
def test_a_round_left_open_does_not_block_the_next():
    layers, dense = members("bsr", torch.float32)
    group = StackedLinears(layers)
    counter = count_stacked_calls(group)
    layers[0](torch.randn(2, 45))  # value and key never called with it
    x = torch.randn(2, 45)
    for layer, (weight, bias) in zip(layers, dense):
        assert_tolerance(layer(x), *reference(x, weight, bias), "new round")
    assert group.shared and counter.calls == 2


@needs_kernel
def test_changed_member_buffers_rebuild_the_stack():
    layers, dense = members("csr", torch.float32)
    group = StackedLinears(layers).prepare()
    before = group._fast
    with torch.no_grad():
        layers[1].values.mul_(3)  # in place
    layers[1].bias = None  # assigned
    layers[0].load_state_dict(SparseLinear.from_dense(_linear(dense[0][0] * 0.5, dense[0][1]), "csr").state_dict())
    x = torch.randn(5, 45)
    expected = [(dense[0][0] * 0.5, dense[0][1]), (dense[1][0] * 3, None), dense[2]]
    for layer, (weight, bias) in zip(layers, expected):
        assert_tolerance(layer(x), *reference(x, weight, bias), "after a buffer change")
    assert group._fast is not before
    with torch.no_grad():
        layers[2].col_indices[0] = 45  # out of range: caught when the query's call rebuilds the stack
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 45\)"):
        layers[0](x)


@needs_kernel
def test_autograd_and_compile_bypass_the_stack():
    layers, dense = members("csr", torch.float32)
    group = StackedLinears(layers)
    counter = count_stacked_calls(group)
    x = torch.randn(3, 45, requires_grad=True)
    sum(layer(x).sum() for layer in layers).backward()
    expected = sum(w.sum(0) for w, _ in dense)
    torch.testing.assert_close(x.grad, expected.expand(3, 45), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lambda t: [layer(t) for layer in layers], fullgraph=True)
    with torch.no_grad():
        for y, (weight, bias) in zip(compiled(x.detach()), dense):
            assert_tolerance(y, *reference(x.detach(), weight, bias), "compiled member")
    assert counter.calls == 0


@needs_kernel
def test_rounds_are_per_thread():
    layers, dense = members("csr", torch.float32, outs=(64, 64, 64), in_features=96)
    StackedLinears(layers)
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(20):
                x = torch.randn(8, 96, generator=g)
                ys = [layer(x) for layer in layers]
                for y, (weight, bias) in zip(ys, dense):
                    assert_tolerance(y, *reference(x, weight, bias), f"thread {seed}")
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@needs_kernel
def test_copies_keep_their_own_group():
    layers, _ = members("csr", torch.float32)
    holder = torch.nn.ModuleList(layers)
    StackedLinears(layers)
    x = torch.randn(4, 45)
    for other in (copy.deepcopy(holder), pickle.loads(pickle.dumps(holder))):
        group = other[0]._stack[0]
        assert group.members == list(other) and group is not layers[0]._stack[0]
        counter = count_stacked_calls(group)
        for layer, original in zip(other, layers):
            assert torch.equal(layer(x), original(x))
        assert counter.calls == 1


def test_members_are_checked():
    layers, _ = members("csr", torch.float32)
    with pytest.raises(TypeError, match="two or more SparseLinear"):
        StackedLinears(layers[:1])
    with pytest.raises(ValueError, match="distinct"):
        StackedLinears([layers[0], layers[0]])
    other = SparseLinear.from_dense(torch.nn.Linear(44, 8), "csr")
    with pytest.raises(ValueError, match="share in_features"):
        StackedLinears([layers[0], other])
    bsr = SparseLinear.from_dense(torch.nn.Linear(45, 8), "bsr")
    with pytest.raises(ValueError, match="one compressed format"):
        StackedLinears([layers[0], bsr])
    StackedLinears(layers)
    with pytest.raises(ValueError, match="already belongs"):
        StackedLinears(layers)


# ----------------------------------------------------------------------------------------------
# export and save/load on a real BERT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["csr", "bsr"])
def test_export_stacks_query_key_value(format, tmp_path):
    masked = pruned_bert(seed=3)
    stacked = export(copy.deepcopy(masked), format, block_size=BLOCK, timer=FakeTimer())
    apart = export(copy.deepcopy(masked), format, block_size=BLOCK, timer=FakeTimer(), stack_qkv=False)
    assert [n for n, _ in stacked.named_modules()] == [n for n, _ in apart.named_modules()]
    assert stacked.state_dict().keys() == apart.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(stacked.state_dict().values(), apart.state_dict().values()))
    for layer in stacked.encoder.layer:
        attention = layer.attention.self
        group = attention.query._stack[0]
        assert group.members == [attention.query, attention.key, attention.value]
        assert layer.attention.output.dense._stack is None and layer.intermediate.dense._stack is None
    rows = {row.name: row for row in stacked.sparse_ops_report.layers}
    assert rows["encoder.layer.1.attention.self.key"].stacked_with == tuple(
        f"encoder.layer.1.attention.self.{n}" for n in ("query", "key", "value"))
    assert "stacked" in str(stacked.sparse_ops_report)
    assert all(apart.get_submodule(n)._stack is None for n in rows if n.startswith("encoder"))
    counters = [count_stacked_calls(layer.attention.self.query._stack[0]) for layer in stacked.encoder.layer]
    inputs = batch()
    for a, b in zip(outputs(stacked, inputs), outputs(apart, inputs)):
        assert torch.equal(a, b)
    assert [c.calls for c in counters] == [1, 1]

    save_exported(stacked, tmp_path / "m.safetensors")
    loaded = load_exported(type(masked)(masked.config), tmp_path / "m.safetensors")
    group = loaded.encoder.layer[0].attention.self.query._stack[0]
    assert group.members[2] is loaded.encoder.layer[0].attention.self.value
    for a, b in zip(outputs(loaded, inputs), outputs(stacked, inputs)):
        assert torch.equal(a, b)


def test_export_stacks_only_one_format():
    masked = pruned_bert(seed=4)
    fmt = {r"self\.query$": "csr", r"self\.(key|value)$": "bsr", "dense$": "bsr"}
    exported = export(copy.deepcopy(masked), fmt, block_size=BLOCK, timer=FakeTimer())
    assert all(m._stack is None for m in exported.modules() if isinstance(m, SparseLinear))
    assert not any(row.stacked_with for row in exported.sparse_ops_report.layers)
    with pytest.raises(TypeError, match="stack_qkv must be a bool"):
        export(copy.deepcopy(masked), "csr", stack_qkv="yes")


@needs_kernel
def test_under_inference_mode():
    """Inference tensors keep no version counter: inputs and layers made under torch.inference_mode."""
    with torch.inference_mode():
        layers, dense = members("csr", torch.float32)
        group = StackedLinears(layers)
        counter = count_stacked_calls(group)
        x = torch.randn(2, 3, 45)
        for layer, (weight, bias) in zip(layers, dense):
            assert_tolerance(layer(x), *reference(x, weight, bias), "inference mode")
    assert counter.calls == 1
    x = torch.randn(2, 3, 45)
    with torch.inference_mode():
        for layer, (weight, bias) in zip(layers, dense):
            assert_tolerance(layer(x), *reference(x, weight, bias), "inference mode, a normal input")
