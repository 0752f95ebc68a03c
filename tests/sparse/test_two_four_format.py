"""SparseLinear / export format="2:4": validation, the CSR path (CPU, and wherever torch's
semi-structured kernels do not serve), exact save/load, torch.compile, and the CUDA semi-structured
path (tested on a GPU, skipped without one)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_tolerance
from torch import nn

from sparse_ops import SparseLinear, export, load_exported, save_exported
from sparse_ops.sparse import linear as sparse_nn
from sparse_ops.sparse.linear import AUTO_FORMATS, auto_formats, semi_structured_unavailable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def two_four_linear(out_features, in_features, *, dtype=torch.float32, seed=0, bias=True, fewer=False):
    """A linear whose weight keeps the 2 largest |w| of every 4 consecutive inputs (with `fewer`, some
    groups keep 1 or 0, which is still 2:4)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        w = torch.randn(out_features, in_features, generator=g)
        groups = w.view(out_features, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
        if fewer:
            keep &= torch.rand(groups.shape, generator=g) > 0.3
        linear.weight.copy_((groups * keep).view(out_features, in_features))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear.to(dtype)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(sparse_nn, "_FALLBACK_WARNED", set())


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(45, 68), (128, 256), (7, 4)])
def test_cpu_fallback_matches_the_dense_linear_and_warns_once(shape, dtype):
    linear = two_four_linear(*shape, dtype=dtype, fewer=shape[0] == 45)
    with pytest.warns(RuntimeWarning, match="2:4' computes through CSR here: device cpu"):
        layer = SparseLinear.from_dense(linear, "2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second layer, or a move, warns no more
        SparseLinear.from_dense(linear, "2:4").to("cpu")
    assert layer.format == "2:4" and layer._semi is None and layer.nnz() <= shape[0] * shape[1] // 2
    torch.testing.assert_close(layer.dense_weight(), linear.weight.detach(), rtol=0, atol=0)
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ref64 = F.linear(x.double(), linear.weight.double(), linear.bias.double())
        assert_tolerance(layer(x), ref64, linear(x), what=f"2:4 {dtype}")


def test_a_weight_that_is_not_two_four_is_rejected_naming_the_group():
    linear = two_four_linear(6, 16)
    with torch.no_grad():
        linear.weight[3, 9] = 1.0 if linear.weight[3, 9] == 0 else linear.weight[3, 9]
        linear.weight[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"weight is not 2:4: row 3, columns 8…11 hold 3 non-zeros"):
        SparseLinear.from_dense(linear, "2:4")
    with pytest.raises(ValueError, match="in_features divisible by 4, got 10"):
        SparseLinear.from_dense(nn.Linear(10, 3), "2:4")


def test_state_dict_round_trip_is_exact_and_a_bad_pattern_does_not_load():
    linear = two_four_linear(32, 64, seed=3, fewer=True)
    layer = quiet(SparseLinear.from_dense, linear, "2:4")
    empty = SparseLinear(64, 32, "2:4")
    quiet(empty.load_state_dict, layer.state_dict())
    for key, value in layer.state_dict().items():
        assert torch.equal(empty.state_dict()[key], value), key
    dense = quiet(SparseLinear.from_dense, nn.Linear(64, 32), "csr")  # a full CSR weight: 4 of 4 per group
    with pytest.raises(RuntimeError, match="is not 2:4: row 0, columns 0…3 hold 4 non-zeros"):
        empty.load_state_dict(dense.state_dict())
    assert torch.equal(empty.values, layer.values)  # nothing replaced


def test_compile_fullgraph_on_the_csr_path():
    layer = quiet(SparseLinear.from_dense, two_four_linear(40, 64, seed=4), "2:4")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


def test_export_and_load_exported_are_exact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(two_four_linear(32, 64, seed=5), nn.GELU(), two_four_linear(16, 32, seed=6))
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
    quiet(export, model, "2:4", timer=lambda layer, x: 1.0)
    assert [m.format for m in model if isinstance(m, SparseLinear)] == ["2:4", "2:4"]
    path = tmp_path / "model.safetensors"
    save_exported(model, path)
    skeleton = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    quiet(load_exported, skeleton, path)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))
        torch.testing.assert_close(model(x), want)
    bad = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"export of 0 as '2:4': weight is not 2:4: row 0"):
        export(bad, "2:4", patterns=[r"^0$"], timer=lambda layer, x: 1.0)
    assert type(bad[0]) is nn.Linear  # a rejected export leaves the model as it was


def test_auto_offers_two_four_only_where_the_semi_structured_path_serves():
    linear = two_four_linear(64, 128)
    assert auto_formats(linear.weight.detach()) == AUTO_FORMATS  # CPU
    assert "device cpu" in semi_structured_unavailable(torch.device("cpu"), torch.float16)
    if torch.cuda.is_available():
        assert "dtype" in semi_structured_unavailable(torch.device("cuda"), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="torch's semi-structured kernels need a CUDA GPU of compute capability 8.0+")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_semi_structured_path_matches_the_dense_linear(dtype):
    linear = two_four_linear(256, 512, dtype=dtype, seed=7).cuda()
    layer = SparseLinear.from_dense(linear, "2:4")
    assert layer._semi is not None
    assert "2:4" in auto_formats(linear.weight.detach())
    for tokens in (1, 37, 128):
        x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
        with torch.no_grad():
            ref64 = F.linear(x.double(), linear.weight.double(), linear.bias.double())
            assert_tolerance(layer(x), ref64, linear(x), what=f"2:4 cuda {dtype} {tokens} tokens")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
    cpu = layer.to("cpu")  # moved off the GPU: back to the CSR path, same weights
    assert cpu._semi is None and torch.equal(cpu.dense_weight(), linear.weight.detach().cpu())
