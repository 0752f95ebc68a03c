"""Pruner: prunes the targeted layers of any PyTorch model with MGPP, magnitude or movement pruning.

Two calls per optimizer step, in any training loop:

    loss.backward()
    pruner.after_backward()        # threshold selection + one fused pass per matrix
    optimizer.step()
    pruner.after_optimizer_step()  # keeps enforced zeros at zero; advances the step
    optimizer.zero_grad()

and `pruner.finalize()` at the end, which bakes the masks into the weights and restores the model's
own forward functions, so `save_pretrained` writes a plain checkpoint with zeros in place.

This module keeps what every method shares: the targets and their masks, the groups that share a
threshold (global or local scope), exact threshold selection, the schedule, logging and state.
The targets are nn.Linear and transformers Conv1D layers (sparse_ops.pruning.targets). Every
per-matrix tensor (mask, scores, Adam moments) is in the (out, in) orientation of an nn.Linear weight,
whatever the layer: a Conv1D, which stores its weight (in, out), is worked on through the transposed
view `Target.matrix` (the fused pass copies a non-contiguous view and writes the result back).
What a method does per step lives in its own module, `sparse_ops.pruning.<method>`:
magnitude.py, mgpp.py, movement.py (hard, with Adam or first-order scores), soft_movement.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from .config import PruningConfig
from . import KEEP_ALL, method_for
from .targets import find_targets, is_transposed, weight_out_in
from ..ops.keys import block_keys
from ..ops.select import Threshold, prune_threshold


@dataclasses.dataclass
class Target:
    """One pruned matrix: its module, mask, place in the global key order, and the method's
    per-matrix tensors (movement: scores and their Adam moments), all (out, in)."""

    name: str
    module: nn.Module  # nn.Linear or transformers Conv1D
    mask: torch.Tensor
    index_offset: int
    num_keys: int
    scores: torch.Tensor | None = None
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    rule: tuple[str, Threshold] = ("", KEEP_ALL)  # movement: (kernel method, threshold) of the current mask

    @property
    def weight(self) -> nn.Parameter:
        """The parameter as the module stores it ((in, out) for a Conv1D)."""
        return self.module.weight

    @property
    def transposed(self) -> bool:
        return is_transposed(self.module)

    @property
    def matrix(self) -> torch.Tensor:
        """The weight's data as (out, in): the parameter's data, or its transposed view for a Conv1D."""
        return weight_out_in(self.module)

    @property
    def matrix_grad(self) -> torch.Tensor | None:
        """The weight's gradient as (out, in) (a view), or None before backward."""
        g = self.module.weight.grad
        return g.t() if g is not None and self.transposed else g


def distributed_reduce():
    """(reduce, shard) for the Pruner under torch.distributed (a sum all-reduce, and this process's
    (rank, world)), or (None, (0, 1)) in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None, (0, 1)

    def reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    return reduce, (dist.get_rank(), dist.get_world_size())


PRUNER_STATE = "sparse_ops_pruner.pt"  # the file name a checkpoint keeps Pruner.state_dict() under


class Pruner:
    """Prunes the targeted layers of `model` as `config` says (see the module docstring)."""

    def __init__(self, model: nn.Module, config: PruningConfig, optimizer: torch.optim.Optimizer | None = None,
                 reduce: Callable[[torch.Tensor], None] | None = None, shard: tuple[int, int] = (0, 1)):
        """optimizer: the one that updates the pruned weights; it must hold them. Movement's scores
        follow its learning-rate schedule (their rate is score_lr × the ratio of its current lr to
        its initial lr). reduce/shard: for several processes holding the same replicas (DDP), each
        histograms the targets[rank::world] share of the keys and `reduce` (a sum all-reduce)
        combines them."""
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.reduce, self.shard = reduce, shard
        self.schedule = config.schedule()
        self.step = 0
        self.granularity = config.granularity
        self.block = config.block_size if config.granularity == "block" else (1, 1)
        self.last_threshold: float | None = None  # the last selected global threshold, for logging
        self.targets: list[Target] = []
        offset = 0
        for name, module in find_targets(model, config.targets, config.exclude):
            w = weight_out_in(module)
            if self.granularity == "block" and w.dim() != 2:
                raise ValueError(f"{name}.weight must be 2-D for block granularity, got {tuple(w.shape)}")
            if self.granularity == "2:4" and w.shape[-1] % 4:
                raise ValueError(f"{name}.weight has {w.shape[-1]} input features; 2:4 needs a multiple of 4")
            num_keys = math.ceil(w.shape[0] / self.block[0]) * math.ceil(w.shape[1] / self.block[1])
            mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
            self.targets.append(Target(name, module, mask, offset if config.scope == "global" else 0, num_keys))
            offset += num_keys
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for t in self.targets:
                if id(t.weight) not in held:
                    raise ValueError(f"optimizer does not hold {t.name}.weight, which this pruner prunes; "
                                     "build the optimizer over the model's parameters first")
        self.method = method_for(config)(self)

    # -- groups, keys and thresholds (used by the methods) --------------------------------------
    def groups(self) -> list[list[Target]]:
        """Targets sharing one threshold: all (global) or each alone (local)."""
        return [self.targets] if self.config.scope == "global" else [[t] for t in self.targets]

    def keys(self, t: Target, source: torch.Tensor, squared: bool) -> torch.Tensor:
        """Selection keys of `source` (|w| or scores): per element, or per block (Σ source² when
        squared, else Σ source)."""
        if self.granularity == "block":
            return block_keys(source, *self.block, squared=squared)
        return source.abs() if squared else source

    def select(self, keys: list[torch.Tensor], count: int, first_histogram=None) -> Threshold:
        """The exact threshold pruning `count` of `keys` (one group), across processes if sharded."""
        rank, world = self.shard
        shard = keys[rank::world] if world > 1 and len(keys) >= world else None
        thr = prune_threshold(keys, count, first_histogram=first_histogram,
                              reduce=self.reduce if shard is not None else None, hist_keys=shard)
        if self.config.scope == "global" and count > 0:
            self.last_threshold = thr.value
        return thr

    def count(self, group: list[Target], step: int) -> int:
        """How many keys of `group` the schedule prunes at `step`."""
        return self.schedule.prune_count(step, sum(t.num_keys for t in group))

    def kernel_args(self, t: Target) -> dict:
        return dict(granularity=self.granularity, block_rows=self.block[0], block_cols=self.block[1],
                    index_offset=t.index_offset)

    def lr_ratio(self) -> float:
        """The optimizer's current lr over its initial lr (1 without an optimizer or a schedule), read
        from the parameter group holding the first pruned weight."""
        if self.optimizer is None:
            return 1.0
        first = id(self.targets[0].weight)
        group = next(g for g in self.optimizer.param_groups if any(id(p) == first for p in g["params"]))
        initial = group.get("initial_lr", group["lr"])
        return float(group["lr"]) / float(initial) if initial else 1.0

    # -- the two calls per step -----------------------------------------------------------------
    def after_backward(self) -> None:
        """Call after backward (and gradient clipping), before optimizer.step()."""
        for t in self.targets:
            if t.weight.grad is None:
                raise RuntimeError(f"{t.name}.weight has no gradient: call after_backward() after loss.backward()")
        self.method.after_backward()

    def after_optimizer_step(self) -> None:
        """Call after optimizer.step(): re-zeroes the weights a persistent mask prunes."""
        self.method.after_optimizer_step()
        self.step += 1

    # -- results, logging, state ----------------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        """Fraction of each target pruned now, and 'global' (the method says what counts as pruned:
        the mask for movement; zero weights for magnitude and MGPP, whose weights may regrow)."""
        pruned = {t.name: self.method.pruned_count(t) for t in self.targets}
        out = {t.name: pruned[t.name] / t.mask.numel() for t in self.targets}
        out["global"] = sum(pruned.values()) / sum(t.mask.numel() for t in self.targets)
        return out

    def stats(self) -> dict[str, float]:
        """Scalars worth logging: step, target and reached sparsity, threshold, and the method's own
        (MGPP: λ and the prior's t; soft movement: τ and λ_mvp)."""
        sp = self.sparsity()
        out = {"pruning/step": self.step, "pruning/target_sparsity": self.schedule.sparsity(self.step),
               "pruning/sparsity": sp.pop("global")}
        if self.last_threshold is not None:
            out["pruning/threshold"] = self.last_threshold
        out.update(self.method.stats())
        out.update({f"pruning/sparsity/{name}": value for name, value in sp.items()})
        return out

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "step": self.step,
                "masks": {t.name: t.mask.clone() for t in self.targets},
                "last_threshold": self.last_threshold, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        current = self.config.to_dict()
        if state["config"] != current:
            differ = {k: (v, current.get(k)) for k, v in state["config"].items() if current.get(k) != v}
            raise ValueError(f"state was saved with another PruningConfig (saved, current): {differ}; "
                             "build the Pruner with that config")
        names = {t.name for t in self.targets}
        if set(state["masks"]) != names:
            raise ValueError(f"state holds masks for {sorted(state['masks'])}, this pruner targets {sorted(names)}")
        self.step = int(state["step"])
        for t in self.targets:
            t.mask.copy_(state["masks"][t.name])
        self.last_threshold = state["last_threshold"]
        self.method.load_state_dict(state["method"])

    def finalize(self) -> nn.Module:
        """Bake the masks into the weights and give the modules back their own forward."""
        with torch.no_grad():
            for t in self.targets:
                t.matrix.masked_fill_(~t.mask, 0.0)
        self.method.finalize()
        return self.model
