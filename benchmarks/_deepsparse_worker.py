"""Check and time one static-shape ONNX file with DeepSparse; run by benchmarks/_peers.py as a
subprocess of DeepSparse's own virtual environment (Python <= 3.11, numpy < 2: see scripts/setup_peers.sh).

    python _deepsparse_worker.py --onnx MODEL.onnx --inputs INPUTS.npz --tol 1e-4 --warmup 1 --repeats 5 --num-cores 2

INPUTS.npz holds the graph's inputs by name (input_ids, attention_mask) and `ref`, torch dense's
last_hidden_state. The first call's first output is checked against `ref` (check_output); only a
passing model is timed: `warmup` untimed calls, then `repeats` timed ones (time.perf_counter), median,
p20 and p80 in ms, as in _common.time_fn. Prints one JSON line: {status, ms, p20, p80, check, reason,
version}; status "ok", "FAIL" (output mismatch, not timed) or "skipped" (DeepSparse missing or failing:
reason).

Only numpy (and onnx, for the input names) is needed here; _peers.py imports check_output from this
file, so both peers are checked by the same rule.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def check_output(out, ref, tol: float) -> tuple[bool, str]:
    """bench_model's rule: max |out - ref| <= tol * max(max |ref|, 1); returns (passed, 'ok/FAIL max err E')."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return False, f"FAIL shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = float(np.abs(out - ref).max())
    passed = err <= tol * max(float(np.abs(ref).max()), 1.0)
    return passed, ("ok" if passed else "FAIL") + f" max err {err:.2e}"


def percentiles(times_ms: list[float]) -> dict:
    """{ms, p20, p80}: median, 20th and 80th percentile (linear interpolation, as torch.quantile)."""
    ms, p20, p80 = np.percentile(np.asarray(times_ms, dtype=np.float64), [50, 20, 80])
    return {"ms": float(ms), "p20": float(p20), "p80": float(p80)}


def run(args) -> dict:
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # set by _peers too; never phone home
    result = {"status": "skipped", "ms": None, "p20": None, "p80": None, "check": "", "reason": ""}
    try:
        import deepsparse
    except Exception as e:  # noqa: BLE001  (any import failure is a reason to skip)
        return {**result, "reason": f"cannot import deepsparse: {type(e).__name__}: {e}"}
    result["version"] = f"deepsparse {deepsparse.__version__}"
    data = np.load(args.inputs)
    ref = data["ref"]
    try:
        import onnx

        names = [i.name for i in onnx.load(args.onnx, load_external_data=False).graph.input]
        feeds = [np.ascontiguousarray(data[n]) for n in names]
        engine = deepsparse.compile_model(args.onnx, batch_size=int(feeds[0].shape[0]), num_cores=args.num_cores)
        out = engine.run(feeds)[0]
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {**result, "reason": f"deepsparse could not run the model: {type(e).__name__}: {first}"[:300]}
    passed, check = check_output(out, ref, args.tol)
    if not passed:
        return {**result, "status": "FAIL", "check": check}
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        engine.run(feeds)
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return {**result, "status": "ok", "check": check, **percentiles(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--tol", type=float, required=True)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-cores", type=int, required=True)
    print(json.dumps(run(p.parse_args())), flush=True)


if __name__ == "__main__":
    main()
