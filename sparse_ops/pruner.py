"""Pruner: MGPP, magnitude and movement pruning (hard and soft) for any PyTorch model.

Two calls per optimizer step, in any training loop:

    loss.backward()
    pruner.after_backward()        # threshold selection + one fused pass per matrix
    optimizer.step()
    pruner.after_optimizer_step()  # keeps enforced zeros at zero; advances the step
    optimizer.zero_grad()

and `pruner.finalize()` at the end, which bakes the masks into the weights and restores the model's
own forward functions, so `save_pretrained` writes a plain checkpoint with zeros in place.

Per method (SPEC §3), with s(t) the cubic schedule:
  magnitude   at t_i and every `interval` steps until t_e, prune the s(t) smallest |w| (or block
              norms); the mask persists between events (gradients masked, weights kept at zero).
  mgpp        every step adds (1/n)·∂[−log π]/∂w with λ annealed; the same events as magnitude,
              but between them nothing is masked (pruned weights may regrow); the mask is fixed
              after t_e.
  movement    scores S (fp32, init 0); the forward uses W ⊙ TopK(S) with a straight-through
              backward, the fused pass updates S ← S − η·∂L/∂W'⊙W and masks the gradient.
  soft_movement  the same with M = (S > τ) and the penalty λ_mvp(t)·mean sigmoid(S) folded into the
              score update; at least soft_min_keep of each matrix (plus one) stays alive.
Thresholds are exact (radix select) and global or per matrix; granularity element, block or 2:4.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import PruningConfig
from .prior import mgp_threshold
from .reference import block_keys_ref, expand_block_mask, threshold_keep, two_four_keep
from .select import Threshold, prune_threshold

KEEP_ALL = Threshold(value=float("-inf"), tie_cut=0, count=0)


class _StraightThrough(torch.autograd.Function):
    """W' = W ⊙ M forward; backward passes ∂L/∂W' to W unmasked (the pruner masks it later)."""

    @staticmethod
    def forward(ctx, weight, mask):
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _masked_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, _StraightThrough.apply(module.weight, module._sparse_ops_mask), module.bias)


@dataclasses.dataclass
class Target:
    """One pruned matrix: its module, mask, scores and place in the global key order."""

    name: str
    module: nn.Linear
    mask: torch.Tensor
    scores: torch.Tensor | None
    index_offset: int
    num_keys: int
    rule: tuple[str, Threshold] = ("", KEEP_ALL)  # movement: (kernel method, threshold) of the current mask

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight


def distributed_reduce():
    """(reduce, shard) for the Pruner under torch.distributed (a sum all-reduce, and this process's
    (rank, world)), or (None, (0, 1)) in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None, (0, 1)

    def reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    return reduce, (dist.get_rank(), dist.get_world_size())


def find_targets(model: nn.Module, config: PruningConfig) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear whose name matches a target pattern and no exclude pattern."""
    include = [re.compile(p) for p in config.targets]
    exclude = [re.compile(p) for p in config.exclude]
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(p.search(name) for p in include)
             and not any(p.search(name) for p in exclude)]
    if not found:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"no nn.Linear of the model matches targets {list(config.targets)} (minus exclude "
                         f"{list(config.exclude)}); the model's linears include {linears}")
    return found


class Pruner:
    """Prunes the targeted linears of `model` as `config` says (see the module docstring)."""

    def __init__(self, model: nn.Module, config: PruningConfig, optimizer: torch.optim.Optimizer | None = None,
                 reduce: Callable[[torch.Tensor], None] | None = None, shard: tuple[int, int] = (0, 1)):
        """reduce/shard: for several processes holding the same replicas (DDP), each histograms the
        targets[rank::world] share of the keys and `reduce` (a sum all-reduce) combines them."""
        self.config = config
        self.model = model
        self.reduce, self.shard = reduce, shard
        self.schedule = config.schedule()
        self.step = 0
        self.movement = config.method in ("movement", "soft_movement")
        self.granularity = config.granularity
        self.block = config.block_size if config.granularity == "block" else (1, 1)
        self.targets: list[Target] = []
        offset = 0
        for name, module in find_targets(model, config):
            w = module.weight
            if self.granularity == "block" and w.dim() != 2:
                raise ValueError(f"{name}.weight must be 2-D for block granularity, got {tuple(w.shape)}")
            if self.granularity == "2:4" and w.shape[-1] % 4:
                raise ValueError(f"{name}.weight has {w.shape[-1]} input features; 2:4 needs a multiple of 4")
            num_keys = math.ceil(w.shape[0] / self.block[0]) * math.ceil(w.shape[1] / self.block[1])
            scores = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if self.movement else None
            mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            self.targets.append(Target(name, module, mask, scores, offset if config.scope == "global" else 0, num_keys))
            offset += num_keys
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for t in self.targets:
                if id(t.weight) not in held:
                    raise ValueError(f"optimizer does not hold {t.name}.weight, which this pruner prunes; "
                                     "build the optimizer over the model's parameters first")
        # the fused pass emits the level-0 histogram of the updated scores; it stands in for the
        # first radix level of the next selection (element keys only: block keys are few anyway)
        self.histograms = self._new_histograms() if config.method == "movement" and self.granularity == "element" else None
        self._histograms_fresh = False
        self.last_threshold: float | None = None  # the last selected global threshold, for logging
        if self.movement:
            for t in self.targets:
                t.module._sparse_ops_mask = t.mask
                t.module.forward = types.MethodType(_masked_linear_forward, t.module)
            self._select_movement_masks(step=0)

    # -- groups and keys ------------------------------------------------------------------------
    def _groups(self) -> list[list[Target]]:
        """Targets sharing one threshold: all (global) or each alone (local)."""
        return [self.targets] if self.config.scope == "global" else [[t] for t in self.targets]

    def _new_histograms(self) -> list[torch.Tensor]:
        device = self.targets[0].mask.device
        return [torch.zeros(257, dtype=torch.int64, device=device) for _ in self._groups()]

    def _keys(self, t: Target) -> torch.Tensor:
        """The selection keys of a target now: |w| or scores, per element or per block."""
        source = t.scores if self.movement else t.weight.detach()
        if self.granularity == "block":
            return block_keys_ref(source, *self.block, squared=not self.movement)
        return source if self.movement else source.abs()

    def _select(self, group: list[Target], count: int, first_histogram=None) -> Threshold:
        keys = [self._keys(t) for t in group]
        rank, world = self.shard
        shard = keys[rank::world] if world > 1 and len(keys) >= world else None
        thr = prune_threshold(keys, count, first_histogram=first_histogram,
                              reduce=self.reduce if shard is not None else None, hist_keys=shard)
        if self.config.scope == "global" and count > 0:
            self.last_threshold = thr.value
        return thr

    def _count(self, group: list[Target], step: int) -> int:
        return self.schedule.prune_count(step, sum(t.num_keys for t in group))

    # -- movement -------------------------------------------------------------------------------
    def _select_movement_masks(self, step: int) -> None:
        """The masks the next forward uses: TopK(S) (hard) or S > τ with a floor (soft)."""
        for g, group in enumerate(self._groups()):
            if self.granularity == "2:4":  # the pattern needs no threshold; it starts at t_i
                for t in group:
                    t.rule = ("movement" if step >= self.schedule.t_i else "", KEEP_ALL)
                continue
            if self.config.method == "movement":
                first = self.histograms[g] if self._histograms_fresh else None
                rule = ("movement", self._select(group, self._count(group, step), first))
                for t in group:
                    t.rule = rule
            else:
                for t in group:
                    t.rule = self._soft_rule(t)
        for t in self.targets:
            self._write_mask(t)

    def _soft_rule(self, t: Target) -> tuple[str, Threshold]:
        tau = self.config.soft_threshold
        keys = self._keys(t)
        kept = int((keys > tau).sum())
        floor = min(t.num_keys, math.ceil(self.config.soft_min_keep * t.num_keys) + 1)
        if kept >= floor:
            return ("soft_movement", Threshold(value=tau, tie_cut=0, count=t.num_keys - kept))
        thr = prune_threshold([keys], t.num_keys - floor)  # keep the top `floor` of this matrix
        return ("movement", dataclasses.replace(thr, tie_cut=thr.tie_cut + t.index_offset))

    def _write_mask(self, t: Target) -> None:
        method, thr = t.rule
        if self.granularity == "2:4":
            keep = two_four_keep(t.scores) if method else torch.ones_like(t.mask)
        else:
            keep = threshold_keep(self._keys(t), thr.value, thr.tie_cut, t.index_offset, strict=method == "soft_movement")
            if self.granularity == "block":
                keep = expand_block_mask(keep, tuple(t.mask.shape), *self.block)
        t.mask.copy_(keep)

    # -- the two calls per step -----------------------------------------------------------------
    def after_backward(self) -> None:
        """Call after backward (and gradient clipping), before optimizer.step()."""
        for t in self.targets:
            if t.weight.grad is None:
                raise RuntimeError(f"{t.name}.weight has no gradient: call after_backward() after loss.backward()")
        if self.movement:
            self._movement_step()
        else:
            self._magnitude_step()

    def after_optimizer_step(self) -> None:
        """Call after optimizer.step(): re-zeroes the weights a persistent mask prunes."""
        if not self.movement and self._mask_enforced(self.step):
            with torch.no_grad():
                for t in self.targets:
                    t.weight.masked_fill_(~t.mask, 0.0)
        self.step += 1

    def _kernel_args(self, t: Target) -> dict:
        return dict(granularity=self.granularity, block_rows=self.block[0], block_cols=self.block[1],
                    index_offset=t.index_offset)

    def _movement_step(self) -> None:
        t_now, cfg = self.step, self.config
        if self.histograms is not None:
            for h in self.histograms:
                h.zero_()
        soft_l1 = 0.0
        if cfg.method == "soft_movement" and cfg.sparsity > 0:
            soft_l1 = cfg.soft_l1 * self.schedule.sparsity(t_now) / cfg.sparsity / sum(t.mask.numel() for t in self.targets)
        for g, group in enumerate(self._groups()):
            for t in group:
                method, thr = t.rule
                torch.ops.sparse_ops.fused_prune_step(
                    t.weight.data, t.weight.grad, t.scores, t.mask,
                    self.histograms[g] if self.histograms is not None else None,
                    method=method or "movement", threshold=thr.value, tie_cut=thr.tie_cut, score_lr=cfg.score_lr,
                    sigmoid_l1=soft_l1, reuse_mask=not method, **self._kernel_args(t))
        self._histograms_fresh = self.histograms is not None
        self._select_movement_masks(step=t_now + 1)

    def _is_event(self, step: int) -> bool:
        s = self.schedule
        return s.t_i <= step <= s.t_e and ((step - s.t_i) % self.config.interval == 0 or step == s.t_e)

    def _mask_enforced(self, step: int) -> bool:
        """Is a mask applied at `step`? magnitude: from t_i on; mgpp: at events and after t_e."""
        if step < self.schedule.t_i:
            return False
        return self.config.method == "magnitude" or self._is_event(step) or step > self.schedule.t_e

    def _magnitude_step(self) -> None:
        t_now, cfg = self.step, self.config
        prior = dict(prior_scale=1.0 / cfg.num_train_examples, lam=cfg.lam_at(t_now), var0=cfg.var0,
                     var1=cfg.var1) if cfg.method == "mgpp" else {}
        event = self._is_event(t_now)
        enforced = self._mask_enforced(t_now)
        for group in self._groups():
            thr = KEEP_ALL
            if event and self.granularity != "2:4":
                thr = self._select(group, self._count(group, t_now))
            for t in group:
                torch.ops.sparse_ops.fused_prune_step(
                    t.weight.data, t.weight.grad, None, t.mask, None, method=cfg.method,
                    threshold=thr.value, tie_cut=thr.tie_cut, mask_grad=enforced, mask_weight=event,
                    reuse_mask=enforced and not event, **prior, **self._kernel_args(t))

    # -- results, logging, state ----------------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        """Fraction of each target pruned now, and 'global': the mask for movement; the weights that
        are zero for magnitude and MGPP (whose pruned weights may regrow between events)."""
        pruned = {t.name: int(((~t.mask) if self.movement else (t.weight == 0)).sum()) for t in self.targets}
        out = {t.name: pruned[t.name] / t.mask.numel() for t in self.targets}
        out["global"] = sum(pruned.values()) / sum(t.mask.numel() for t in self.targets)
        return out

    def stats(self) -> dict[str, float]:
        """Scalars worth logging: step, target and reached sparsity, threshold, λ and the prior's t."""
        cfg = self.config
        sp = self.sparsity()
        out = {"pruning/step": self.step, "pruning/target_sparsity": self.schedule.sparsity(self.step),
               "pruning/sparsity": sp.pop("global")}
        if cfg.method == "soft_movement":
            out["pruning/threshold"] = cfg.soft_threshold
        elif self.last_threshold is not None:
            out["pruning/threshold"] = self.last_threshold
        if cfg.method == "mgpp":
            lam = cfg.lam_at(self.step)
            out["pruning/lambda"] = lam
            out["pruning/prior_threshold"] = mgp_threshold(lam, cfg.var0, cfg.var1)
        out.update({f"pruning/sparsity/{name}": value for name, value in sp.items()})
        return out

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "step": self.step,
                "masks": {t.name: t.mask.clone() for t in self.targets},
                "scores": {t.name: t.scores.clone() for t in self.targets if t.scores is not None},
                "rules": {t.name: (t.rule[0], dataclasses.asdict(t.rule[1])) for t in self.targets},
                "histograms": [h.clone() for h in self.histograms] if self.histograms is not None else None,
                "histograms_fresh": self._histograms_fresh, "last_threshold": self.last_threshold}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_dict():
            differ = {k: (v, self.config.to_dict().get(k)) for k, v in state["config"].items()
                      if self.config.to_dict().get(k) != v}
            raise ValueError(f"state was saved with another PruningConfig (saved, current): {differ}; "
                             "build the Pruner with that config")
        names = {t.name for t in self.targets}
        if set(state["masks"]) != names:
            raise ValueError(f"state holds masks for {sorted(state['masks'])}, this pruner targets {sorted(names)}")
        self.step = int(state["step"])
        for t in self.targets:
            t.mask.copy_(state["masks"][t.name])
            if t.scores is not None:
                t.scores.copy_(state["scores"][t.name])
            method, thr = state["rules"][t.name]
            t.rule = (method, Threshold(**thr))
        if self.histograms is not None:
            for h, saved in zip(self.histograms, state["histograms"]):
                h.copy_(saved)
        self._histograms_fresh = bool(state["histograms_fresh"])
        self.last_threshold = state["last_threshold"]

    def finalize(self) -> nn.Module:
        """Bake the masks into the weights and give the modules back their own forward."""
        with torch.no_grad():
            for t in self.targets:
                t.weight.masked_fill_(~t.mask, 0.0)
                if self.movement:
                    t.module.__dict__.pop("forward", None)
                    t.module.__dict__.pop("_sparse_ops_mask", None)
        return self.model
