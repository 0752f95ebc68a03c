"""sparse_ops.oneshot (Wanda, SparseGPT, magnitude) and sparse_ops.perplexity against independent
float64 references written here from the published algorithms' semantics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

import sparse_ops
from sparse_ops.pruning.sparsegpt import sparsegpt_prune

VOCAB = 61


class ToyBlock(nn.Module):
    """x + down(relu(up(x))): two targets, the second reading what the first computed."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class ToyLM(nn.Module):
    def __init__(self, width=24, hidden=40, layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(ToyBlock(width, hidden) for _ in range(layers))
        self.head = nn.Linear(width, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def toy(dead_inputs=(3, 17), dead_hidden=(5,), **kw) -> ToyLM:
    """A float64 toy whose embedding never activates `dead_inputs` and whose up never activates
    `dead_hidden` (so the downs see never-active inputs)."""
    model = ToyLM(**kw).double()
    with torch.no_grad():
        model.embed.weight[:, list(dead_inputs)] = 0
        for block in model.layers:
            block.up.bias[list(dead_hidden)] = -1e3
    return model


def calibration(n=6, seq=9, seed=1):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


# -- independent references (float64) -------------------------------------------------------------
def ref_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune-mask of the `count` lowest of each row; ties: lower index first (a stable sort)."""
    order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def ref_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True).reshape(rows, cols)


def ref_wanda(w: torch.Tensor, x: torch.Tensor, sparsity: float, n_m=None) -> torch.Tensor:
    scores = w.abs() * torch.linalg.vector_norm(x, dim=0)
    if n_m:
        return ref_n_m(scores, *n_m)
    return ref_lowest(scores, math.floor(sparsity * w.shape[1] + 0.5))


def ref_sparsegpt(w: torch.Tensor, x: torch.Tensor, sparsity: float, n_m=None, block=128, damp=0.01):
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) in float64, from the calibration inputs."""
    w = w.clone()
    h = x.t() @ x
    cols = w.shape[1]
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1
            w[:, j] = 0
    h = h + damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    u = torch.linalg.cholesky(hinv).t()  # upper factor: Uᵀ U = H⁻¹
    mask = torch.zeros_like(w, dtype=torch.bool)
    total_rows = w.shape[0]
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        if n_m is None:
            keys = (w[:, b0:b1] ** 2 / torch.diag(u)[b0:b1] ** 2).reshape(1, -1)
            count = (math.floor(sparsity * total_rows * b1 + 0.5) - math.floor(sparsity * total_rows * b0 + 0.5))
            mask[:, b0:b1] = ref_lowest(keys, count).reshape(total_rows, b1 - b0)
        errors = torch.zeros(total_rows, b1 - b0, dtype=w.dtype)
        for j in range(b0, b1):
            if n_m is not None and (j - b0) % n_m[1] == 0:
                g = slice(j, j + n_m[1])
                mask[:, g] = ref_n_m(w[:, g] ** 2 / torch.diag(u)[g] ** 2, *n_m)
            q = torch.where(mask[:, j], 0.0, w[:, j])
            e = (w[:, j] - q) / u[j, j]
            w[:, j:b1] -= torch.outer(e, u[j, j:b1])
            w[:, j] = q
            errors[:, j - b0] = e
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return w, mask


def dense_inputs(model: ToyLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each target's inputs (tokens × in) with the model still dense."""
    xs = {}
    h = model.embed(ids)
    for i, block in enumerate(model.layers):
        xs[f"layers.{i}.up"] = h.reshape(-1, h.shape[-1])
        a = torch.relu(block.up(h))
        xs[f"layers.{i}.down"] = a.reshape(-1, a.shape[-1])
        h = h + block.down(a)
    return xs


# -- Wanda --------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity,sparsity", [("element", 0.5), ("element", 0.37), ("element", 0.0),
                                                  ("2:4", None), ("4:8", None), ("1:4", None)])
def test_wanda_matches_reference(granularity, sparsity):
    model, ids = toy(), calibration()
    n_m = None if granularity == "element" else tuple(int(v) for v in granularity.split(":"))
    # Wanda takes each block's statistics from the block still dense, but block 1 sees block 0 pruned
    expected = {}
    with torch.no_grad():
        reference = copy.deepcopy(model)
        for i in range(len(reference.layers)):
            xs = dense_inputs(reference, ids)
            for part in ("up", "down"):
                name = f"layers.{i}.{part}"
                layer = reference.get_submodule(name)
                expected[name] = ref_wanda(layer.weight, xs[name], sparsity or 0, n_m)
            for part in ("up", "down"):
                layer = reference.get_submodule(f"layers.{i}.{part}")
                layer.weight[expected[f"layers.{i}.{part}"]] = 0
    report = sparse_ops.oneshot(model, ids, "wanda", sparsity, granularity, progress=False)
    for name, mask in expected.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w == 0, mask), name
        if n_m:
            kept = (w != 0).reshape(w.shape[0], -1, n_m[1]).sum(-1)
            assert bool((kept == n_m[0]).all()), name
        else:
            assert bool(((w == 0).sum(1) == math.floor((sparsity) * w.shape[1] + 0.5)).all()), name
    # kept weights unchanged
    original = toy()
    for name in expected:
        kept = model.get_submodule(name).weight != 0
        assert torch.equal(model.get_submodule(name).weight[kept], original.get_submodule(name).weight[kept])
    assert [r.name for r in report.layers] == list(expected)


def test_wanda_prunes_never_active_inputs_first():
    model, ids = toy(dead_inputs=(3, 17)), calibration()
    sparse_ops.oneshot(model, ids, "wanda", 0.25, progress=False)
    up = model.layers[0].up.weight
    assert bool((up[:, [3, 17]] == 0).all())


def test_report_error_is_the_relative_reconstruction_error():
    model, ids = toy(), calibration()
    original = toy()
    xs = dense_inputs(original, ids)
    report = sparse_ops.oneshot(model, ids, "wanda", 0.5, progress=False)
    first = report.layers[0]
    assert first.name == "layers.0.up"
    w, w_hat, x = original.layers[0].up.weight.detach(), model.layers[0].up.weight.detach(), xs["layers.0.up"].detach()
    expected = float(((w - w_hat) @ x.t()).square().sum() / (w @ x.t()).square().sum())
    assert first.error == pytest.approx(expected, rel=1e-9)
    assert first.sparsity == pytest.approx(float((w_hat == 0).float().mean()))
    assert 0.49 < report.sparsity_reached < 0.52
    assert "layers.0.up" in str(report)


# -- SparseGPT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(37, 48), (20, 200), (9, 136)])
@pytest.mark.parametrize("granularity,sparsity", [("element", 0.5), ("element", 0.7), ("2:4", None), ("4:8", None)])
def test_sparsegpt_layer_matches_reference(shape, granularity, sparsity):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, dtype=torch.float64, generator=g)
    x = torch.randn(3 * cols, cols, dtype=torch.float64, generator=g) * torch.rand(cols, dtype=torch.float64, generator=g) * 3
    x[:, [1, cols - 2]] = 0  # inputs never active
    n_m = None if granularity == "element" else tuple(int(v) for v in granularity.split(":"))
    expected_w, expected_mask = ref_sparsegpt(w, x, sparsity or 0.5, n_m)
    got_w, got_mask = sparsegpt_prune(w, x.t() @ x, sparsity or 0.5, n_m)
    assert torch.equal(got_mask, expected_mask)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-9, atol=1e-9)
    assert bool((got_w[got_mask] == 0).all()) and bool((got_w[:, [1, cols - 2]] == 0).all())
    if n_m is None:
        assert int(got_mask.sum()) == math.floor((sparsity or 0.5) * rows * cols + 0.5)
    else:
        assert bool(((~got_mask).reshape(rows, -1, n_m[1]).sum(-1) == n_m[0]).all())


def test_sparsegpt_prunes_each_layer_from_the_pruned_inputs_before_it():
    model, ids = toy(dead_hidden=()), calibration()
    reference = copy.deepcopy(model)
    sparse_ops.oneshot(model, ids, "sparsegpt", 0.6, progress=False)
    with torch.no_grad():
        for i in range(len(reference.layers)):
            up = reference.layers[i].up
            up.weight.copy_(ref_sparsegpt(up.weight, dense_inputs(reference, ids)[f"layers.{i}.up"], 0.6)[0])
            down = reference.layers[i].down  # its inputs come from the pruned and updated up
            down.weight.copy_(ref_sparsegpt(down.weight, dense_inputs(reference, ids)[f"layers.{i}.down"], 0.6)[0])
    for name in ("layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"):
        torch.testing.assert_close(model.get_submodule(name).weight, reference.get_submodule(name).weight,
                                   rtol=1e-7, atol=1e-9)


# -- on a tiny Llama with outlier features: SparseGPT < Wanda < magnitude ---------------------------
def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a few input features with outlier scales, as in real LLMs
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64)[:4]] = 20.0
    return model


def test_output_error_ordering_on_a_llama_with_outlier_features():
    dense = tiny_llama()
    ids = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = dense(held_out).logits
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = copy.deepcopy(dense)
        sparse_ops.oneshot(model, ids, method, 0.5, progress=False)
        with torch.no_grad():
            errors[method] = float((model(held_out).logits - reference).square().sum() / reference.square().sum())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# -- every decoder, both layer types --------------------------------------------------------------
def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_conv1d_is_pruned_along_its_input_features(method):
    model = gpt2()
    report = sparse_ops.oneshot(model, calibration(seq=12), method, granularity="2:4", progress=False)
    assert [r.name for r in report.layers] == [f"transformer.h.{i}.{n}" for i in range(2)
                                                for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for r in report.layers:
        w = model.get_submodule(r.name).weight  # Conv1D: (in, out); groups of 4 run along `in`
        kept = (w.t() != 0).reshape(w.shape[1], -1, 4).sum(-1)
        assert bool((kept == 2).all()), r.name
        assert r.sparsity == 0.5


def test_magnitude_is_exact_per_matrix():
    model = toy()
    original = toy()
    sparse_ops.oneshot(model, calibration(), "magnitude", 0.3, progress=False)
    w, w0 = model.layers[0].down.weight, original.layers[0].down.weight
    expected = ref_lowest(w0.abs().reshape(1, -1), math.floor(0.3 * w0.numel() + 0.5)).reshape(w0.shape)
    assert torch.equal(w == 0, expected)


def test_calibration_forms_agree_and_padding_is_left_out():
    ids = calibration(n=4, seq=10)
    a, b, c = toy(), toy(), toy()
    sparse_ops.oneshot(a, ids, "wanda", 0.5, progress=False)
    sparse_ops.oneshot(b, [ids[:2], {"input_ids": ids[2:]}], "wanda", 0.5, progress=False)
    padded = torch.cat([ids, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(4, 10, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long)], dim=1)
    sparse_ops.oneshot(c, [{"input_ids": padded, "attention_mask": mask}], "wanda", 0.5, progress=False)
    for name in ("layers.0.up", "layers.1.down"):
        assert torch.equal(a.get_submodule(name).weight, b.get_submodule(name).weight)
        assert torch.equal(a.get_submodule(name).weight, c.get_submodule(name).weight)


def test_device_argument_gives_the_same_result():
    a, b = toy(), toy()
    sparse_ops.oneshot(a, calibration(), "sparsegpt", 0.5, progress=False)
    sparse_ops.oneshot(b, calibration(), "sparsegpt", 0.5, device="cpu", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,word", [
    ({"sparsity": 1.0}, ValueError, "sparsity"),
    ({"sparsity": -0.1}, ValueError, "sparsity"),
    ({"granularity": "4:4"}, ValueError, "granularity"),
    ({"granularity": "2:5"}, ValueError, "granularity"),  # 5 divides neither 24 nor 40
    ({"granularity": "blocks"}, ValueError, "granularity"),
    ({"granularity": "2:4", "sparsity": 0.7}, ValueError, "sparsity"),
    ({"calibration": torch.zeros(0, 5, dtype=torch.long)}, ValueError, "calibration"),
    ({"calibration": []}, ValueError, "calibration"),
    ({"calibration": torch.full((2, 5), VOCAB)}, ValueError, "calibration"),
    ({"calibration": torch.rand(2, 5)}, TypeError, "input_ids"),
    ({"method": "obs"}, ValueError, "method"),
    ({"targets": [r"^head$"]}, ValueError, "targets"),
])
def test_bad_input_names_the_argument_and_leaves_the_model_untouched(kwargs, error, word):
    model = toy()
    before = copy.deepcopy(model.state_dict())
    args = {"calibration": calibration(), "method": "wanda", "sparsity": 0.5, **kwargs}
    with pytest.raises(error, match=word):
        sparse_ops.oneshot(model, args.pop("calibration"), args.pop("method"), progress=False, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_repeated_blocks_needs_targets():
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="targets"):
        sparse_ops.oneshot(model, calibration(), progress=False)


# -- perplexity ----------------------------------------------------------------------------------
def test_perplexity_matches_direct_computation():
    model = tiny_llama()
    stream = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(3))
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in stream.split(16):  # 16, 16, 16, 2
            logits = model(window[None]).logits[0, :-1].double()
            nll += float(F.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    expected = math.exp(nll / count)
    assert sparse_ops.perplexity(model, stream, seq_len=16, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)
    assert sparse_ops.perplexity(model, stream[None], seq_len=16, progress=False) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kwargs,error,word", [
    ({"input_ids": torch.rand(10)}, TypeError, "input_ids"),
    ({"input_ids": torch.full((10,), VOCAB)}, ValueError, "input_ids"),
    ({"input_ids": torch.zeros(1, dtype=torch.long)}, ValueError, "input_ids"),
    ({"seq_len": 1}, ValueError, "seq_len"),
    ({"batch_size": 0}, ValueError, "batch_size"),
])
def test_perplexity_bad_input(kwargs, error, word):
    args = {"input_ids": torch.zeros(10, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=word):
        sparse_ops.perplexity(tiny_llama(), args.pop("input_ids"), progress=False, **args)
