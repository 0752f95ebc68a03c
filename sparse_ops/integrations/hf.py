"""Hugging Face Trainer integration: pruning is a TrainerCallback (no Trainer subclass); distillation needs
a small Trainer subclass, because the Trainer gives nothing else access to the inputs.

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

Distillation from a dense teacher (docs/design.md §2.7): replace `Trainer` by `DistillationTrainer` (or mix
`DistillationMixin` into another Trainer subclass, before it) and keep the callback as it is:

    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0, alpha=0.5,
                                  args=args, train_dataset=ds, callbacks=[PruningCallback(config)])

Why a subclass: `Trainer(compute_loss_func=...)` is called with the student's outputs and the labels
only, never with the inputs, so it cannot run the teacher; overriding `compute_loss` is the hook the
Trainer documents for this. Only `compute_loss` is overridden (and `loss_is_scaled_for_ga = False`:
the loss is a per-batch mean, which the Trainer divides by the gradient accumulation steps); the
training loop, the callbacks, saving and resuming are the Trainer's own. The teacher is not the
Trainer's model: it is never trained, pruned, wrapped (DDP/FSDP/DeepSpeed), saved in checkpoints or
resumed; pass it again when resuming. It is put in eval mode at construction, moved once to the
student's device at the first step (unless it was dispatched with a device_map), and run under
torch.no_grad() and the Trainer's mixed-precision autocast. Evaluation with labels reports the same
distillation loss as eval_loss.
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..pruning.config import PruningConfig
from ..pruning.distillation import check_temperature_alpha, distillation_loss, num_outputs
from ..pruning.pruner import PRUNER_STATE, Pruner, distributed_reduce


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
            paths = [os.path.join(f, PRUNER_STATE) for f in folders]
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
            torch.save(self.pruner.state_dict(), os.path.join(folder, PRUNER_STATE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is not None and self.finalize_on_train_end:
            self.pruner.finalize()


def _logits(outputs) -> torch.Tensor:
    """The logits of a model output without a loss: the "logits" entry, or the first of a tuple."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


class DistillationMixin:
    """Makes a Trainer's loss `distillation_loss(student, teacher, labels, temperature, alpha)` (docs/design.md §2.7).

    teacher_model: a frozen model whose logits have the student's shape (same number of labels, or the same
    vocabulary for a language model); a mismatch is a ValueError here. The batch must carry "labels"
    (-100 = ignored); for causal language models (detected as the Trainer does for label smoothing, or
    `shift_labels=True`) the logits at position t are matched with the label at t + 1, unless the batch
    carries "shift_labels" already. Encoder-decoder students keep "labels" in their inputs (they build
    the decoder inputs from them); other students and the teacher get the batch without them.
    """

    loss_is_scaled_for_ga = False  # distillation_loss is a per-batch mean

    def __init__(self, *args, teacher_model: torch.nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 shift_labels: bool | None = None, **kwargs):
        self.temperature, self.alpha = check_temperature_alpha(temperature, alpha)
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        if shift_labels not in (None, True, False):
            raise TypeError(f"shift_labels must be None (detect causal LMs), True or False, got {shift_labels!r}")
        super().__init__(*args, **kwargs)
        student = self.model
        if student is None:
            raise ValueError("model (the student) is required with teacher_model")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("compute_loss_func cannot be combined with teacher_model: the loss is distillation_loss")
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError("args.label_smoothing_factor must be 0 with teacher_model: the teacher's soft targets "
                             "take the place of label smoothing")
        shared = {id(p) for p in teacher_model.parameters()} & {id(p) for p in student.parameters()}
        if teacher_model is student or shared:
            raise ValueError("teacher_model shares parameters with model (the student): pass a separate copy, "
                             "e.g. copy.deepcopy(model) before training, or the dense fine-tuned checkpoint")
        mine, theirs = num_outputs(student), num_outputs(teacher_model)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"teacher_model has {theirs} output labels (logits of size {theirs}) but model (the "
                             f"student) has {mine}: distillation needs the same label set")
        if shift_labels is None:
            name = student._get_name() if hasattr(student, "_get_name") else type(student).__name__
            shift_labels = name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self.shift_labels = shift_labels
        self.teacher_model = teacher_model.eval()
        self._teacher_placed = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Student forward, teacher forward (eval, no grad), then distillation_loss; `num_items_in_batch`
        is not used (each batch is its own mean)."""
        inputs = dict(inputs)
        labels = inputs.pop("shift_labels", None)  # already shifted by a padding-free collator
        shift = labels is None and self.shift_labels
        if labels is None:
            labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"DistillationTrainer needs 'labels' in every batch, got the keys {sorted(inputs)}")
        if not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            inputs.pop("labels", None)
        outputs = model(**inputs)
        teacher = self.teacher_model
        if not self._teacher_placed:
            device = next((p.device for p in model.parameters()), None)
            if device is not None and getattr(teacher, "hf_device_map", None) is None:
                teacher.to(device)
            self._teacher_placed = True
        if teacher.training:
            teacher.eval()
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = _logits(teacher(**inputs))
        student_logits = _logits(outputs)
        teacher_logits = teacher_logits.to(student_logits.device)
        if shift:
            student_logits, teacher_logits = student_logits[..., :-1, :], teacher_logits[..., :-1, :]
            labels = labels[..., 1:]
        loss = distillation_loss(student_logits, teacher_logits, labels.to(student_logits.device),
                                 temperature=self.temperature, alpha=self.alpha)
        return (loss, outputs) if return_outputs else loss


class DistillationTrainer(DistillationMixin, Trainer):
    """`transformers.Trainer` whose loss distils from `teacher_model` (see DistillationMixin and the module
    docstring); use it with PruningCallback exactly as the plain Trainer."""
