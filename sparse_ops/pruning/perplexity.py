"""sparse_ops.perplexity: exp(mean next-token negative log-likelihood) of a causal language model on
held-out text, the measure one-shot pruning is judged by (docs/design.md, "One-shot pruning")."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._progress import progress_bar


def perplexity(model: nn.Module, input_ids: torch.Tensor, seq_len: int = 1024, batch_size: int = 1, *,
               progress: bool = True) -> float:
    """exp(mean NLL) over input_ids (1-D: one token stream; 2-D (N, seq): N streams), each cut into
    non-overlapping windows of seq_len tokens (a stream's last, shorter window counts when it holds
    at least 2 tokens). Every token but a window's first is predicted once; the mean is over them."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 or int32 tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be 1-D or (N, seq), got shape {tuple(input_ids.shape)}")
    for name, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    streams = input_ids.long().reshape(-1, input_ids.shape[-1])
    vocab = model.get_input_embeddings().num_embeddings
    if streams.numel() and (int(streams.min()) < 0 or int(streams.max()) >= vocab):
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the model's vocabulary), got "
                         f"[{int(streams.min())}, {int(streams.max())}]")
    windows = [w for s in streams for w in s.split(seq_len) if w.numel() >= 2]
    if not windows:
        raise ValueError(f"input_ids hold no window of >= 2 tokens (shape {tuple(input_ids.shape)})")
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with torch.no_grad():
            batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
            for batch in progress_bar(batches, enabled=progress, desc="perplexity", unit="batch"):
                for same in _by_length(batch):
                    ids = torch.stack(same).to(device)
                    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
                    nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1), reduction="sum"))
                    count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def _by_length(windows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Windows of one length stack into one batch (only a stream's last window is shorter)."""
    lengths: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        lengths.setdefault(w.numel(), []).append(w)
    return list(lengths.values())
