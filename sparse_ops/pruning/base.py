"""The hooks every pruning method implements; the Pruner (sparse_ops.pruning.pruner) calls them."""

from __future__ import annotations

from ..ops.select import Threshold

KEEP_ALL = Threshold(value=float("-inf"), tie_cut=0, count=0)


class PruningMethod:
    """Per-step rule of one method. `pruner` gives the shared parts: targets, groups, keys,
    exact selection, schedule, step, optimizer."""

    def __init__(self, pruner):
        self.pruner = pruner
        self.config = pruner.config

    def after_backward(self) -> None:
        """The method's work between backward and optimizer.step()."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """The method's work after optimizer.step() (before the Pruner advances its step)."""

    def pruned_count(self, t) -> int:
        """How many weights of target t count as pruned now."""
        return int((~t.mask).sum())

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finalize(self) -> None:
        """Undo whatever the method changed in the model (the Pruner bakes the masks)."""
