"""Sparse linear layers vs dense: latency against sparsity, per shape, token count, dtype and format.

Question: at which sparsity, shape and token count do torch.ops.sparse_ops.csr_linear / bsr_linear
beat dense F.linear (cuBLAS on GPU, MKL/oneDNN on CPU), and torch.sparse (F.linear with a sparse CSR
or BSR weight)?

Per point (out × in shape, tokens M, dtype, sparsity s) the weight is random normal and pruned
  * element-wise at random (fraction s of zeros) for the CSR formats, and
  * block-wise at random (fraction s of its b×b blocks zero) for the BSR formats,
and every format computes y = x @ Wᵀ + bias on the same x:
  dense        F.linear with the dense (masked) weight
  csr          SparseLinear(format="csr"), the layer export produces: torch.ops.sparse_ops.csr_linear
               (C++ on CPU, called directly on indices validated once, uint16 columns when
               in_features <= 65,536; CUDA kernel on GPU)
  bsr<b>       SparseLinear(format="bsr") with b×b blocks (C++ on CPU, Triton on GPU)
  torch_csr    F.linear(x, W.to_sparse_csr()) + bias
  torch_bsr<b> F.linear(x, W.to_sparse_bsr((b, b))) + bias
  2:4          SparseLinear(format="2:4") on a 2:4 weight (the 2 largest |w| of every 4 kept, 50%
               sparse whatever s): torch's semi-structured sparsity on CUDA fp16/bf16, CSR elsewhere
Timing: medians (p20/p80) over --repeats calls after warm-up, all formats of a point in one run.
speedup = dense median / format median. check: max error against a float64 reference must be at most
2× the error of dense F.linear in the same dtype (+ a floor of 1e-6·‖y‖∞ scaled per dtype), the
flash-attention rule; a format that fails it is marked and must not be trusted.
Cost model, per row: flops = 2·M·(stored weights) (dense: 2·M·N·K; BSR counts its blocks' zeros);
bytes = what the format must read at least once (stored values + index bytes as the kernel reads them
+ x) and write (y); intensity = flops / bytes; gflops and gbps = each over the median time. At 1
token a layer is bound by bytes: 90% CSR reads (4 + 2) bytes per stored fp32 weight with uint16
columns, 0.6 byte per dense weight against dense's 4 (6.7× less); at 128 tokens by flops.

Output: <out>/sparse_linear.{json,csv} and one PNG per dtype of speedup vs sparsity, one subplot per
shape, one line per format and token count (<out>: --out, by default
benchmarks/results/<device>/<date>_bench_sparse_linear/).
"""

from __future__ import annotations

import math
import traceback

import _common as C
import torch
import torch.nn.functional as F

import sparse_ops  # noqa: F401  (registers torch.ops.sparse_ops)
from sparse_ops import SparseLinear
from sparse_ops.ops import cpu_backend

SHAPES = {  # name -> (out_features, in_features)
    "bert-qkvo": (768, 768), "bert-ffn-up": (3072, 768), "bert-ffn-down": (768, 3072),
    "llm-qkvo": (4096, 4096), "llm-ffn-up": (11008, 4096), "llm-ffn-down": (4096, 11008),
}
TOKENS = (1, 16, 128, 2048)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
FIELDS = ("bench", "shape", "out_features", "in_features", "tokens", "dtype", "sparsity", "format", "backend",
          "time_ms", "p20_ms", "p80_ms", "speedup_vs_dense", "flops", "bytes", "intensity", "gflops", "gbps",
          "index_bytes", "check", "note", "device", "versions", "commit", "date")
# Defaults per device: the CPU grid leaves out what takes minutes per point there (LLM shapes at 2048
# tokens, 16-bit dtypes, which torch.sparse cannot run on CPU).
DEFAULTS = {
    "cuda": {"shapes": ",".join(SHAPES), "tokens": "1,16,128,2048", "dtypes": "float16,bfloat16,float32",
             "sparsities": ",".join(map(str, SPARSITIES)),
             "formats": "dense,csr,bsr32,bsr64,torch_csr,torch_bsr32,2:4"},
    "cpu": {"shapes": ",".join(SHAPES), "tokens": "1,16,128,2048", "dtypes": "float32",
            "sparsities": "0.5,0.8,0.9,0.95,0.99", "formats": "dense,csr,bsr32,torch_csr,torch_bsr32"},
}
CPU_SKIP_TOKENS_ABOVE = {"llm": 128}  # CPU: LLM shapes only up to 128 tokens (dense 2048 × 11008 × 4096 ≈ 2 s)
CPU_TORCH_BSR_MAX_TOKENS = {"bert": 128, "llm": 16}  # CPU: torch.sparse BSR takes seconds per call beyond these


def masked_weight(out_f: int, in_f: int, sparsity: float, block: int | None, dtype, device, gen) -> torch.Tensor:
    """Random normal weight with round(sparsity · count) elements (or b×b blocks) set to zero at random."""
    w = torch.randn(out_f, in_f, generator=gen, device="cpu", dtype=torch.float32)
    if block is None:
        drop = torch.randperm(w.numel(), generator=gen)[: round(sparsity * w.numel())]
        w.view(-1)[drop] = 0
    else:
        nbr, nbc = -(-out_f // block), -(-in_f // block)
        keep = torch.ones(nbr * nbc, dtype=torch.bool)
        keep[torch.randperm(nbr * nbc, generator=gen)[: round(sparsity * nbr * nbc)]] = False
        grid = keep.view(nbr, nbc).repeat_interleave(block, 0).repeat_interleave(block, 1)
        w *= grid[:out_f, :in_f]
    return w.to(device=device, dtype=dtype)


def two_four_weight(w: torch.Tensor) -> torch.Tensor:
    """w with the 2 smallest |w| of every 4 consecutive inputs set to zero (50% sparse, 2:4)."""
    groups = w.view(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    return (groups * keep).view_as(w)


def block_of(fmt: str) -> int | None:
    digits = "".join(ch for ch in fmt if ch.isdigit())
    return int(digits) if digits else None


def layer_bytes(layer: SparseLinear) -> tuple[int, int]:
    """(bytes of the weight as the forward reads it, bytes per column index) of a csr/bsr/2:4 layer."""
    col = layer._fast[2] if layer._fast is not None else layer.col_indices
    index_bytes = col.element_size()
    return (layer.values.numel() * layer.values.element_size() + 4 * layer.crow_indices.numel()
            + index_bytes * col.numel()), index_bytes


def make_format(fmt: str, w: torch.Tensor, bias: torch.Tensor):
    """(callable x -> y, bytes of the weight as that format reads it, stored weights, bytes per index)."""
    if fmt == "dense":
        return (lambda x: F.linear(x, w, bias)), w.numel() * w.element_size(), w.numel(), 0
    if fmt == "csr" or fmt.startswith("bsr"):
        layer = SparseLinear._from_weight(w, bias, "csr" if fmt == "csr" else "bsr", (block_of(fmt) or 32,) * 2)
        weight_bytes, index_bytes = layer_bytes(layer)
        return layer, weight_bytes, layer.nnz(), index_bytes
    if fmt == "2:4":  # SparseLinear: torch's semi-structured sparsity on CUDA fp16/bf16, else its CSR path
        layer = SparseLinear._from_weight(w, bias, "2:4", (32, 32))
        if layer._semi is not None:
            return layer, w.numel() // 2 * w.element_size() + w.numel() // 8, w.numel() // 2, 0
        weight_bytes, index_bytes = layer_bytes(layer)
        return layer, weight_bytes, layer.nnz(), index_bytes
    if fmt == "torch_csr":
        ws = w.to_sparse_csr()
        nnz = ws.values().numel()
        return (lambda x: F.linear(x, ws) + bias), nnz * w.element_size() + 8 * (nnz + w.shape[0] + 1), nnz, 8
    if fmt.startswith("torch_bsr"):
        b = block_of(fmt)
        ws = w.to_sparse_bsr((b, b)) if w.shape[0] % b == 0 and w.shape[1] % b == 0 else None
        if ws is None:
            raise ValueError(f"torch.sparse BSR needs a shape divisible by {b}, got {tuple(w.shape)}")
        nnz = ws.values().numel()
        return (lambda x: F.linear(x, ws) + bias), nnz * w.element_size(), nnz, 8
    raise ValueError(f"unknown format {fmt!r}")


def max_error(y: torch.Tensor, ref64: torch.Tensor) -> float:
    return (y.double() - ref64).abs().max().item()


def backend_of(fmt: str, device: str) -> str:
    if fmt == "dense":
        return "cublas" if device == "cuda" else "mkl/onednn"
    if fmt.startswith("torch_"):
        return "torch.sparse"
    if fmt == "2:4":
        return "semi-structured" if device == "cuda" else cpu_backend("csr_linear")
    if device == "cuda":
        return "triton" if fmt.startswith("bsr") else "cuda"
    return cpu_backend(f"{'bsr' if fmt.startswith('bsr') else 'csr'}_linear")


def bench_point(args, env, shape_name, out_f, in_f, tokens, dtype, sparsity, formats, gen) -> list[dict]:
    device = args.device
    x = torch.randn(tokens, in_f, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(out_f, generator=gen).to(device=device, dtype=dtype)
    weights = {}  # pattern (None = element, b = blocks) -> weight
    rows, dense_ms = [], None
    for fmt in formats:
        if (device == "cpu" and fmt.startswith("torch_bsr") and not args.formats
                and tokens > CPU_TORCH_BSR_MAX_TOKENS[shape_name.split("-")[0]]):
            continue
        pattern = fmt if fmt == "2:4" else None if fmt in ("dense", "csr", "torch_csr") else block_of(fmt)
        if pattern not in weights:
            weights[pattern] = (two_four_weight(masked_weight(out_f, in_f, 0.0, None, dtype, device, gen))
                                if pattern == "2:4" else masked_weight(out_f, in_f, sparsity, pattern, dtype, device, gen))
        w = weights[pattern]
        timing, check, note, nbytes, stored, index_bytes = None, "", "", 0, 0, 0
        try:
            fn, nbytes, stored, index_bytes = make_format(fmt, w, bias)
            y = fn(x)
            ref64 = F.linear(x.double(), w.double(), bias.double())
            err, dense_err = max_error(y, ref64), max_error(F.linear(x, w, bias), ref64)
            floor = ref64.abs().max().item() * (1e-6 if dtype == torch.float32 else 1e-3)
            check = "ok" if err <= 2 * dense_err + floor else f"FAIL err {err:.3g} > 2×{dense_err:.3g}"
            timing = C.time_fn(lambda fn=fn: fn(x), device, warmup=args.warmup, repeats=args.repeats)
        except Exception as exc:  # noqa: BLE001 - recorded (e.g. torch.sparse lacks a dtype on CPU); the others still run
            if args.verbose:
                traceback.print_exc()
            note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        moved = nbytes + (x.numel() + tokens * out_f) * x.element_size()
        flops = 2 * tokens * stored
        seconds = timing.median_ms * 1e-3 if timing else None
        if fmt == "dense" and timing:
            dense_ms = timing.median_ms
        rows.append({"bench": "sparse_linear", "shape": shape_name, "out_features": out_f, "in_features": in_f,
                     "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
                     "sparsity": 0.5 if fmt == "2:4" else sparsity,
                     "format": fmt, "backend": backend_of(fmt, device),
                     "time_ms": timing.median_ms if timing else None, "p20_ms": timing.p20_ms if timing else None,
                     "p80_ms": timing.p80_ms if timing else None,
                     "speedup_vs_dense": None, "flops": flops, "bytes": moved,
                     "intensity": flops / moved if moved else None,
                     "gflops": flops / seconds / 1e9 if seconds else None,
                     "gbps": moved / seconds / 1e9 if seconds else None, "index_bytes": index_bytes,
                     "check": check, "note": note, **env})
    for r in rows:
        if dense_ms and r["time_ms"]:
            r["speedup_vs_dense"] = dense_ms / r["time_ms"]
    return rows


def plot(rows: list[dict], path: str, dtype: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["dtype"] == dtype and r["speedup_vs_dense"] and r["format"] != "dense"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return
    formats = list(dict.fromkeys(r["format"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    ncols = min(3, len(shapes))
    nrows = math.ceil(len(shapes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    for ax, shape in zip(axes.flat, shapes):
        for fi, fmt in enumerate(formats):
            for ti, m in enumerate(tokens):
                pts = sorted((r["sparsity"], r["speedup_vs_dense"]) for r in rows
                             if r["shape"] == shape and r["format"] == fmt and r["tokens"] == m)
                if pts:
                    ax.plot(*zip(*pts), color=f"C{fi}", linestyle=styles[ti % 4], marker=markers[ti % 4],
                            markersize=3, label=f"{fmt}, {m} tok")
        r0 = next(r for r in rows if r["shape"] == shape)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{shape} ({r0['out_features']}×{r0['in_features']})", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup vs dense")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.85, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_rows(rows: list[dict]) -> None:
    cols = [("shape", 13), ("tokens", 6), ("dtype", 8), ("sparsity", 8), ("format", 11), ("backend", 12),
            ("time_ms", 9), ("speedup_vs_dense", 8), ("intensity", 9), ("gflops", 7), ("gbps", 7), ("check", 6)]
    print(" ".join(n[:w].ljust(w) for n, w in cols))
    for r in rows:
        cells = [("-" if r[n] is None or r[n] == "" else f"{r[n]:.4g}" if isinstance(r[n], float) else str(r[n]))[:w]
                 .ljust(w) for n, w in cols]
        print(" ".join(cells) + (f"  [{r['note']}]" if r["note"] else ""), flush=True)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)}")
    p.add_argument("--tokens", default=None, help="comma list of token counts M")
    p.add_argument("--dtypes", default=None, help="comma list of float32,float16,bfloat16")
    p.add_argument("--sparsities", default=None, help="comma list in [0, 1)")
    p.add_argument("--formats", default=None, help="comma list of dense,csr,bsr<b>,torch_csr,torch_bsr<b>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed formats")
    args = C.resolve_args(p.parse_args())
    defaults = DEFAULTS[args.device]
    if args.quick:
        defaults = {**defaults, "shapes": "bert-qkvo", "tokens": "1,128", "sparsities": "0.9",
                    "formats": "dense,csr,bsr32"}
    shapes = (args.shapes or defaults["shapes"]).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    tokens = [int(t) for t in (args.tokens or defaults["tokens"]).split(",")]
    dtypes = [getattr(torch, d) for d in (args.dtypes or defaults["dtypes"]).split(",")]
    sparsities = [float(s) for s in (args.sparsities or defaults["sparsities"]).split(",")]
    if not all(0 <= s < 1 for s in sparsities):
        p.error("--sparsities must lie in [0, 1)")
    formats = (args.formats or defaults["formats"]).split(",")
    if "dense" not in formats:
        formats.insert(0, "dense")
    env = C.environment(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            out_f, in_f = SHAPES[shape]
            for m in tokens:
                limit = CPU_SKIP_TOKENS_ABOVE.get(shape.split("-")[0]) if args.device == "cpu" else None
                if limit is not None and m > limit and not args.tokens:
                    continue
                for s in sparsities:
                    new = bench_point(args, env, shape, out_f, in_f, m, dtype, s, formats, gen)
                    print_rows(new)
                    rows += new
    notes = C.busy_note()
    if args.device == "cpu":
        notes.append("CPU: dense is F.linear (MKL/oneDNN); sparse_ops runs its C++ kernels "
                     f"(csr_linear: {cpu_backend('csr_linear')}, bsr_linear: {cpu_backend('bsr_linear')}); "
                     "torch.sparse has no 16-bit CPU kernels. The GPU rows of docs/design.md §5 need a GPU.")
    name = "sparse_linear" + ("_quick" if args.quick else "")
    base = C.write_rows(rows, args.out, name, meta=C.run_meta(env, args), notes=notes, fields=FIELDS)
    paths = [base + ".json", base + ".csv"]
    for dtype in dtypes:
        d = str(dtype).replace("torch.", "")
        png = f"{base}_{d}.png"
        plot(rows, png, d, f"sparse linear speedup vs dense F.linear, {d}, {env['device']}")
        paths.append(png)
    for n in notes:
        print("NOTE:", n)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
