"""Hugging Face Trainer integration: a TrainerCallback, no Trainer subclass.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[PruningCallback(PruningConfig(method="mgpp", sparsity=0.9, ...))])
    trainer.train()          # prunes while training; logs pruning/* scalars with the loss
    trainer.save_model()     # the masks are baked in at the end of training: a plain checkpoint

Hooks: the pruner is built at on_train_begin (so it sees the optimizer), after_backward runs at
on_pre_optimizer_step (after gradient clipping, which also unscales fp16 gradients; with fp16 and
max_grad_norm=0 the gradients would still be scaled: use bf16 or keep clipping on), and
after_optimizer_step at on_optimizer_step. Every checkpoint gets the pruner's state
(`sparse_ops_pruner.pt`), and resuming a run from a checkpoint restores it, so a resumed run ends
with the same masks as an uninterrupted one. Under torch.distributed (DDP, torchrun, accelerate)
each process histograms its share of the keys and the histograms are all-reduced.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from .config import PruningConfig
from .pruner import Pruner, distributed_reduce

STATE_NAME = "sparse_ops_pruner.pt"


class PruningCallback(TrainerCallback):
    """Prunes the model a Trainer trains, as `config` says."""

    def __init__(self, config: PruningConfig, finalize_on_train_end: bool = True):
        if not isinstance(config, PruningConfig):
            raise TypeError(f"config must be a PruningConfig, got {type(config).__name__}")
        self.config = config
        self.finalize_on_train_end = finalize_on_train_end
        self.pruner: Pruner | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        reduce, shard = distributed_reduce()
        self.pruner = Pruner(model, self.config, optimizer, reduce=reduce, shard=shard)
        if state.global_step > 0:
            folders = [f for f in (args.resume_from_checkpoint,) if isinstance(f, str)]
            folders.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            paths = [os.path.join(f, STATE_NAME) for f in folders]
            path = next((p for p in paths if os.path.isfile(p)), None)
            if path is None:
                raise FileNotFoundError(f"resuming at step {state.global_step} but none of {paths} exists: the masks "
                                        "and scores of the interrupted run cannot be restored")
            self.pruner.load_state_dict(torch.load(path, map_location=self.pruner.targets[0].mask.device,
                                                   weights_only=True))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.after_backward()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.after_optimizer_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pruner is None or logs is None:
            return
        stats = self.pruner.stats()
        logs.update(stats)  # seen by the reporting callbacks that run after this one
        if state.log_history:
            state.log_history[-1].update(stats)  # and kept in trainer.state.log_history

    def on_save(self, args, state, control, **kwargs):
        if self.pruner is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.pruner.state_dict(), os.path.join(folder, STATE_NAME))

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is not None and self.finalize_on_train_end:
            self.pruner.finalize()
