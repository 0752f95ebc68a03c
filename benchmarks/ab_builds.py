"""A/B of two builds of the C++ kernels (sparse_ops._C), for kernel changes on a noisy machine.

    python benchmarks/ab_builds.py --builds /path/to/old_checkout,/path/to/new_checkout \\
        --shapes 1536x384:gelu,384x1536 --tokens 128,1024 --rounds 3 [--format bsr32]

Each build is a checkout (or worktree) with its own compiled sparse_ops/_C*.so; a build is loaded by
putting its folder first on PYTHONPATH. Two builds cannot share one process (the same op names), so
each round runs one fresh process per build, in turn (A, B, A, B, ...: the machine's drift hits both),
and each process times every point as the minimum of its calls (the least disturbed one). A point is
csr_linear_cpu on a random 90%-sparse OUTxIN weight (uint16 columns, with bias, activation none or
gelu) and x of TOKENS rows, float32. Printed per point: each build's median over the rounds of its
minimum (µs), and old / new (> 1: the second build is faster). SPARSE_OPS_CPU_ISA and
SPARSE_OPS_CPU_BASELINE pass through, to compare one ISA path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from sparse_ops.sparse.formats import dense_to_bsr, dense_to_csr
points, sparsity, budget, fmt = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
block = int(fmt[3:]) if fmt.startswith("bsr") else 1
out = []
for out_f, in_f, act, tokens in points:
    g = torch.Generator().manual_seed(out_f * 7919 + in_f)
    keep = torch.rand(-(-out_f // block), -(-in_f // block), generator=g) >= sparsity
    keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    w = torch.randn(out_f, in_f, generator=g) * keep
    bias, x = torch.randn(out_f, generator=g), torch.randn(tokens, in_f, generator=g)
    if fmt == "csr":
        crow, col, val = dense_to_csr(w)
        col = col.to(torch.uint16)
        run = lambda: torch.ops.sparse_ops.csr_linear_cpu(x, crow, col, val, bias, out_f, act, False)
    else:
        crow, col, val = dense_to_bsr(w, (block, block))
        run = lambda: torch.ops.sparse_ops.bsr_linear_cpu(x, crow, col, val, bias, out_f, act, False)
    run()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 5 or (spent < budget and calls < 400):
        t = time.perf_counter(); run(); dt = time.perf_counter() - t
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    out.append(best * 1e6)
print(json.dumps(out))
"""


def parse_shapes(text: str) -> list[tuple[int, int, str]]:
    shapes = []
    for item in text.split(","):
        dims, _, act = item.partition(":")
        out_f, in_f = (int(v) for v in dims.lower().split("x"))
        shapes.append((out_f, in_f, act or "none"))
    return shapes


def time_build(build: str, points: list, sparsity: float, budget_s: float, fmt: str) -> list[float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([build, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(points), str(sparsity), str(budget_s), fmt],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"build {build} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builds", required=True, help="OLD,NEW: two checkout folders, each with its built _C")
    p.add_argument("--shapes", default="1536x384:gelu,384x1536,1152x384,768x768",
                   help="comma list of OUTxIN[:gelu]")
    p.add_argument("--tokens", default="128,1024", help="comma list of token counts")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=0.5, help="timed seconds per point per process")
    p.add_argument("--format", default="csr", help="csr, or bsrB for B×B blocks (bsr16, bsr32, ...)")
    args = p.parse_args(argv)
    if args.format != "csr" and not (args.format.startswith("bsr") and args.format[3:].isdigit()
                                     and int(args.format[3:]) > 0):
        raise SystemExit(f"--format must be csr or bsrB with B a positive block size, got {args.format!r}")
    builds = args.builds.split(",")
    if len(builds) != 2:
        raise SystemExit(f"--builds must name two folders, got {args.builds!r}")
    points = [(o, i, act, int(m)) for o, i, act in parse_shapes(args.shapes) for m in args.tokens.split(",")]
    mins = {b: [] for b in builds}
    for _ in range(args.rounds):
        for b in builds:
            mins[b].append(time_build(b, points, args.sparsity, args.budget_s, args.format))
    rows = []
    for k, (o, i, act, m) in enumerate(points):
        old, new = (statistics.median(r[k] for r in mins[b]) for b in builds)
        rows.append({"shape": f"{o}x{i}", "act": act, "tokens": m, "old_us": old, "new_us": new,
                     "old_over_new": old / new})
        print(f"{o}x{i} {act:4s} {m:5d} tokens: old {old:8.0f} us  new {new:8.0f} us  old/new {old / new:.2f}")
    return {"builds": builds, "format": args.format, "rounds": args.rounds, "rows": rows}


if __name__ == "__main__":
    main()
