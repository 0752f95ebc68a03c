"""What a CPU user would run instead of sparse_ops, on the same pruned checkpoint: ONNX Runtime (dense)
and DeepSparse (sparsity-aware), for `bench_model.py --peers`.

Per pruned model and batch × seq, the pruned dense torch model is exported once with the TorchScript
exporter (`torch.onnx.export(..., dynamo=False)`, opset 17) to an ONNX file with static input shapes
(DeepSparse needs them; ONNX Runtime gets the same file) whose outputs are those of the torch model
(last_hidden_state, pooler_output), so every runtime does the same work. The zeros of the pruned
weights are in the file as plain zeros: DeepSparse finds and exploits them, ONNX Runtime does not.

- ONNX Runtime: CPUExecutionProvider, GraphOptimizationLevel.ORT_ENABLE_ALL, intra-op threads =
  torch.get_num_threads(), in this process.
- DeepSparse 1.8.0 (needs Python <= 3.11 and numpy < 2): in its own virtual environment
  (SPARSE_OPS_DEEPSPARSE_VENV, default ~/.cache/sparse_ops/deepsparse-venv, made by
  scripts/setup_peers.sh), compiled once by benchmarks/_deepsparse_worker.py, a subprocess (with
  NM_DISABLE_ANALYTICS=1 and num_cores = torch.get_num_threads()) that then times one call per request.

open_peers opens both: each peer's last_hidden_state is checked against torch dense's with bench_model's
rule, and only a passing peer gets a timer (one call, its ms), which bench_model runs in turn with torch
dense and the exported model (_common.time_interleaved: same warmup and repeats, same drift). Each peer's
result is {status, ms, p20, p80, check, reason, version}: status "ok" (timed), "FAIL" (output mismatch,
not timed) or "skipped" (cannot be installed, imported or run: reason says why). A peer never fails the
run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
import warnings
from typing import Callable

import _common as C
import numpy as np
import torch
from _deepsparse_worker import check_output

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_deepsparse_worker.py")
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "sparse_ops", "deepsparse-venv")
DEEPSPARSE_TIMEOUT_S = 1800  # compiling BERT-base takes a while on 2 cores
OPSET = 17
PEERS = ("ort", "deepsparse")
LABELS = {"ort": "ONNX Runtime", "deepsparse": "DeepSparse"}
# row columns; vs_<peer> = peer ms / sparse_ops exported ms (above 1: sparse_ops is faster)
# <peer>_status: "ok", "FAIL" or "skipped", with the peer's version and the reason it was not timed
FIELDS = tuple(f"{p}_{k}" for p in PEERS for k in ("ms", "p20_ms", "p80_ms", "check", "status")) + (
    "vs_ort", "vs_deepsparse")
SETUP_HINT = "run scripts/setup_peers.sh"


def result(status: str = "skipped", *, reason: str = "", check: str = "", version: str = "",
           ms=None, p20=None, p80=None) -> dict:
    return {"status": status, "ms": ms, "p20": p20, "p80": p80, "check": check, "reason": reason,
            "version": version}


def _error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


class _Outputs(torch.nn.Module):
    """model(input_ids, attention_mask) as the tuple of its outputs (what the ONNX graph returns)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).to_tuple()


def export_onnx(model, inputs: dict, path: str) -> None:
    """Export `model` (in eval mode) for exactly the shapes of `inputs` (no dynamic axes)."""
    names = ["input_ids", "attention_mask"]
    with torch.no_grad():
        n_out = len(_Outputs(model).eval()(*(inputs[n] for n in names)))
    outputs = ["last_hidden_state", "pooler_output"][:n_out] + [f"output_{i}" for i in range(2, n_out)]
    was_training = model.training
    # the wrapper must be in eval mode: export restores the wrapper's mode on every submodule afterwards
    wrapper = _Outputs(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(wrapper, tuple(inputs[n] for n in names), path, input_names=names,
                          output_names=outputs, opset_version=OPSET, dynamo=False)
    model.train(was_training)


def _numpy_inputs(inputs: dict) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in inputs.items()}


@dataclasses.dataclass
class Peer:
    """A peer runtime opened on the model: `info` is its result() without times; `timer` (only when the
    output passed its check) makes one call and returns its ms; close() frees the runtime."""
    info: dict
    timer: Callable[[], float] | None = None
    close: Callable[[], None] = lambda: None


def open_ort(onnx_path: str, inputs: dict, ref: torch.Tensor, tol: float, *, threads: int) -> Peer:
    """ONNX Runtime on `onnx_path`, its output checked."""
    try:
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001  (any import failure is a reason to skip)
        return Peer(result(reason=f"cannot import onnxruntime ({_error(e)}): pip install -e '.[peers]' or "
                                  f"{SETUP_HINT}"))
    version = f"onnxruntime {ort.__version__}"
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        arrays = _numpy_inputs(inputs)
        feeds = {i.name: arrays[i.name] for i in session.get_inputs()}
        out = session.run(None, feeds)[0]
    except Exception as e:  # noqa: BLE001
        return Peer(result(reason=f"onnxruntime could not run the model: {_error(e)}", version=version))
    passed, check = check_output(out, ref.float().cpu().numpy(), tol)
    if not passed:
        return Peer(result("FAIL", check=check, version=version))
    return Peer(result("ok", check=check, version=version), lambda: C.call_ms(lambda: session.run(None, feeds), "cpu"))


def deepsparse_python(venv: str | None = None) -> str:
    venv = venv or os.environ.get("SPARSE_OPS_DEEPSPARSE_VENV") or DEFAULT_VENV
    return os.path.join(venv, "bin", "python")


def _line_reader(stream) -> queue.Queue:
    """A queue of the stream's lines, filled by a daemon thread ('' at the end of the stream)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_json(lines: queue.Queue, timeout_s: float) -> dict:
    """The worker's next JSON line (other output it prints is skipped); raises TimeoutError or EOFError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"the DeepSparse worker gave no answer within {timeout_s:.0f} s") from None
        if not line:
            raise EOFError("the DeepSparse worker exited")
        if line.startswith("{"):
            return json.loads(line)


def open_deepsparse(onnx_path: str, inputs: dict, ref: torch.Tensor, tol: float, *, threads: int,
                    venv: str | None = None, timeout_s: float = DEEPSPARSE_TIMEOUT_S) -> Peer:
    """DeepSparse on `onnx_path`, compiled and checked in its own environment by a _deepsparse_worker.py
    that stays up to time one call per request."""
    python = deepsparse_python(venv)
    if not os.path.exists(python):
        return Peer(result(reason=f"no DeepSparse environment at {os.path.dirname(os.path.dirname(python))}: "
                                  f"{SETUP_HINT}"))
    with tempfile.TemporaryDirectory(prefix="sparse_ops_deepsparse_") as tmp:
        npz = os.path.join(tmp, "inputs.npz")
        np.savez(npz, ref=ref.float().cpu().numpy(), **_numpy_inputs(inputs))
        cmd = [python, WORKER, "--onnx", onnx_path, "--inputs", npz, "--tol", repr(tol), "--num-cores", str(threads)]
        log = tempfile.TemporaryFile(mode="w+")  # DeepSparse's own logging; its last line explains a failure
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    env={**os.environ, "NM_DISABLE_ANALYTICS": "1"}, cwd=HERE)
        except OSError as e:
            log.close()
            return Peer(result(reason=f"cannot start {python}: {_error(e)}"))

        def close() -> None:
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()

        lines = _line_reader(proc.stdout)
        try:
            status = _read_json(lines, timeout_s)
        except (TimeoutError, EOFError, json.JSONDecodeError) as e:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            tail = (log.read().strip().splitlines() or [""])[-1][:300]
            close()
            return Peer(result(reason=f"{e}: {tail}" if tail else str(e)))
    info = {**result(), **status}
    if info["status"] != "ok":
        close()
        return Peer(info)

    def timer() -> float:
        proc.stdin.write("run\n")
        proc.stdin.flush()
        return float(_read_json(lines, timeout_s)["ms"])

    return Peer(info, timer, close)


def measure(peer: Peer, *, warmup: int, repeats: int) -> dict:
    """The peer's result() with its times (alone, not interleaved), and the peer closed."""
    try:
        if peer.timer is None:
            return peer.info
        timings = C.time_interleaved({"peer": peer.timer}, warmup=warmup, repeats=repeats)
        return with_times({"peer": peer}, timings)["peer"]
    finally:
        peer.close()


def open_peers(model, inputs: dict, ref: torch.Tensor, tol: float, device: str) -> dict[str, Peer]:
    """Both peers opened on `model` (the pruned dense torch model) at the shapes of `inputs`: {name: Peer}."""
    threads = torch.get_num_threads()
    if device != "cpu" or ref.dtype != torch.float32 or next(model.parameters()).dtype != torch.float32:
        skipped = result(reason="the peers are CPU float32 runtimes (run with --device cpu --dtype float32)")
        return {p: Peer(skipped) for p in PEERS}
    with tempfile.TemporaryDirectory(prefix="sparse_ops_peers_") as tmp:  # both have read the file when open
        path = os.path.join(tmp, "model.onnx")
        try:
            export_onnx(model, inputs, path)
        except Exception as e:  # noqa: BLE001
            failed = result(reason=f"torch.onnx.export(dynamo=False) failed: {_error(e)}")
            return {p: Peer(failed) for p in PEERS}
        return {"ort": open_ort(path, inputs, ref, tol, threads=threads),
                "deepsparse": open_deepsparse(path, inputs, ref, tol, threads=threads)}


def with_times(peers: dict[str, Peer], timings: dict) -> dict[str, dict]:
    """{name: result()} of opened peers, with the times of those timed (timings: {name: _common.Timing})."""
    out = {}
    for name, peer in peers.items():
        t = timings.get(name)
        out[name] = peer.info if t is None else {**peer.info, "ms": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms}
    return out


def notes() -> list[str]:
    note = (f"peers: ONNX Runtime (dense, ORT_ENABLE_ALL) and DeepSparse (sparse) on the pruned dense model exported "
            f"to ONNX per batch x seq (static shapes, torch.onnx.export dynamo=False, opset {OPSET}), "
            f"torch.get_num_threads() = {torch.get_num_threads()} threads each, checked against torch dense before timing; "
            "vs_<peer> = peer ms / exported ms (above 1: sparse_ops is faster)")
    return [note]


def row_fields(peers: dict, sparse_ms: float) -> dict:
    row = {}
    for name, r in peers.items():
        status = r["status"] + (f" ({r['version']})" if r["version"] else "")
        status += f": {r['reason']}" if r["reason"] else ""
        row.update({f"{name}_ms": r["ms"], f"{name}_p20_ms": r["p20"], f"{name}_p80_ms": r["p80"],
                    f"{name}_check": r["check"], f"{name}_status": status,
                    f"vs_{name}": r["ms"] / sparse_ms if r["ms"] and sparse_ms else None})
    return row


def describe(row: dict) -> str:
    """One printed line per peer: its time and vs_<peer> (its time / the exported model's), or why it was not
    timed."""
    lines = []
    for name in PEERS:
        if row[f"{name}_ms"]:
            lines.append(f"    {LABELS[name]:12} {row[f'{name}_ms']:9.2f} ms  vs_{name} {row[f'vs_{name}']:.2f}x  "
                         f"[{row[f'{name}_check']}]  {row[f'{name}_status']}")
        else:
            check = f" [{row[f'{name}_check']}]" if row[f"{name}_check"] else ""
            lines.append(f"    {LABELS[name]:12} not timed{check}: {row[f'{name}_status']}")
    return "\n".join(lines)


def plot_latencies(ax, rows: list[dict]) -> None:
    """Grouped bars on `ax`: torch dense, ONNX Runtime, DeepSparse and sparse_ops exported per row
    (model, granularity, sparsity, batch × seq); median with p20–p80 error bars, log scale."""
    series = [("torch dense", "dense"), (LABELS["ort"], "ort"), (LABELS["deepsparse"], "deepsparse"),
              ("sparse_ops exported", "sparse")]
    width = 0.8 / len(series)
    for si, (label, key) in enumerate(series):
        for gi, r in enumerate(rows):
            ms = r.get(f"{key}_ms")
            if not ms:
                continue
            err = [[ms - r[f"{key}_p20_ms"]], [r[f"{key}_p80_ms"] - ms]]
            ax.bar(gi + (si - (len(series) - 1) / 2) * width, ms, width, yerr=err, color=f"C{si}",
                   label=label if label not in ax.get_legend_handles_labels()[1] else None)
    ticks = [f"{r['model']}\n{r['granularity']} s={r['sparsity']:.2f}\n{r['batch']}×{r['seq']}" for r in rows]
    ax.set_xticks(range(len(rows)), ticks, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("time per call, ms (median, p20–p80)")
    ax.set_title("peers on the same pruned checkpoint", fontsize=9)
    ax.legend(fontsize=7)


