"""Check one static-shape ONNX file with DeepSparse, then time it on request; run by benchmarks/_peers.py
as a subprocess of DeepSparse's own virtual environment (Python <= 3.11, numpy < 2: see
scripts/setup_peers.sh).

    python _deepsparse_worker.py --onnx MODEL.onnx --inputs INPUTS.npz --tol 1e-4 --num-cores 2

INPUTS.npz holds the graph's inputs by name (input_ids, attention_mask) and `ref`, torch dense's
last_hidden_state. The worker compiles the model, checks the first call's first output against `ref`
(check_output) and prints one JSON line: {status, check, reason, version}; status "ok" (ready),
"FAIL" (output mismatch) or "skipped" (DeepSparse missing or failing: reason). Only when ready does it
serve: for each line "run" on stdin it makes one call and prints {"ms": its wall time}
(time.perf_counter); it exits at end of input or on "quit". So the parent can time DeepSparse in turn
with its other contenders (_common.time_interleaved) while the compiled engine stays loaded.

Only numpy (and onnx, for the input names) is needed here; _peers.py imports check_output from this
file, so both peers are checked by the same rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def prepare(args) -> tuple[dict, object, list]:
    """(status line, engine, feeds): the engine and feeds only when the status is "ok"."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # set by _peers too; never phone home
    status = {"status": "skipped", "check": "", "reason": "", "version": ""}
    try:
        import deepsparse
    except Exception as e:  # noqa: BLE001  (any import failure is a reason to skip)
        return {**status, "reason": f"cannot import deepsparse: {type(e).__name__}: {e}"}, None, []
    status["version"] = f"deepsparse {deepsparse.__version__}"
    data = np.load(args.inputs)
    try:
        import onnx

        names = [i.name for i in onnx.load(args.onnx, load_external_data=False).graph.input]
        feeds = [np.ascontiguousarray(data[n]) for n in names]
        engine = deepsparse.compile_model(args.onnx, batch_size=int(feeds[0].shape[0]), num_cores=args.num_cores)
        out = engine.run(feeds)[0]
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {**status, "reason": f"deepsparse could not run the model: {type(e).__name__}: {first}"[:300]}, None, []
    passed, check = check_output(out, data["ref"], args.tol)
    return {**status, "status": "ok" if passed else "FAIL", "check": check}, engine, feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--tol", type=float, required=True)
    p.add_argument("--num-cores", type=int, required=True)
    status, engine, feeds = prepare(p.parse_args())
    print(json.dumps(status), flush=True)
    if status["status"] != "ok":
        return
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        engine.run(feeds)
        print(json.dumps({"ms": (time.perf_counter() - t0) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
