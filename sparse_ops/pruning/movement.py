"""Hard movement pruning (Sanh, Wolf, Rush 2020; docs/design.md §2.3), trained as the reference trains it.

Each targeted matrix W gets scores S (float32). The forward uses W' = W ⊙ M with
M = TopK(S) keeping the fraction 1 − s(t) (cubic schedule: everything kept before t_i, s_f from t_e
on, so the last steps are a cool-down at the final sparsity). The backward is straight-through:
∂L/∂S = ∂L/∂W'⊙W for every weight, pruned or not, and ∂L/∂W = ∂L/∂W'⊙M.

How the scores learn (`score_optimizer`):
  "adam" (default, as Hugging Face's reference code: the scores sit in the same AdamW as the
         weights, in their own group): bias-corrected Adam, lr `score_lr` (1e-2), betas (0.9, 0.999),
         eps 1e-8, no weight decay. The step, with both fp32 moment buffers, runs inside the fused
         pass that also masks the gradient and emits the next selection's histogram.
  "sgd"  the paper's analysis form, S ← S − score_lr·∂L/∂W'⊙W.
Either way the rate follows the optimizer's own schedule: score_lr × (current lr / initial lr).
The scores start at |w|/std(|w|) per matrix (`score_init="magnitude"`, the default): the first TopK
is magnitude's and movement reorders it as the scores move by at most about the score lr per step.
`score_init="zeros"` is the reference's start. From zeros, Adam scores rank only how consistently a
weight was pushed toward zero, whatever its size, and on MiniLM at a few epochs the first TopK steps
remove weights the model cannot lose (benchmarks/bench_movement_selection.py): the run collapses to
the majority class, where the magnitude start keeps its accuracy (README).

TopK is per matrix (scope "local", the default, as in the reference) or over all targets
("global"). A global TopK never removes a whole matrix: a matrix the threshold would empty keeps
its highest-scored key, and the other matrices prune that many more, so the count stays exact
(capped at all keys but one per matrix).
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.keys import expand_block_mask, threshold_keep, two_four_keep
from ..ops.select import Threshold, prune_threshold
from .base import KEEP_ALL, PruningMethod


class _StraightThrough(torch.autograd.Function):
    """W' = W ⊙ M forward; backward passes ∂L/∂W' to W unmasked (the fused pass masks it later)."""

    @staticmethod
    def forward(ctx, weight, mask):
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _masked_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, _StraightThrough.apply(module.weight, module._sparse_ops_mask), module.bias)


def _masked_conv1d_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers Conv1D's own forward (x·W + b by addmm) on the masked weight; its mask attribute
    is the transposed view (in, out) of the target's mask."""
    weight = _StraightThrough.apply(module.weight, module._sparse_ops_mask)
    out = torch.addmm(module.bias, x.view(-1, x.size(-1)), weight)
    return out.view(x.size()[:-1] + (module.nf,))


def keep_top(keys: torch.Tensor, keep: int, index_offset: int) -> Threshold:
    """The rule keeping exactly the `keep` highest of one target's keys (ties: higher index kept)."""
    thr = prune_threshold([keys], keys.numel() - keep)
    return dataclasses.replace(thr, tie_cut=thr.tie_cut + index_offset)


class Movement(PruningMethod):
    name = "movement"
    selects_from_histograms = True  # each step's TopK reads the histogram the fused pass emitted

    def __init__(self, pruner):
        super().__init__(pruner)
        cfg = self.config
        self.adam = cfg.score_optimizer == "adam"
        self.score_step = 0  # Adam steps taken on the scores
        for t in pruner.targets:
            t.scores = torch.zeros(t.mask.shape, dtype=torch.float32, device=t.mask.device)
            if cfg.score_init == "magnitude":
                w = t.matrix.float().abs()
                t.scores.copy_(w * (self.init_scale() / w.std().clamp_min(1e-30)))
            if self.adam:
                t.exp_avg, t.exp_avg_sq = torch.zeros_like(t.scores), torch.zeros_like(t.scores)
            t.module._sparse_ops_mask = t.mask.t() if t.transposed else t.mask
            forward = _masked_conv1d_forward if t.transposed else _masked_linear_forward
            t.module.forward = types.MethodType(forward, t.module)
        # the fused pass emits the level-0 histogram of the updated scores; it stands in for the
        # first radix level of the next selection (element keys of hard movement only)
        uses_histograms = self.selects_from_histograms and pruner.granularity == "element"
        device = pruner.targets[0].mask.device
        self.histograms = [torch.zeros(257, dtype=torch.int64, device=device)
                           for _ in pruner.groups()] if uses_histograms else None
        self.histograms_fresh = False
        self.select_masks(step=0)

    def init_scale(self) -> float:
        """The magnitude start's scores are |w|/std(|w|) times this (TopK does not depend on it)."""
        return 1.0

    # -- masks ----------------------------------------------------------------------------------
    def score_keys(self, t) -> torch.Tensor:
        return self.pruner.keys(t, t.scores, squared=False)

    def select_masks(self, step: int) -> None:
        """The masks the forward of `step` uses."""
        p = self.pruner
        for g, group in enumerate(p.groups()):
            if p.granularity == "2:4":  # the pattern needs no threshold; it starts at t_i
                for t in group:
                    t.rule = (self.name if step >= p.schedule.t_i else "", KEEP_ALL)
            else:
                self.set_rules(g, group, step)
        for t in p.targets:
            self.write_mask(t)

    def set_rules(self, g: int, group: list, step: int) -> None:
        """TopK over the group, with the one-key floor per matrix when the group has several."""
        p = self.pruner
        keys = [self.score_keys(t) for t in group]
        count = p.count(group, step)
        if len(group) > 1:
            count = min(count, sum(t.num_keys for t in group) - len(group))
        first = self.histograms[g] if self.histograms_fresh else None
        floored: dict[int, Threshold] = {}
        while True:
            candidates = [torch.full_like(k, float("inf")) if i in floored else k for i, k in enumerate(keys)]
            remaining = count - sum(group[i].num_keys - 1 for i in floored)
            thr = p.select(candidates, remaining, first if not floored else None)
            emptied = [i for i in self._emptied(candidates, thr, group) if i not in floored]
            if not emptied:
                break
            for i in emptied:
                floored[i] = keep_top(keys[i], 1, group[i].index_offset)
        for i, t in enumerate(group):
            t.rule = ("movement", floored[i]) if i in floored else (self.name, thr)

    @staticmethod
    def _emptied(keys: list[torch.Tensor], thr: Threshold, group: list) -> list[int]:
        """Indices of the targets whose keys `thr` would all prune (only possible with several)."""
        if len(group) == 1 or thr.count == 0:
            return []
        tops = torch.stack([k.max() for k in keys]).tolist()
        out = []
        for i, (top, t) in enumerate(zip(tops, group)):
            if top < thr.value or (top == thr.value and not bool(
                    threshold_keep(keys[i], thr.value, thr.tie_cut, t.index_offset, strict=False).any())):
                out.append(i)
        return out

    def write_mask(self, t) -> None:
        method, thr = t.rule
        if self.pruner.granularity == "2:4":
            keep = two_four_keep(t.scores) if method else torch.ones_like(t.mask)
        else:
            keep = threshold_keep(self.score_keys(t), thr.value, thr.tie_cut, t.index_offset,
                                  strict=method == "soft_movement")
            if self.pruner.granularity == "block":
                keep = expand_block_mask(keep, tuple(t.mask.shape), *self.pruner.block)
        t.mask.copy_(keep)

    # -- the step -------------------------------------------------------------------------------
    def sigmoid_l1(self) -> float:
        """Per-element weight of the σ(S) penalty in the score gradient (soft movement only)."""
        return 0.0

    def score_args(self) -> dict:
        """The fused pass's score-update arguments for this step."""
        cfg = self.config
        args = dict(score_lr=cfg.score_lr * self.pruner.lr_ratio(), sigmoid_l1=self.sigmoid_l1())
        if self.adam:
            args.update(score_step=self.score_step, score_beta1=cfg.score_betas[0], score_beta2=cfg.score_betas[1],
                        score_eps=cfg.score_eps)
        return args

    def after_backward(self) -> None:
        p = self.pruner
        self.score_step += 1
        if self.histograms is not None:
            for h in self.histograms:
                h.zero_()
        args = self.score_args()
        for g, group in enumerate(p.groups()):
            for t in group:
                method, thr = t.rule
                torch.ops.sparse_ops.fused_prune_step(
                    t.matrix, t.matrix_grad, t.scores, t.mask,
                    self.histograms[g] if self.histograms is not None else None, t.exp_avg, t.exp_avg_sq,
                    keys_from_scores=True, strict_threshold=method == "soft_movement", threshold=thr.value,
                    tie_cut=thr.tie_cut, reuse_mask=not method,
                    **args, **p.kernel_args(t))
        self.histograms_fresh = self.histograms is not None
        self.select_masks(step=p.step + 1)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        targets = self.pruner.targets
        return {"score_step": self.score_step,
                "scores": {t.name: t.scores.clone() for t in targets},
                "exp_avg": {t.name: t.exp_avg.clone() for t in targets if t.exp_avg is not None},
                "exp_avg_sq": {t.name: t.exp_avg_sq.clone() for t in targets if t.exp_avg_sq is not None},
                "rules": {t.name: (t.rule[0], dataclasses.asdict(t.rule[1])) for t in targets},
                "histograms": [h.clone() for h in self.histograms] if self.histograms is not None else None,
                "histograms_fresh": self.histograms_fresh}

    def load_state_dict(self, state: dict) -> None:
        self.score_step = int(state["score_step"])
        for t in self.pruner.targets:
            t.scores.copy_(state["scores"][t.name])
            if self.adam:
                t.exp_avg.copy_(state["exp_avg"][t.name])
                t.exp_avg_sq.copy_(state["exp_avg_sq"][t.name])
            method, thr = state["rules"][t.name]
            t.rule = (method, Threshold(**thr))
        if self.histograms is not None:
            for h, saved in zip(self.histograms, state["histograms"]):
                h.copy_(saved)
        self.histograms_fresh = bool(state["histograms_fresh"])

    def finalize(self) -> None:
        for t in self.pruner.targets:
            t.module.__dict__.pop("forward", None)
            t.module.__dict__.pop("_sparse_ops_mask", None)
