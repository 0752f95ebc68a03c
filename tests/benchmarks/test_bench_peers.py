"""bench_model.py --peers and --compile (benchmarks/_peers.py) on a tiny random BERT: the static-shape ONNX export,
ONNX Runtime's check (a match is timed, a mismatch is FAIL and not timed), and a DeepSparse without
its environment reported as skipped with a reason instead of raising."""

import os
import sys

import pytest
import torch
from _tiny import one_thread  # noqa: F401  (autouse fixture)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
import _common as C
import _peers

TOL = 1e-4  # bench_model's float32 tolerance


@pytest.fixture(scope="module")
def tiny():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config).eval()
    with torch.no_grad():  # a pruned checkpoint: half of each linear's weights are zeros
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.5)
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        ref = model(**inputs).last_hidden_state.float()
    return model, inputs, ref


@pytest.fixture(scope="module")
def onnx_file(tiny, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[peers]')")
    model, inputs, _ = tiny
    path = str(tmp_path_factory.mktemp("peers") / "tiny.onnx")
    _peers.export_onnx(model, inputs, path)
    assert not model.training  # the export must not leave the model in training mode (dropout on)
    return path


def test_onnx_export_has_static_shapes_and_torch_outputs(tiny, onnx_file):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[peers]')")
    graph = onnx.load(onnx_file).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": [2, 16], "attention_mask": [2, 16]}  # no dynamic axes (DeepSparse needs that)
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]


def test_ort_matches_torch_dense_and_is_timed(tiny, onnx_file):
    _, inputs, ref = tiny
    r = _peers.measure(_peers.open_ort(onnx_file, inputs, ref, TOL, threads=1), warmup=1, repeats=2)
    assert r["status"] == "ok" and r["check"].startswith("ok max err"), r
    assert 0 < r["p20"] <= r["ms"] <= r["p80"]
    assert r["version"].startswith("onnxruntime ")


def test_ort_mismatch_is_fail_and_not_timed(tiny, onnx_file):
    _, inputs, ref = tiny
    peer = _peers.open_ort(onnx_file, inputs, ref + 1.0, TOL, threads=1)
    assert peer.timer is None
    r = _peers.measure(peer, warmup=1, repeats=2)
    assert r["status"] == "FAIL" and r["check"].startswith("FAIL max err") and r["ms"] is None, r


def test_missing_deepsparse_env_is_skipped_with_a_reason(tiny, tmp_path, monkeypatch):
    _, inputs, ref = tiny
    monkeypatch.setenv("SPARSE_OPS_DEEPSPARSE_VENV", str(tmp_path / "no-such-venv"))
    peer = _peers.open_deepsparse(str(tmp_path / "unused.onnx"), inputs, ref, TOL, threads=1)
    r = peer.info
    assert peer.timer is None and r["status"] == "skipped" and r["ms"] is None
    assert "no-such-venv" in r["reason"] and "setup_peers.sh" in r["reason"]


def test_open_peers_fills_the_row_and_never_raises(tiny, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[peers]')")
    model, inputs, ref = tiny
    monkeypatch.setenv("SPARSE_OPS_DEEPSPARSE_VENV", str(tmp_path / "no-such-venv"))
    peers = _peers.open_peers(model, inputs, ref, TOL, "cpu")
    timers = {name: peer.timer for name, peer in peers.items() if peer.timer is not None}
    assert list(timers) == ["ort"]
    timings = C.time_interleaved(timers, warmup=1, repeats=2)
    for peer in peers.values():
        peer.close()
    row = _peers.row_fields(_peers.with_times(peers, timings), 1.0)
    assert set(row) == set(_peers.FIELDS)
    assert row["ort_status"].startswith("ok (onnxruntime ") and row["vs_ort"] == row["ort_ms"] > 0
    assert row["deepsparse_status"].startswith("skipped: no DeepSparse environment")
    assert row["deepsparse_ms"] is None and row["vs_deepsparse"] is None
    printed = _peers.describe(row)
    assert "ONNX Runtime" in printed and "DeepSparse   not timed: skipped" in printed


def test_deepsparse_matches_torch_dense_where_installed(tiny, onnx_file):
    if not os.path.exists(_peers.deepsparse_python()):
        pytest.skip("no DeepSparse environment (scripts/setup_peers.sh)")
    _, inputs, ref = tiny
    peer = _peers.open_deepsparse(onnx_file, inputs, ref, TOL, threads=1)
    r = _peers.measure(peer, warmup=1, repeats=2)  # the worker serves 3 calls, then exits when closed
    assert r["status"] in ("ok", "skipped"), r  # skipped: e.g. a CPU DeepSparse does not support
    if r["status"] == "ok":
        assert r["check"].startswith("ok max err") and 0 < r["p20"] <= r["ms"] <= r["p80"]


def test_deepsparse_mismatch_is_fail_and_the_worker_exits(tiny, onnx_file):
    if not os.path.exists(_peers.deepsparse_python()):
        pytest.skip("no DeepSparse environment (scripts/setup_peers.sh)")
    _, inputs, ref = tiny
    peer = _peers.open_deepsparse(onnx_file, inputs, ref + 1.0, TOL, threads=1)
    if peer.info["status"] == "skipped":
        pytest.skip(f"DeepSparse cannot run here: {peer.info['reason']}")
    assert peer.info["status"] == "FAIL" and peer.info["check"].startswith("FAIL max err") and peer.timer is None


def test_time_interleaved_calls_each_contender_once_per_round():
    calls = []

    def timer(name, ms):
        return lambda: calls.append(name) or ms

    t = C.time_interleaved({"a": timer("a", 1.0), "b": timer("b", 3.0)}, warmup=2, repeats=5)
    assert calls == ["a", "b"] * 7  # in turn, warmup rounds included
    assert (t["a"].median_ms, t["b"].median_ms) == (1.0, 3.0)


def test_time_interleaved_turns_warm_up_then_time_a_burst():
    calls, ms = [], iter(range(1000))

    def timer(name):
        return lambda: calls.append(name) or float(next(ms))

    # 1 warmup round + ceil(5 / 2) = 3 timed rounds; each turn: 1 untimed call, then 2 timed calls
    t = C.time_interleaved({"a": timer("a"), "b": timer("b")}, warmup=1, repeats=5, burst=2, warm_calls=1)
    assert calls == ["a"] * 3 + ["b"] * 3 + (["a"] * 3 + ["b"] * 3) * 3
    # the calls that count: a's timed ones (the 2nd and 3rd of each of its turns), 5 of the 6
    assert t["a"].median_ms == sorted([7.0, 8.0, 13.0, 14.0, 19.0])[2]
    assert t["b"].median_ms == sorted([10.0, 11.0, 16.0, 17.0, 22.0])[2]


def test_worker_lines_skip_banners_and_report_exit_and_silence():
    import io

    lines = _peers._line_reader(io.StringIO('DeepSparse banner\n{"status": "ok"}\n{"ms": 2.5}\n'))
    assert _peers._read_json(lines, 5.0) == {"status": "ok"}  # the banner line is skipped
    assert _peers._read_json(lines, 5.0) == {"ms": 2.5}
    with pytest.raises(EOFError):
        _peers._read_json(lines, 5.0)
    import queue

    with pytest.raises(TimeoutError, match="no answer within"):
        _peers._read_json(queue.Queue(), 0.05)


def test_compiled_timers_check_before_timing(tiny):
    import copy

    import bench_model

    import sparse_ops

    model, inputs, ref = tiny
    exported = sparse_ops.export(copy.deepcopy(model), format="csr", min_sparsity=0.0)
    torch._dynamo.reset()
    timers = bench_model.compiled_timers(model, exported, inputs, ref, 1e-4, "cpu")
    assert sorted(timers) == ["dense_compiled", "sparse_compiled"]
    with torch.inference_mode():
        assert all(timer() > 0 for timer in timers.values())
    with pytest.raises(RuntimeError, match="torch.compile of the dense model: max err"):
        bench_model.compiled_timers(model, exported, inputs, ref + 1.0, 1e-4, "cpu")


def test_time_split_covers_the_median_and_sorts_ops_by_kind(tiny):
    """--profile: the three kinds add up to the timed median; the dense model's linear time is in its
    addmm calls, the export's in its sparse ops, and both run SDPA (attention)."""
    import copy

    import bench_model

    import sparse_ops

    model, inputs, _ = tiny
    exported = sparse_ops.export(copy.deepcopy(model), format="csr", min_sparsity=0.0)
    row = bench_model.split_fields(model, exported, inputs, dense_ms=10.0, sparse_ms=5.0)
    dense = [row[f"dense_{k}_ms"] for k in bench_model.KINDS]
    sparse = [row[f"sparse_{k}_ms"] for k in bench_model.KINDS]
    assert sum(dense) == pytest.approx(10.0) and sum(sparse) == pytest.approx(5.0)
    assert all(v > 0 for v in dense + sparse), row
    budget = 10.0 / 2.5 - row["sparse_attention_ms"] - row["sparse_other_ms"]
    expected = row["dense_linear_ms"] / budget if budget > 0 else float("inf")
    assert row["linears_needed_for_2_5x"] == pytest.approx(expected)
    assert bench_model._op_kind("sparse_ops::csr_linear_cpu") == bench_model._op_kind("aten::addmm") == "linear"
    assert bench_model._op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bench_model._op_kind("aten::native_layer_norm") == bench_model._op_kind("aten::bmm") == "other"
    assert "2.5x needs the linears at" in bench_model.describe_split(row)
