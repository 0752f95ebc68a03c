"""sparse_ops.export on a real (tiny, random) transformers BERT, its report, and save / load.

The exported model must match the masked dense model under flash-attention's tolerance rule
(tests/_tolerance.py: error against the float64 model ≤ 2× the dense model's own error in that
dtype + a floor), on CPU and, for the BSR path, under the Triton interpreter. Saving and loading
(safetensors, or a plain state_dict into another exported model) must be bit-exact. format="auto"
runs with an injected timer, so nothing depends on measured time.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from _tolerance import assert_tolerance
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertModel

from sparse_ops import ExportReport, SparseLinear, export, load_exported, save_exported
from sparse_ops.sparse.export import read_plan
from sparse_ops.sparse.linear import FormatCache, format_cache_key

BLOCK = (16, 16)
ATTENTION = r"attention\.self\.(query|key|value)$"  # pruned element-wise; the other encoder linears by blocks


def bert_config(hidden=64, layers=2):
    return BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=2 * hidden, max_position_embeddings=32)


def pruned_bert(seed=0, hidden=64, layers=2):
    """A random BertModel whose encoder linears are pruned: query/key/value at 90% element-wise, the
    others at 75% of 16×16 blocks (half of the kept entries zeroed too); the pooler stays dense."""
    torch.manual_seed(seed)
    model = BertModel(bert_config(hidden, layers)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (isinstance(module, nn.Linear) and name.startswith("encoder.")):
                continue
            w = module.weight
            keep = torch.rand(w.shape, generator=g) >= 0.9
            if not re.search(ATTENTION, name):
                rows, cols = -(-w.shape[0] // BLOCK[0]), -(-w.shape[1] // BLOCK[1])
                blocks = torch.rand(rows, cols, generator=g) >= 0.75
                keep = blocks.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[: w.shape[0], : w.shape[1]]
                keep &= torch.rand(w.shape, generator=g) >= 0.5
            w.mul_(keep)
    return model


def batch(seed=1, size=2, length=12):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[-1, length // 2:] = 0  # padding in the last sequence
    return {"input_ids": torch.randint(0, 97, (size, length), generator=g), "attention_mask": mask}


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state, out.pooler_output


def check_matches_masked(exported, masked, inputs, dtype=torch.float32):
    """The tolerance rule on both outputs, against the masked dense model in float64 and in dtype."""
    ref64 = outputs(copy.deepcopy(masked).double(), inputs)
    same = outputs(copy.deepcopy(masked).to(dtype), inputs)
    for out, r, s, what in zip(outputs(exported, inputs), ref64, same, ["last_hidden_state", "pooler_output"]):
        assert_tolerance(out, r, s, what=f"{what} ({dtype})")


class FakeTimer:
    """ms by layer shape: square layers (attention) favour csr, the others (feed-forward) bsr. Counts calls."""

    def __init__(self, tokens=128):
        self.calls, self.tokens = 0, tokens
        self.ms = {True: {"dense": 1.0, "csr": 0.25, "bsr": 0.5}, False: {"dense": 2.0, "csr": 1.5, "bsr": 0.5}}

    def __call__(self, layer, x):
        assert isinstance(layer, SparseLinear) and x.shape == (self.tokens, layer.in_features)
        self.calls += 1
        return self.ms[layer.in_features == layer.out_features][layer.format]


def encoder_linears(model):
    return {n: m for n, m in model.named_modules() if n.startswith("encoder.") and n.count(".") >= 4
            and isinstance(m, (nn.Linear, SparseLinear))}


# ----------------------------------------------------------------------------------------------
# correctness on a real BERT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["bsr", "csr", "auto", "per-layer"])
def test_exported_bert_matches_masked_dense_model(format):
    masked = pruned_bert()
    fmt = {ATTENTION: "csr", "dense$": "bsr"} if format == "per-layer" else format
    exported = export(copy.deepcopy(masked), fmt, block_size=BLOCK, timer=FakeTimer())
    linears = encoder_linears(exported)
    assert len(linears) == 12 and all(isinstance(m, SparseLinear) for m in linears.values())
    assert type(exported.pooler.dense) is nn.Linear  # dense (0% sparse): kept
    if format in ("bsr", "csr"):
        assert {m.format for m in linears.values()} == {format}
    else:
        assert {m.format for m in linears.values()} == {"csr", "bsr"}
    for name, module in linears.items():  # weights moved over exactly
        assert torch.equal(module.to_dense().weight, masked.get_submodule(name).weight)
    check_matches_masked(exported, masked, batch())


def test_exported_bert_under_the_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    import sparse_ops.kernels.bsr_linear as bsr_kernels
    from sparse_ops.ops import use_backend

    launches = []
    launcher = bsr_kernels.bsr_linear_triton
    monkeypatch.setattr(bsr_kernels, "bsr_linear_triton", lambda *args: launches.append(1) or launcher(*args))
    masked = pruned_bert(seed=2, hidden=32, layers=1)
    exported = export(copy.deepcopy(masked), "bsr", block_size=BLOCK, timer=FakeTimer())
    inputs = batch(seed=3, size=1, length=8)
    with use_backend("triton"):
        check_matches_masked(exported, masked, inputs)
    assert len(launches) == 6  # each of the 6 encoder linears ran through the Triton kernel once


@pytest.mark.parametrize("format", ["bsr", "csr"])
def test_bert_base_sized_layer(format):
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU())
    with torch.no_grad():
        keep = (torch.rand(24, 96, generator=g) >= 0.9).repeat_interleave(32, 0).repeat_interleave(32, 1)
        model[0].weight.mul_(keep.T)
    masked = copy.deepcopy(model)
    export(model, format, block_size=(32, 32), timer=FakeTimer())
    assert isinstance(model[0], SparseLinear) and model[0].format == format
    x = torch.randn(2, 5, 768, generator=g)
    with torch.no_grad():
        assert_tolerance(model(x), masked.double()(x.double()), masked.float()(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_exported_model(dtype):
    masked = pruned_bert(seed=5)
    exported = export(copy.deepcopy(masked), "auto", block_size=BLOCK, timer=FakeTimer())
    converted = exported.to(dtype)
    for module in encoder_linears(converted).values():
        assert module.dtype == dtype
        if module.format != "dense":
            assert module.crow_indices.dtype == module.col_indices.dtype == torch.int32
    check_matches_masked(converted, masked, batch(), dtype)
    # export(dtype=...) converts the whole model first
    direct = export(copy.deepcopy(masked), "bsr", block_size=BLOCK, dtype=dtype, timer=FakeTimer())
    assert direct.sparse_ops_report.dtype == str(dtype).replace("torch.", "")
    check_matches_masked(direct, masked, batch(), dtype)


def test_compile_fullgraph_of_an_exported_bert():
    masked = pruned_bert(seed=6)
    exported = export(copy.deepcopy(masked), {ATTENTION: "csr", ".": "bsr"}, block_size=BLOCK, timer=FakeTimer())
    torch._dynamo.reset()
    compiled = torch.compile(exported, fullgraph=True, backend="aot_eager")
    inputs = batch(seed=7)
    eager = outputs(exported, inputs)
    for c, e in zip(outputs(compiled, inputs), eager):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# selection, auto choice and the report
# ----------------------------------------------------------------------------------------------
def test_report_lists_every_linear_with_timings():
    masked = pruned_bert(seed=8)
    timer = FakeTimer(tokens=16)
    exported = export(copy.deepcopy(masked), "auto", block_size=BLOCK, tokens=16, timer=timer,
                      cache=FormatCache(directory=""))
    report = exported.sparse_ops_report
    assert isinstance(report, ExportReport) and report.tokens == 16 and report.dtype == "float32"
    names = [n for n, m in masked.named_modules() if isinstance(m, nn.Linear)]
    assert [row.name for row in report.layers] == names
    for row in report.layers:
        weight = masked.get_submodule(row.name).weight
        assert (row.out_features, row.in_features) == tuple(weight.shape)
        assert row.sparsity == pytest.approx((weight == 0).float().mean().item())
        if row.name == "pooler.dense":
            assert row.format == "kept dense" and row.ms == {} and row.speedup is None
            continue
        module = exported.get_submodule(row.name)
        assert row.format == module.format and set(row.ms) == {"dense", "csr", "bsr"}
        assert row.format == min(row.ms, key=row.ms.get)
        assert row.sparse_ms == row.ms[row.format] and row.speedup == pytest.approx(row.ms["dense"] / row.sparse_ms)
        assert row.block_size == (BLOCK if row.format == "bsr" else None)
    # each cache key was timed once; the other layers with that key (shape, sparsity level) hit the cache
    keys = {format_cache_key(masked.get_submodule(row.name).weight.detach(), BLOCK, 16, True)
            for row in report.layers[:-1]}
    assert timer.calls == 3 * len(keys) == 3 * sum(not row.cached for row in report.layers[:-1])
    totals = report.totals()
    assert totals["exported"] == 12 and totals["kept_dense"] == 1
    assert totals["dense_ms"] == pytest.approx(sum(row.ms["dense"] for row in report.layers[:-1]))
    assert totals["sparse_ms"] == pytest.approx(sum(row.sparse_ms for row in report.layers[:-1]))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["name"] == names[0] and data["totals"]["exported"] == 12
    text = str(report)
    lines = text.splitlines()
    assert all(name in text for name in names) and "kept dense" in text and lines[-1].startswith("total")
    column = lines[1].index("format")  # aligned: every row's format starts under the header
    for row, line in zip(report.layers, lines[3:-2]):
        assert line[column:].startswith(row.format), (line, row.format)
    assert f"{totals['speedup']:.2f}x" in lines[-1]


def test_auto_decisions_are_reused_by_a_second_export(tmp_path):
    masked = pruned_bert(seed=9)
    timer, cache = FakeTimer(), FormatCache(directory=tmp_path)
    first = export(copy.deepcopy(masked), "auto", block_size=BLOCK, timer=timer, cache=cache)
    calls = timer.calls
    second = export(copy.deepcopy(masked), "auto", block_size=BLOCK, timer=timer, cache=FormatCache(tmp_path))
    assert timer.calls == calls and all(row.cached for row in second.sparse_ops_report.exported())
    assert [r.format for r in second.sparse_ops_report.layers] == [r.format for r in first.sparse_ops_report.layers]


def test_min_sparsity_and_patterns_select_the_layers():
    masked = pruned_bert(seed=10)
    sparsities = {n: (m.weight == 0).float().mean().item() for n, m in encoder_linears(masked).items()}
    expected = {n for n, s in sparsities.items() if s >= 0.89}
    assert 0 < len(expected) < len(sparsities)
    sparsest = export(copy.deepcopy(masked), "csr", min_sparsity=0.89, timer=FakeTimer())
    assert {r.name for r in sparsest.sparse_ops_report.exported()} == expected
    assert {n for n, m in encoder_linears(sparsest).items() if isinstance(m, SparseLinear)} == expected
    by_name = export(copy.deepcopy(masked), "csr", patterns=[r"layer\.1\.output\.dense", r"^pooler"], timer=FakeTimer())
    assert {r.name for r in by_name.sparse_ops_report.exported()} == {"encoder.layer.1.output.dense", "pooler.dense"}
    assert isinstance(by_name.pooler.dense, SparseLinear)  # patterns override min_sparsity
    check_matches_masked(by_name, masked, batch())


def test_shared_modules_are_replaced_everywhere():
    shared = nn.Linear(8, 8)
    with torch.no_grad():
        shared.weight.mul_(torch.eye(8))
    model = nn.Sequential(shared, nn.ReLU(), shared)
    export(model, "csr", timer=FakeTimer())
    assert isinstance(model[0], SparseLinear) and model[0] is model[2]
    assert len(model.sparse_ops_report.layers) == 1


def test_a_tied_weight_is_kept_dense_with_a_warning():
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.body, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.embed(ids))))

    model = TiedHead()
    with torch.no_grad():
        model.body.weight.mul_(torch.eye(8))
        model.embed.weight.mul_(torch.rand(16, 8) > 0.8)
    ids = torch.arange(16).view(2, 8)
    with torch.no_grad():
        want = model(ids)
    with pytest.warns(UserWarning, match=r"head is kept dense: its weight is also embed\.weight"):
        export(model, "csr", timer=FakeTimer(tokens=128))
    assert isinstance(model.body, SparseLinear) and type(model.head) is nn.Linear
    assert model.head.weight is model.embed.weight  # still tied
    row = {r.name: r for r in model.sparse_ops_report.layers}["head"]
    assert row.format == "kept dense" and row.note == "tied to embed.weight" and "tied to embed.weight" in str(
        model.sparse_ops_report)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want)
    with pytest.raises(ValueError, match="tied weight"), pytest.warns(UserWarning):
        export(TiedHead(), "csr", patterns=[r"^head$"], timer=FakeTimer())


def test_readme_export_snippet_runs_as_printed(tmp_path, monkeypatch):
    """The README's export block, executed verbatim on a pruned BERT saved as "pruned": the loaded
    skeleton is in eval mode and its outputs equal the exported model's bit for bit."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Inference: export a pruned model to sparse layers", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "load_exported(skeleton" in snippet
    pruned_bert(seed=5).save_pretrained(tmp_path / "pruned")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSE_OPS_CACHE_DIR", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    model, skeleton = namespace["model"], namespace["skeleton"]
    assert not skeleton.training and not any(m.training for m in skeleton.modules())
    inputs = batch(seed=6)
    for a, b in zip(outputs(skeleton, inputs), outputs(model, inputs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fuse", [True, False])
def test_intermediate_gelu_is_fused_into_the_sparse_op(fuse):
    """BertIntermediate: dense + GELU become one SparseLinear(activation="gelu") and an nn.Identity;
    with fuse_activations=False they stay apart. Either way the outputs meet the tolerance rule."""
    masked = pruned_bert(seed=3)
    exported = export(copy.deepcopy(masked), "csr", timer=FakeTimer(), fuse_activations=fuse)
    for layer in exported.encoder.layer:
        assert layer.intermediate.dense.activation == ("gelu" if fuse else "none")
        assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity) is fuse
        assert layer.attention.self.query.activation == "none" and layer.output.dense.activation == "none"
    report = {row.name: row for row in exported.sparse_ops_report.layers}
    assert report["encoder.layer.0.intermediate.dense"].activation == ("gelu" if fuse else "none")
    assert ("+gelu" in str(exported.sparse_ops_report)) is fuse
    check_matches_masked(exported, masked, batch(seed=4))


def test_only_an_exact_gelu_is_fused():
    """A tanh-approximated GELU, or an intermediate block that is not exported, is left alone."""
    masked = pruned_bert(seed=5)
    masked.encoder.layer[0].intermediate.intermediate_act_fn = nn.GELU(approximate="tanh")
    exported = export(copy.deepcopy(masked), "csr", timer=FakeTimer(),
                      patterns=[r"layer\.0\.intermediate\.dense$", r"layer\.1\.attention"])
    assert exported.encoder.layer[0].intermediate.dense.activation == "none"
    assert isinstance(exported.encoder.layer[0].intermediate.intermediate_act_fn, nn.GELU)
    assert type(exported.encoder.layer[1].intermediate.dense) is nn.Linear
    assert not isinstance(exported.encoder.layer[1].intermediate.intermediate_act_fn, nn.Identity)
    check_matches_masked(exported, masked, batch(seed=6))


def test_load_exported_refuses_a_fused_gelu_over_another_activation(tmp_path):
    path = tmp_path / "model.safetensors"
    save_exported(export(pruned_bert(seed=7), "csr", timer=FakeTimer()), path)
    skeleton = BertModel(bert_config()).eval()
    skeleton.encoder.layer[1].intermediate.intermediate_act_fn = nn.ReLU()
    with pytest.raises(ValueError, match="fuses the GELU 'encoder.layer.1.intermediate.intermediate_act_fn'"):
        load_exported(skeleton, path)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_safetensors_round_trip_is_bit_exact(tmp_path, dtype):
    exported = export(pruned_bert(seed=11), {ATTENTION: "csr", "output": "bsr", ".": "dense"}, block_size=BLOCK,
                      dtype=dtype, timer=FakeTimer())
    path = tmp_path / "model.safetensors"
    save_exported(exported, path)
    plan = read_plan(path)
    assert plan["encoder.layer.0.attention.self.query"] == {"format": "csr", "block_size": None, "in": 64, "out": 64,
                                                            "bias": True, "activation": "none", "fused": None,
                                                            "stacked": [f"encoder.layer.0.attention.self.{n}"
                                                                        for n in ("query", "key", "value")]}
    assert plan["encoder.layer.1.output.dense"]["block_size"] == list(BLOCK)
    assert plan["encoder.layer.0.intermediate.dense"]["format"] == "dense" and "pooler.dense" not in plan
    assert plan["encoder.layer.0.intermediate.dense"]["activation"] == "gelu"
    assert plan["encoder.layer.0.intermediate.dense"]["fused"] == "encoder.layer.0.intermediate.intermediate_act_fn"
    torch.manual_seed(123)
    skeleton = BertModel(bert_config()).eval().to(dtype)  # other random weights, dense
    loaded = load_exported(skeleton, path, device="cpu")
    assert loaded is skeleton
    assert {n: m.format for n, m in encoder_linears(loaded).items()} == {n: spec["format"] for n, spec in plan.items()}
    assert_same_state(loaded, exported)
    assert isinstance(loaded.encoder.layer[1].intermediate.intermediate_act_fn, nn.Identity)
    inputs = batch(seed=12)
    for a, b in zip(outputs(loaded, inputs), outputs(exported, inputs)):
        assert torch.equal(a, b)


def test_state_dict_loads_into_an_export_with_another_sparsity_pattern():
    source = export(pruned_bert(seed=13), {ATTENTION: "csr", ".": "bsr"}, block_size=BLOCK, timer=FakeTimer())
    other = export(pruned_bert(seed=14), {ATTENTION: "csr", ".": "bsr"}, block_size=BLOCK, timer=FakeTimer())
    assert any(a.nnz() != b.nnz() for a, b in zip(encoder_linears(source).values(), encoder_linears(other).values()))
    other.load_state_dict(source.state_dict())
    assert_same_state(other, source)
    inputs = batch(seed=15)
    for a, b in zip(outputs(other, inputs), outputs(source, inputs)):
        assert torch.equal(a, b)


def test_load_exported_rejects_mismatches(tmp_path):
    exported = export(pruned_bert(seed=16), "csr", timer=FakeTimer())
    path = tmp_path / "model.safetensors"
    save_exported(exported, path)
    with pytest.raises(ValueError, match=r"model\.encoder\.layer\.0\.\S+ has \(out, in, bias\) = \(32, 32, True\)"):
        load_exported(BertModel(bert_config(hidden=32)), path)
    with pytest.raises(ValueError, match=r"names module 'encoder\.layer\.1\.\S+', which model lacks"):
        load_exported(BertModel(bert_config(layers=1)), path)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not written by sparse_ops.save_exported"):
        load_exported(BertModel(bert_config()), plain)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_exported(BertModel(bert_config()), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="holds no SparseLinear"):
        save_exported(BertModel(bert_config()), tmp_path / "dense.safetensors")


# ----------------------------------------------------------------------------------------------
# bad input (docs/design.md §4)
# ----------------------------------------------------------------------------------------------
def test_export_rejects_bad_arguments():
    model = pruned_bert(seed=17, hidden=32, layers=1)
    with pytest.raises(ValueError, match="a model with nothing to prune"):
        export(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match=r"no nn.Linear or Conv1D of the model has sparsity >= min_sparsity=0.95"):
        export(copy.deepcopy(model), "csr", min_sparsity=0.95)
    with pytest.raises(ValueError, match=re.escape("patterns ['^nothing'] match none")):
        export(copy.deepcopy(model), "csr", patterns=["^nothing"])
    with pytest.raises(ValueError, match="patterns: '\\(' is not a valid regex"):
        export(copy.deepcopy(model), "csr", patterns=["("])
    with pytest.raises(ValueError, match="patterns must be None or a non-empty list"):
        export(copy.deepcopy(model), "csr", patterns="query")
    with pytest.raises(ValueError, match="format must be one of"):
        export(copy.deepcopy(model), "coo")
    with pytest.raises(ValueError, match="format must be one of"):
        export(copy.deepcopy(model), {"query": "blocked"})
    with pytest.raises(ValueError, match="block_size must be a positive int or a pair"):
        export(copy.deepcopy(model), "bsr", block_size=(32, 0))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="min_sparsity must lie in"):
            export(copy.deepcopy(model), "csr", min_sparsity=bad)
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        export(copy.deepcopy(model), "csr", tokens=0)
    with pytest.raises(TypeError, match="dtype must be None or one of"):
        export(copy.deepcopy(model), "csr", dtype=torch.int8)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export("bert")
    with pytest.raises(TypeError, match="use sparse_ops.SparseLinear.from_dense"):
        export(nn.Linear(4, 4))
    # nothing was modified by a rejected export
    assert all(type(m) is nn.Linear for m in encoder_linears(model).values())


# ----------------------------------------------------------------------------------------------
# every decoder architecture, GPT-2's Conv1D included (docs/design.md §2.8)
# ----------------------------------------------------------------------------------------------
def magnitude_pruned(arch, seed=0):
    """A tiny random model of `arch` whose default targets (Linear or Conv1D) have the half of their
    weights smallest in |w| zeroed, per matrix, in the (out, in) orientation."""
    from _architectures import tiny_model

    from sparse_ops.pruning.targets import find_targets, weight_out_in

    model = tiny_model(arch, seed)
    with torch.no_grad():
        for _, layer in find_targets(model):
            w = weight_out_in(layer)
            drop = w.abs().flatten().argsort(stable=True)[: w.numel() // 2]
            keep = torch.ones(w.numel(), dtype=torch.bool)
            keep[drop] = False
            w.mul_(keep.view(w.shape))
    return model


def prompt(seed=2, size=2, length=7):
    return torch.randint(3, 99, (size, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "opt", "gpt2"])
def test_exported_decoder_matches_the_pruned_model_and_generates_the_same_tokens(arch):
    from _architectures import expected_targets

    model = magnitude_pruned(arch)
    x = prompt()
    with torch.no_grad():
        logits = model(input_ids=x).logits
    tokens = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    exported = export(model, "csr", timer=FakeTimer())
    assert sorted(row.name for row in exported.sparse_ops_report.exported()) == sorted(expected_targets(arch))
    assert all(isinstance(exported.get_submodule(n), SparseLinear) for n in expected_targets(arch))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, logits, rtol=0, atol=1e-5)
    assert torch.equal(exported.generate(x, max_new_tokens=8, do_sample=False, use_cache=True), tokens)


def test_a_conv1d_becomes_the_sparse_linear_of_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    model = magnitude_pruned("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = conv(x)
    export(model, {"c_attn": "bsr", ".": "csr"}, block_size=(8, 8), timer=FakeTimer())
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SparseLinear) and (layer.out_features, layer.in_features) == (96, 32)
    assert torch.equal(layer.to_dense().weight, weight.t()) and torch.equal(layer.bias, bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    row = next(r for r in model.sparse_ops_report.layers if r.name == "transformer.h.0.attn.c_attn")
    assert (row.out_features, row.in_features, row.sparsity, row.format) == (96, 32, 0.5, "bsr")
    assert not any(type(m) is Conv1D for m in model.transformer.h.modules())


def test_compile_fullgraph_of_an_exported_gpt2():
    exported = export(magnitude_pruned("gpt2"), "csr", timer=FakeTimer())
    x = prompt(seed=3)
    with torch.no_grad():
        eager = exported(input_ids=x, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(exported, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(input_ids=x, use_cache=False).logits, eager, rtol=1e-6, atol=1e-6)


def test_exported_gpt2_saves_and_loads_into_a_fresh_skeleton(tmp_path):
    from _architectures import tiny_config
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    exported = export(magnitude_pruned("gpt2"), {"mlp": "bsr", ".": "csr"}, block_size=(8, 8), timer=FakeTimer())
    path = tmp_path / "gpt2.safetensors"
    save_exported(exported, path)
    assert read_plan(path)["transformer.h.1.mlp.c_fc"] == {
        "format": "bsr", "block_size": [8, 8], "in": 32, "out": 128, "bias": True, "activation": "none",
        "fused": None, "stacked": None}
    skeleton = GPT2LMHeadModel(tiny_config("gpt2"))
    assert type(skeleton.transformer.h[1].mlp.c_fc) is Conv1D
    loaded = load_exported(skeleton, path)
    x = prompt(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, exported(input_ids=x).logits)
    assert torch.equal(loaded.generate(x, max_new_tokens=4, do_sample=False),
                       exported.generate(x, max_new_tokens=4, do_sample=False))
    wider = tiny_config("gpt2")
    wider.n_inner = 96
    with pytest.raises(ValueError, match=r"model\.transformer\.h\.0\.mlp\.c_fc has \(out, in, bias\) = \(96, 32, True\)"):
        load_exported(GPT2LMHeadModel(wider), path)
