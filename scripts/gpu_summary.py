"""The docs/design.md §5 GPU rows, each with its measured ratio, from the benchmark results in one folder
(scripts/gpu_check.sh prints this at the end of a GPU session).

    python scripts/gpu_summary.py benchmarks/results/<device>/<date>_<what>
"""

from __future__ import annotations

import glob
import json
import os
import sys


def rows(folder: str, pattern: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, pattern))):
        with open(path) as f:
            out += json.load(f).get("rows", [])
    return out


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return f"{value:.2f}x ({'met' if value >= target else 'NOT met'}, target >= {target:g}x)"


def sparse_linear_lines(rs: list[dict]) -> list[str]:
    lines = []
    at90 = [r for r in rs if r.get("sparsity") == 0.9 and r.get("speedup_vs_dense")]
    by_point: dict = {}
    for r in rs:
        if r.get("time_ms"):
            by_point.setdefault((r["shape"], r["tokens"], r["dtype"]), {})[r["format"]] = r
    for r in sorted(at90, key=lambda r: (r["format"], r["shape"], r["tokens"])):
        if r["format"] not in ("bsr32", "csr"):
            continue
        fmt, tokens = r["format"], r["tokens"]
        if fmt == "bsr32":
            target = 5.0 if tokens <= 16 else 3.0 if tokens <= 128 else 2.0
        else:
            if tokens > 16:
                continue
            target = 2.0
        peer = by_point.get((r["shape"], tokens, r["dtype"]), {}).get("torch_" + fmt)
        vs_peer = f"; vs torch.sparse {peer['time_ms'] / r['time_ms']:.2f}x" if peer else ""
        check = "" if r.get("check") == "ok" else f" CHECK {r.get('check')}"
        lines.append(f"{fmt} 90% {r['dtype']} {r['shape']} {tokens} tok vs dense: "
                     f"{verdict(r['speedup_vs_dense'], target)}{vs_peer}{check}")
    for r in sorted((r for r in rs if r.get("format") == "2:4" and r.get("speedup_vs_dense")),
                    key=lambda r: (r["shape"], r["tokens"])):
        if r["tokens"] >= 128:
            lines.append(f"2:4 {r['dtype']} {r['shape']} {r['tokens']} tok vs dense ({r['backend']}): "
                         f"{verdict(r['speedup_vs_dense'], 1.2)}")
    return lines


def main() -> int:
    folder = sys.argv[1]
    lines = sparse_linear_lines(rows(folder, "sparse_linear.json"))
    prune = rows(folder, "fused_prune_step*.json")
    compiled = {(r["method"], r["dtype"]): r["time_ms"] for r in prune
                if r.get("variant") == "compile" and r.get("time_ms")}
    for r in prune:
        if r.get("variant") == "sparse_ops" and r.get("speedup_vs_eager"):
            lines.append(f"fused prune step {r['method']} {r['dtype']} vs eager: {verdict(r['speedup_vs_eager'], 3.0)}")
            if (r["method"], r["dtype"]) in compiled:
                ratio = compiled[(r["method"], r["dtype"])] / r["time_ms"]
                lines.append(f"fused prune step {r['method']} {r['dtype']} vs torch.compile: {verdict(ratio, 1.0)}")
        if r.get("variant") == "fused_only" and r.get("pct_of_copy_bw"):
            lines.append(f"fused pass {r['method']} {r['dtype']}: {r['pct_of_copy_bw']:.0f}% of copy bandwidth "
                         f"({'met' if r['pct_of_copy_bw'] >= 80 else 'NOT met'}, target >= 80%)")
    for r in rows(folder, "kthvalue.json"):
        if r.get("variant") == "sparse_ops" and r.get("method") == "single" and r.get("speedup_vs_eager"):
            lines.append(f"kthvalue {r['set']} {r['dtype']} vs torch.kthvalue: {verdict(r['speedup_vs_eager'], 5.0)}")
    for r in rows(folder, "model.json"):
        if r.get("sparsity") == 0.9:
            lines.append(f"{r['model']} {r['granularity']} 90% {r['batch']}x{r['seq']} exported vs dense: "
                         f"{verdict(r.get('speedup'), 2.5)}")
    print("docs/design.md §5 GPU rows:" if lines else f"docs/design.md §5 GPU rows: no GPU results in {folder}")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
