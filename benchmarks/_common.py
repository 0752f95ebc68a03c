"""Helpers shared by the benchmark scripts: timing, environment, copy bandwidth, result files.

Timing: `warmup` untimed calls, then `repeats` timed calls; reported as median, 20th and 80th
percentile in milliseconds. On CUDA each call is bracketed by CUDA events after a synchronize; on
CPU by time.perf_counter. An optional `setup` runs before every call, outside the timed region
(e.g. to restore gradients that the step overwrote in place). Contenders compared in one row can be
timed interleaved instead (time_interleaved: one call of each in turn per round), so that a machine
whose speed drifts slows them all alike.

Every row carries the device name, library versions, git commit and date, and is written to
<out>/<name>.json (with the run's metadata and notes), <out>/<name>.csv and a PNG bar chart; <out> is
--out, by default benchmarks/results/<device-kind>/<date>_<script>/ (default_out; see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO_ROOT)  # an installed sparse_ops comes first; else the checkout's
from sparse_ops.ops import timing as sparse_timing  # noqa: E402  (the one timer)
GPU_NOTE = ("docs/design.md §5 targets are GPU targets: these CPU figures only exercise the CPU path "
            "(C++ kernel or PyTorch reference); run on a CUDA machine for the target figures.")
ROW_FIELDS = ("bench", "set", "numel", "dtype", "method", "variant", "backend", "time_ms", "p20_ms", "p80_ms",
              "compile_s", "bytes_moved", "gbps", "pct_of_copy_bw", "speedup_vs_eager", "check", "note",
              "device", "versions", "commit", "date")


# ---------------------------------------------------------------------------------------------
# weight sets (nn.Linear weight shapes, out × in)
# ---------------------------------------------------------------------------------------------
def _layers(n: int, hidden: int, ffn: int, mlp: int) -> list[tuple[int, int]]:
    """n transformer layers: q, k, v, o (hidden×hidden) and `mlp` FFN matrices (ffn×hidden, one hidden×ffn)."""
    return n * ([(hidden, hidden)] * 4 + [(ffn, hidden)] * (mlp - 1) + [(hidden, ffn)])


SETS = {  # name -> weight shapes
    "tiny": _layers(2, 64, 256, 2),           # 98K params, for --quick
    "bert-base": _layers(12, 768, 3072, 2),   # 84.9M params: BERT-base encoder linears
    "1b": _layers(5, 4096, 11008, 3),         # 1.01B params: 5 Llama-7B-style layers
}
GPU_ONLY_SETS = {"1b": "needs a GPU (about 35 GB of working memory in float32)"}


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default: 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing, the first (checked, compiling) call included "
                        "(default: 3 GPU, 1 CPU)")
    p.add_argument("--out", default=None,
                   help="result folder (default: benchmarks/results/<device-kind>/<date>_<script>/)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats: a smoke run")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the device; exit 0 with a note if CUDA is asked for but absent."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA was requested but torch.cuda.is_available() is False: this benchmark's GPU figures "
              "need a GPU. Nothing was measured.")
        raise SystemExit(0)
    gpu = args.device == "cuda"
    args.repeats = args.repeats or (2 if args.quick else 20 if gpu else 5)
    args.warmup = max(1, (3 if gpu else 1) if args.warmup is None else args.warmup)
    args.out = args.out or default_out(args.device)
    return args


def default_out(device: str, what: str | None = None) -> str:
    """benchmarks/results/<device-kind>/<today, UTC>_<what>/, `what` by default the running script's name
    (bench_model for benchmarks/bench_model.py): one run folder per run, see benchmarks/README.md."""
    what = what or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(REPO_ROOT, "benchmarks", "results", device_kind(device), f"{today}_{what}")


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def device_kind(device: str) -> str:
    """'cpu', or the GPU name as a folder-friendly slug (e.g. 'nvidia-h100-80gb-hbm3')."""
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def device_name(device: str) -> str:
    from sparse_ops.ops.machine import device_description

    return device_description(device)


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import sparse_ops

    out["sparse_ops"] = sparse_ops.__version__
    libs = sorted(glob.glob(os.path.join(os.path.dirname(sparse_ops.__file__), "_C*.so")))
    out["sparse_ops._C"] = file_digest(libs[0]) if libs and sparse_ops.extension_error() is None else "not loaded"
    return out


def file_digest(path: str) -> str:
    """First 12 hex digits of the file's SHA-256 (identifies the compiled extension that ran)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def git_commit() -> str:
    """HEAD's hash (+'-dirty' if the tree has changes), or 'unknown' outside a repo / before the first commit."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    return {"device": device_name(device), "versions": versions(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def cpu_notes(ops: tuple[str, ...]) -> list[str]:
    """On CPU: the GPU-targets note and which backend ran each sparse_ops op ('cpp' or the slow 'reference')."""
    from sparse_ops.ops import cpu_backend

    backends = {op: cpu_backend(op) for op in ops}
    slow = " -- sparse_ops._C is not built, so sparse_ops ran the slow PyTorch reference" \
        if "reference" in backends.values() else ""
    return [GPU_NOTE, f"CPU backends: {backends}{slow}"]


def busy_note() -> list[str]:
    """A note when the 5-minute load average exceeds the core count (other work competed for the CPU);
    a benchmark's own threads alone keep it at or below the core count."""
    load, cores = os.getloadavg()[1], os.cpu_count() or 1
    if load <= 1.25 * cores:
        return []
    return [f"machine busy: 5-minute load average {load:.1f} on {cores} cores at the end of the run; "
            "other processes competed for the CPU, so timings are noisy (see p20/p80)"]


def run_meta(env: dict, args: argparse.Namespace, **extra) -> dict:
    """The JSON's metadata: environment, run settings and the load average (a noise indicator)."""
    return {**env, "repeats": args.repeats, "warmup": args.warmup, "argv": sys.argv[1:],
            "loadavg_at_end": os.getloadavg(), **extra}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def synchronize(device: str) -> None:
    sparse_timing.synchronize(device)


def call_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of one fn() call in ms: sparse_ops.ops.timing.call_ms (CUDA: events after a synchronize;
    CPU: time.perf_counter)."""
    return sparse_timing.call_ms(fn, device)


def summarize(times_ms: list[float]) -> Timing:
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(*q.tolist())


def time_fn(fn: Callable[[], object], device: str, *, warmup: int, repeats: int,
            setup: Callable[[], object] | None = None) -> Timing:
    """Median / p20 / p80 wall time of fn() in ms (see the module docstring): sparse_ops.ops.timing.sample_ms."""
    return summarize(sparse_timing.sample_ms(fn, device, warmup=warmup, repeats=repeats, setup=setup))


def time_interleaved(timers: dict[str, Callable[[], float]], *, warmup: int, repeats: int,
                     gap_s: float = 0.0, burst: int = 1, warm_calls: int = 0) -> dict[str, Timing]:
    """{name: Timing} of contenders timed in turn (`warmup` untimed rounds, then timed rounds until each has
    `repeats` timed calls): on a machine whose speed drifts, every contender sees the same drift, so their
    ratios hold where timings taken one contender after another do not. A timer makes one call and returns
    its ms (call_ms, or a peer process that times itself).
    In each round every contender in turn: waits gap_s (so that the thread pool of the contender before,
    ONNX Runtime's, DeepSparse's and OpenMP's, which spin on after a call, has gone idle and does not steal
    cores from the next), makes `warm_calls` untimed calls (its own threads, woken from that idle, and its
    caches are warm again: DeepSparse takes several times longer on its first call after an idle pause),
    then `burst` timed calls back to back."""
    times = {name: [] for name in timers}
    rounds = warmup + -(-repeats // burst)
    for i in range(rounds):
        for name, timer in timers.items():
            if gap_s:
                time.sleep(gap_s)
            for _ in range(warm_calls):
                timer()
            for _ in range(burst):
                elapsed = timer()
                if i >= warmup and len(times[name]) < repeats:
                    times[name].append(elapsed)
    return {name: summarize(t) for name, t in times.items()}


def timed_first_call(fn: Callable[[], object], device: str) -> float:
    """Seconds taken by one call (used for the first call of a torch.compile'd function: compile + run)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def copy_bandwidth_gbps(args: argparse.Namespace, *, warmup: int = 2, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth: dst.copy_(src), counting 2·nbytes moved; nbytes = 1 GiB
    on CUDA, 256 MiB on CPU (beyond the caches), 16 MiB with --quick."""
    nbytes = (16 << 20) if args.quick else (1 << 30) if args.device == "cuda" else (256 << 20)
    device = args.device
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    return 2 * src.nbytes / (t.median_ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# rows and result files
# ---------------------------------------------------------------------------------------------
def make_row(env: dict, *, bench: str, set_name: str, numel: int, dtype: torch.dtype, method: str, variant: str,
             backend: str, timing: Timing | None, bytes_moved: int, copy_gbps: float, compile_s=None,
             check: str = "", note: str = "") -> dict:
    """One result row; gbps = bytes_moved / median time; pct_of_copy_bw relative to copy_gbps."""
    gbps = bytes_moved / (timing.median_ms * 1e-3) / 1e9 if timing else None
    return {"bench": bench, "set": set_name, "numel": numel, "dtype": str(dtype).replace("torch.", ""),
            "method": method, "variant": variant, "backend": backend,
            "time_ms": timing.median_ms if timing else None, "p20_ms": timing.p20_ms if timing else None,
            "p80_ms": timing.p80_ms if timing else None, "compile_s": compile_s, "bytes_moved": bytes_moved,
            "gbps": gbps, "pct_of_copy_bw": 100 * gbps / copy_gbps if gbps else None, "speedup_vs_eager": None,
            "check": check, "note": note, **env}


def add_speedups(rows: list[dict], eager_variant: str) -> None:
    """speedup_vs_eager = eager median / this median, within each (set, dtype, method) group."""
    base = {(r["set"], r["dtype"], r["method"]): r["time_ms"] for r in rows if r["variant"] == eager_variant}
    for r in rows:
        eager = base.get((r["set"], r["dtype"], r["method"]))
        if eager and r["time_ms"]:
            r["speedup_vs_eager"] = eager / r["time_ms"]


def write_rows(rows: list[dict], out_dir: str, name: str, *, meta: dict, notes: list[str], fields) -> str:
    """Write <out_dir>/<name>.json (meta, notes, rows) and <name>.csv (rows, dict cells as JSON); return
    the common path prefix <out_dir>/<name>."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "notes": notes, "rows": rows}, f, indent=1, default=str)
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()})
    return base


def write_results(rows: list[dict], out_dir: str, name: str, *, meta: dict, notes: list[str], title: str) -> list[str]:
    """Write <name>.json (meta, notes, rows), <name>.csv (rows) and <name>.png; return the paths."""
    base = write_rows(rows, out_dir, name, meta=meta, notes=notes, fields=ROW_FIELDS)
    plot_times(rows, base + ".png", title=title)
    return [base + ext for ext in (".json", ".csv", ".png")]


def plot_times(rows: list[dict], path: str, *, title: str) -> None:
    """Grouped bars: one group per (set, dtype, method), one bar per variant; median time with a
    p20–p80 error bar, log scale, each bar annotated with its speedup vs eager."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["time_ms"]]
    groups = list(dict.fromkeys((r["set"], r["dtype"], r["method"]) for r in timed))
    variants = list(dict.fromkeys(r["variant"] for r in timed))
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(groups) * max(len(variants), 1) / 2), 4.5))
    by_key = {(r["set"], r["dtype"], r["method"], r["variant"]): r for r in timed}
    for vi, variant in enumerate(variants):
        for gi, group in enumerate(groups):
            r = by_key.get((*group, variant))
            if r is None:
                continue
            x = gi + (vi - (len(variants) - 1) / 2) * width
            err = [[r["time_ms"] - r["p20_ms"]], [r["p80_ms"] - r["time_ms"]]]
            ax.bar(x, r["time_ms"], width, yerr=err, color=f"C{vi}", label=variant if gi == 0 else None)
            if r["speedup_vs_eager"]:
                ax.annotate(f"{r['speedup_vs_eager']:.2f}×", (x, r["time_ms"]), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(groups)), ["\n".join(g) for g in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time per call, ms (median, p20–p80)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    cols = [("set", 10), ("dtype", 8), ("method", 9), ("variant", 22), ("backend", 10), ("time_ms", 10),
            ("p20_ms", 10), ("p80_ms", 10), ("gbps", 8), ("pct_of_copy_bw", 8), ("speedup_vs_eager", 8),
            ("compile_s", 9), ("check", 24)]
    print(" ".join(name[:w].ljust(w) for name, w in cols))
    for r in rows:
        cells = []
        for name, w in cols:
            v = r.get(name)
            text = "-" if v is None or v == "" else f"{v:.4g}" if isinstance(v, float) else str(v)
            cells.append(text[:w].ljust(w))
        print(" ".join(cells) + (f"  [{r['note']}]" if r.get("note") else ""))


def finish(rows: list[dict], args: argparse.Namespace, env: dict, copy_gbps: float, notes: list[str], name: str,
           title: str, **meta_extra) -> None:
    """Speed-ups vs eager, the busy note, JSON/CSV/PNG under args.out, and the printed table."""
    add_speedups(rows, "eager")
    notes = notes + busy_note()
    name += "_quick" if args.quick else ""
    meta = run_meta(env, args, copy_gbps=copy_gbps, **meta_extra)
    paths = write_results(rows, args.out, name, meta=meta, notes=notes, title=title)
    print()
    print_table(rows)
    print(f"\ncopy bandwidth: {copy_gbps:.1f} GB/s")
    for n in notes:
        print("NOTE:", n)
    print("wrote", *paths)
