"""Knowledge distillation loss (docs/design.md §2.7), shared by the plain loop, the CLI and the Trainer integration."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label Hugging Face (and F.cross_entropy) use for positions without a target


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_temperature_alpha(temperature, alpha) -> tuple[float, float]:
    """temperature and alpha as floats, or the error that names the bad one."""
    temperature = _check_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    alpha = _check_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    return temperature, alpha


def _check_args(student_logits, teacher_logits, labels, temperature, alpha) -> tuple[float, float]:
    temperature, alpha = check_temperature_alpha(temperature, alpha)
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have shape (..., C) with C >= 1 classes, got "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)} (do teacher and student have the same number of labels?)")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must have an integer dtype (int64 class indices), got {labels.dtype}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels must have the leading shape of student_logits {tuple(student_logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on the device of student_logits ({student_logits.device}), got "
                         f"{teacher_logits.device}")
    if labels.device != student_logits.device:
        raise ValueError(f"labels must be on the device of student_logits ({student_logits.device}), got "
                         f"{labels.device}")
    return temperature, alpha


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """The distillation loss of docs/design.md §2.7, averaged over the rows that have a label:

        loss = (1 − α)·CE(z_s, y) + α·T²·KL( softmax(z_t/T) ‖ softmax(z_s/T) )

    Args:
        student_logits: (..., C) floating logits z_s of the model being trained; every leading index is one row
            (a sequence classifier gives (N, C), a token classifier or a language model (N, L, C)).
        teacher_logits: z_t, the same shape (any floating dtype, any device as long as it is the student's).
            Detached: no gradient reaches the teacher.
        labels: y, integer class indices of shape (...) (the leading shape of the logits). Rows whose label is
            -100 (Hugging Face's ignore_index) are left out of both terms. Labels are not shifted: for a causal
            language model pass logits[..., :-1, :] and labels[..., 1:].
        temperature: T > 0, finite. The KL term is multiplied by T² so that its gradient keeps the scale of the
            cross entropy's as T changes (Hinton et al., 2015).
        alpha: α in [0, 1]: 0 is plain cross entropy (equal to F.cross_entropy), 1 is pure distillation. A term
            with weight 0 is not computed at all (so α = 0 never evaluates the teacher's logits).

    Returns:
        A 0-dim tensor: the mean over the rows whose label is not -100 of
        (1 − α)·(−log softmax(z_s)[y]) + α·T²·Σ_c p_t,c·(log p_t,c − log p_s,c), with p = softmax(z/T).

    Numerics: both logit tensors are upcast to float32 (float64 stays float64; the result has that dtype,
    float32 for 16-bit and 32-bit logits), divided by T and passed through log_softmax (max-subtracted, so
    large logits do not overflow); the KL is computed from the two log-probabilities (no log of a rounded
    probability), with 0·log 0 = 0 for classes the teacher gives probability 0 (logit −inf). NaN in the
    logits propagates to the loss. Labels are checked to lie in [0, C) or equal -100, which costs one
    device-to-host synchronisation per call.

    Raises:
        TypeError / ValueError naming the argument: temperature ≤ 0 or not finite; alpha outside [0, 1];
        non-tensor arguments or non-floating logits; teacher_logits of another shape than student_logits;
        labels that are not integers or whose shape is not the logits' leading shape; tensors on different
        devices; labels out of range; and no row with a label (all -100, or an empty batch), where the mean
        is undefined.
    """
    temperature, alpha = _check_args(student_logits, teacher_logits, labels, temperature, alpha)
    num_classes = student_logits.shape[-1]
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student = student_logits.reshape(-1, num_classes).to(dtype)
    teacher = teacher_logits.detach().reshape(-1, num_classes).to(dtype)
    target = labels.reshape(-1).long()

    keep = target != IGNORE_INDEX
    out_of_range = keep & ((target < 0) | (target >= num_classes))
    rows = target.numel()
    kept, bad = torch.stack([keep.sum(), out_of_range.sum()]).tolist()  # the one device-to-host sync
    if bad:
        first = int(target[out_of_range][0])
        raise ValueError(f"labels must be class indices in [0, {num_classes}) or {IGNORE_INDEX} (ignored), got "
                         f"{bad} out of range (e.g. {first})")
    if kept == 0:
        raise ValueError(f"labels has no row to average over: all {rows} labels are {IGNORE_INDEX} (ignored)"
                         if rows else "student_logits has no rows: the batch is empty")
    if kept < rows:
        student, teacher, target = student[keep], teacher[keep], target[keep]

    loss = student.new_zeros(())
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * F.cross_entropy(student, target, reduction="sum")
    if alpha > 0.0:
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        p_teacher = log_p_teacher.exp()
        terms = p_teacher * (log_p_teacher - log_p_student)
        terms = torch.where(p_teacher > 0, terms, terms.new_zeros(()))  # 0·log 0 = 0, even against −inf
        loss = loss + (alpha * temperature * temperature) * terms.sum()
    return loss / kept


def num_outputs(model) -> int | None:
    """The size of the logits' last dimension: the LM head's rows, else config.num_labels; None if unknown."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    return num_labels if isinstance(num_labels, int) else None
