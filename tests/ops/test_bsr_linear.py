"""bsr_linear through the Triton kernels (CPU under TRITON_INTERPRET=1, CUDA where present) against a
float64 dense reference, with flash-attention's tolerance rule (tests/_tolerance.py).

Every weight here has shapes that are not multiples of the block, some empty block rows, and NaN in
the padding of its stored blocks: a kernel that reads x or W past in_features, or mixes padding rows
into real outputs, returns NaN and fails. Both paths run: skinny (M ≤ 16: broadcast multiply-adds for
M ≤ 8, tl.dot for 9..16, with and without split shares) and tiled (M > 16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _bsr_weights import random_bsr_weight
from _tolerance import assert_tolerance
from conftest import FLOAT_DTYPES, triton_device, triton_kernels

from sparse_ops.sparse.formats import dense_to_bsr
from sparse_ops.ops import cpu_backend, use_backend

OUT, IN = 40, 70
BLOCKS = [(16, 16), (32, 32), (16, 32)]
# (tokens, bias): skinny fma (1, 3), skinny dot (12, 16), tiled (20, 33)
TOKENS = [(1, True), (3, False), (12, True), (16, False), (20, True), (33, False)]


def check_against_float64(y, x, weight, bias):
    ref64 = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert_tolerance(y, ref64, F.linear(x, weight, bias), "bsr_linear")


def run_triton(x, crow, col, values, bias, out_features):
    with use_backend("triton"):
        return torch.ops.sparse_ops.bsr_linear(x, crow, col, values, bias, out_features)


def inputs(tokens, in_features, out_features, dtype, device, generator, with_bias):
    x = torch.randn(tokens, in_features, generator=generator).to(dtype).to(device)
    bias = torch.randn(out_features, generator=generator).to(dtype).to(device) if with_bias else None
    return x, bias


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens,with_bias", TOKENS)
def test_triton_matches_float64_reference(device, dtype, block, tokens, with_bias):
    triton_kernels()
    device = triton_device(device)
    g = torch.Generator().manual_seed(tokens * 1000 + block[0] + block[1])
    weight, crow, col, values = random_bsr_weight(OUT, IN, block, 0.6, dtype, device, g)
    x, bias = inputs(tokens, IN, OUT, dtype, device, g, with_bias)
    y = run_triton(x, crow, col, values, bias, OUT)
    assert y.shape == (tokens, OUT) and y.dtype == dtype and y.device == x.device
    check_against_float64(y, x, weight, bias)


@pytest.mark.parametrize("tokens", [1, 12])
@pytest.mark.parametrize("split", [2, 3, 16])
def test_skinny_split_shares(device, tokens, split):
    """Forced shares per block row (more shares than blocks too): fp32 partials summed by the second launch."""
    kernels = triton_kernels()
    device = triton_device(device)
    g = torch.Generator().manual_seed(split * 10 + tokens)
    weight, crow, col, values = random_bsr_weight(OUT, 300, (16, 16), 0.5, torch.float16, device, g)
    x, bias = inputs(tokens, 300, OUT, torch.float16, device, g, with_bias=split != 3)
    y = kernels.bsr_linear.bsr_linear_triton(x, crow, col, values, bias, OUT, split=split)
    check_against_float64(y, x, weight, bias)


@pytest.mark.parametrize("density", [1.0, 0.0, "one block"])
@pytest.mark.parametrize("tokens", [1, 20])
def test_sparsity_extremes(device, density, tokens):
    """0% sparsity, no stored block at all (y = bias), and 99.9% (a single stored block of 16×16 in 64×1000)."""
    triton_kernels()
    device = triton_device(device)
    g = torch.Generator().manual_seed(tokens)
    out_features, in_features = (OUT, IN) if density != "one block" else (64, 1000)
    weight, crow, col, values = random_bsr_weight(out_features, in_features, (16, 16), 0.0 if density == "one block"
                                                  else density, torch.float32, device, g, empty_rows=())
    if density == "one block":
        weight[17:29, 500:512] = torch.randn(12, 12, generator=g).to(device)
        crow, col, values = (t.to(device) for t in dense_to_bsr(weight.cpu(), (16, 16)))
        assert values.shape[0] == 1
    x, bias = inputs(tokens, in_features, out_features, torch.float32, device, g, with_bias=True)
    y = run_triton(x, crow, col, values, bias, out_features)
    check_against_float64(y, x, weight, bias)
    if density == 0.0:
        assert values.shape[0] == 0 and torch.equal(y, bias.expand_as(y))


@pytest.mark.parametrize("tokens", [(2, 3), (3, 11)], ids=["skinny", "tiled"])
def test_batched_and_non_contiguous_inputs(device, tokens):
    triton_kernels()
    device = triton_device(device)
    g = torch.Generator().manual_seed(7)
    weight, crow, col, values = random_bsr_weight(OUT, IN, (16, 32), 0.6, torch.bfloat16, device, g)
    x3 = torch.randn(*tokens, IN, generator=g).to(torch.bfloat16).to(device)
    check_against_float64(run_triton(x3, crow, col, values, None, OUT), x3, weight, None)
    strided = torch.randn(IN, *tokens, generator=g).to(torch.bfloat16).to(device).movedim(0, -1)
    assert not strided.is_contiguous()
    check_against_float64(run_triton(strided, crow, col, values, None, OUT), strided, weight, None)


@pytest.mark.parametrize("tokens", [2, 20])
def test_block_64x64(device, tokens):
    triton_kernels()
    device = triton_device(device)
    g = torch.Generator().manual_seed(64 + tokens)
    weight, crow, col, values = random_bsr_weight(130, 150, (64, 64), 0.7, torch.float16, device, g)
    x, bias = inputs(tokens, 150, 130, torch.float16, device, g, with_bias=True)
    check_against_float64(run_triton(x, crow, col, values, bias, 130), x, weight, bias)


@pytest.mark.parametrize("block", [(8, 8), (24, 20)], ids=["8x8", "24x20"])
def test_small_and_non_power_of_two_blocks_are_padded(device, block):
    triton_kernels()
    device = triton_device(device)
    g = torch.Generator().manual_seed(block[0])
    weight, crow, col, values = random_bsr_weight(OUT, IN, block, 0.6, torch.float32, device, g)
    for tokens in (3, 20):
        x, bias = inputs(tokens, IN, OUT, torch.float32, device, g, with_bias=True)
        check_against_float64(run_triton(x, crow, col, values, bias, OUT), x, weight, bias)


def _config_id(config):
    return "-".join(f"{k}{int(v)}" for k, v in config.kwargs.items()) + f"-w{config.num_warps}-s{config.num_stages}"


def _all_configs():
    module = triton_kernels().bsr_linear
    return ([pytest.param("tiled", c, id="tiled-" + _config_id(c)) for c in module._tiled_configs()]
            + [pytest.param("skinny", c, id="skinny-" + _config_id(c)) for c in module._skinny_configs()])


@pytest.mark.parametrize("path,config", _all_configs())
def test_every_autotuned_configuration(monkeypatch, device, path, config):
    """Each configuration the autotuner may pick on a GPU, on its own: under the interpreter in place of
    the fixed one, and on CUDA as the one untimed launch. 24×20 blocks (padded tiles, SUB_N above,
    below and across the block rows, U past the row's end)."""
    module = triton_kernels().bsr_linear
    device = triton_device(device)
    if device == "cuda":
        tuned = module._bsr_linear_tuned if path == "tiled" else module._bsr_linear_skinny_tuned
        monkeypatch.setattr(module, "AUTOTUNE", False)
        monkeypatch.setattr(tuned, "configs", [config])
        monkeypatch.setattr(module, "_prune_tiled" if path == "tiled" else "_prune_skinny", lambda cs, *a, **k: cs)
    elif path == "tiled":
        monkeypatch.setattr(module, "INTERPRETER_TILED", config.kwargs)
    else:
        monkeypatch.setattr(module, "INTERPRETER_SKINNY", {False: config.kwargs, True: config.kwargs})
    g = torch.Generator().manual_seed(11)
    weight, crow, col, values = random_bsr_weight(OUT, 90, (24, 20), 0.7, torch.float16, device, g)
    x, bias = inputs(33 if path == "tiled" else 5, 90, OUT, torch.float16, device, g, with_bias=True)
    check_against_float64(module.bsr_linear_triton(x, crow, col, values, bias, OUT), x, weight, bias)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_default_cpu_op_agrees_with_triton(dtype):
    triton_kernels()
    triton_device("cpu")
    g = torch.Generator().manual_seed(3)
    weight, crow, col, values = random_bsr_weight(OUT, IN, (16, 16), 0.6, dtype, "cpu", g)
    x, bias = inputs(5, IN, OUT, dtype, "cpu", g, with_bias=True)
    y_cpu = torch.ops.sparse_ops.bsr_linear(x, crow, col, values, bias, OUT)
    y_triton = run_triton(x, crow, col, values, bias, OUT)
    check_against_float64(y_cpu, x, weight, bias)
    check_against_float64(y_triton, x, weight, bias)
    torch.testing.assert_close(y_cpu, y_triton, msg=lambda m: f"CPU backend {cpu_backend('bsr_linear')}: {m}")


def test_launcher_rejects_what_it_cannot_run(monkeypatch):
    kernels = triton_kernels()
    module = kernels.bsr_linear
    x = torch.randn(2, 300)
    crow = torch.tensor([0, 1], dtype=torch.int32)
    col = torch.zeros(1, dtype=torch.int32)
    monkeypatch.setattr(module, "INTERPRETED", True)  # CPU tensors pass the device check, whatever the env
    with pytest.raises(ValueError, match="block_size"):
        module.bsr_linear_triton(x, crow, col, torch.randn(1, 1, 256), None, 1)
    with pytest.raises(ValueError, match="split"):
        module.bsr_linear_triton(x, crow, col, torch.randn(1, 1, 16), None, 1, split=0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        module.bsr_linear_triton(x.double(), crow, col, torch.randn(1, 1, 16).double(), None, 1)
    monkeypatch.setattr(module, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        module.bsr_linear_triton(x, crow, col, torch.randn(1, 1, 16), None, 1)


def test_choose_split_fills_the_gpu_only_when_blocks_allow():
    choose = triton_kernels().bsr_linear.choose_split
    # 4096×4096 at 10% in 32×32 blocks on 132 SMs: 128 block rows of ~13 blocks → shares of ≥ 2 blocks
    split = choose(128, 1664, 32, 132)
    assert split == 4 and 1664 / (128 * split) >= 2
    assert choose(344, 344 * 13, 32, 132) == 1  # 11008 outputs: the grid already fills the GPU
    assert choose(24, 58, 32, 132) == 1  # BERT 768×768: ~2.4 blocks per row, nothing to split
    assert choose(1, 10_000, 16, 132) == triton_kernels().bsr_linear.MAX_SPLIT
