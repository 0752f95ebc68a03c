"""sparse_ops.oneshot: prune a model once from calibration data, block by block (docs/design.md,
"One-shot pruning with calibration").

The calibration sequences run through the model's repeated blocks in order. Block l receives the
outputs of blocks < l after they were pruned (and, for SparseGPT, updated); only one block's inputs
and outputs are held at a time, so memory does not grow with depth, and with `device` the rest of
the model stays where it is while one block at a time runs there.

Inside a block the targets are grouped by the input they read (q, k and v read one tensor; gate
and up another) in the order the block computes them. Wanda and magnitude take every group's
statistics from one forward of the still-dense block; SparseGPT prunes the groups in order, each
from inputs that the already pruned groups produced. The per-method rules live in wanda.py,
sparsegpt.py and magnitude.py (magnitude_mask).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._progress import progress_bar
from . import ONESHOT_METHODS
from .magnitude import magnitude_mask
from .sparsegpt import sparsegpt_prune
from .targets import find_targets, in_out_features, repeated_blocks, weight_out_in
from .wanda import wanda_mask


@dataclasses.dataclass
class LayerResult:
    """One pruned layer: the fraction of its weights that are zero, and the relative reconstruction
    error ‖(W − Ŵ)X‖²/‖WX‖² on the calibration inputs it was pruned from."""

    name: str
    in_features: int
    out_features: int
    sparsity: float
    error: float


@dataclasses.dataclass
class OneshotReport:
    method: str
    granularity: str
    sparsity: float  # asked (for N:M, 1 − N/M)
    calibration_sequences: int
    calibration_tokens: int
    seconds: float
    layers: list[LayerResult]

    @property
    def sparsity_reached(self) -> float:
        """Zeros over weights, over all pruned layers."""
        total = sum(r.in_features * r.out_features for r in self.layers)
        return sum(r.sparsity * r.in_features * r.out_features for r in self.layers) / total

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sparsity_reached": self.sparsity_reached}

    def __str__(self) -> str:
        lines = [f"{self.method} {self.granularity} (sparsity {self.sparsity:.3f}): {len(self.layers)} layers, "
                 f"sparsity reached {self.sparsity_reached:.4f}, {self.calibration_sequences} calibration "
                 f"sequences ({self.calibration_tokens} tokens), {self.seconds:.1f} s",
                 f"{'layer':<48} {'shape':>12} {'sparsity':>9} {'rel. error':>11}"]
        lines += [f"{r.name:<48} {f'{r.out_features}x{r.in_features}':>12} {r.sparsity:>9.4f} {r.error:>11.3e}"
                  for r in self.layers]
        return "\n".join(lines)


def parse_granularity(granularity: str) -> tuple[int, int] | None:
    """None for "element"; (N, M) for "N:M" with 0 < N < M (keep N of every M)."""
    if granularity == "element":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", granularity) if isinstance(granularity, str) else None
    if not match:
        raise ValueError(f'granularity must be "element" or "N:M" such as "2:4", got {granularity!r}')
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"granularity {granularity!r}: N:M needs 0 < N < M (keep N of every M)")
    return n, m


def oneshot(model: nn.Module, calibration, method: str = "wanda", sparsity: float | None = None,
            granularity: str = "element", *, targets: Iterable[str] | None = None, exclude: Iterable[str] = (),
            device: torch.device | str | None = None, progress: bool = True) -> OneshotReport:
    """Prune `model` in place from calibration data and return an OneshotReport.

    method: "wanda", "sparsegpt" or "magnitude" (per matrix). sparsity: the fraction pruned per
    layer, in [0, 1) (default 0.5); for granularity "N:M" it is 1 − N/M and may be left out.
    calibration: a LongTensor of input ids (N, seq) or (seq,), or an iterable of such batches or of
    dicts with input_ids (and attention_mask: padded tokens are left out of the statistics).
    targets / exclude: regular expressions on module names (default: every nn.Linear and Conv1D
    inside the repeated blocks). device: where each block runs (default: where it is).
    The model is left a plain model with zeros in place; invalid arguments leave it untouched."""
    if method not in ONESHOT_METHODS:
        raise ValueError(f"method must be one of {ONESHOT_METHODS}, got {method!r}")
    n_m = parse_granularity(granularity)
    sparsity = _check_sparsity(sparsity, n_m)
    layers = find_targets(model, targets, exclude)
    if n_m is not None:
        for name, module in layers:
            if in_out_features(module)[0] % n_m[1]:
                raise ValueError(f"granularity {granularity!r}: {name} has {in_out_features(module)[0]} input "
                                 f"features, which M={n_m[1]} does not divide")
    blocks = _blocks_holding(model, layers)
    batches = _calibration_batches(calibration, model)

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    results: dict[str, LayerResult] = {}
    try:
        with torch.no_grad():
            inputs = _block_inputs(model, blocks[0], batches, device)
            for block in progress_bar(blocks, enabled=progress, desc=f"oneshot {method}", unit="block"):
                home = next(block.parameters()).device
                if device is not None:
                    block.to(device)
                mine = [(name, m) for name, m in layers if any(m is x for x in block.modules())]
                if mine:
                    prune = _prune_sequentially if method == "sparsegpt" else _prune_from_dense
                    for r in prune(block, mine, inputs, method, sparsity, n_m):
                        results[r.name] = r
                inputs = [(_run(block, call), call[1], call[2], call[3]) for call in inputs]
                if device is not None:
                    block.to(home)
    finally:
        model.train(was_training)
    return OneshotReport(method=method, granularity=granularity, sparsity=sparsity,
                         calibration_sequences=sum(b["input_ids"].shape[0] for b in batches),
                         calibration_tokens=sum(int(_token_mask(b).sum()) for b in batches),
                         seconds=time.perf_counter() - start,
                         layers=[results[name] for name, _ in layers])


# -- arguments -----------------------------------------------------------------------------------
def _check_sparsity(sparsity: float | None, n_m: tuple[int, int] | None) -> float:
    if n_m is not None:
        implied = 1.0 - n_m[0] / n_m[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-12:
            raise ValueError(f"sparsity={sparsity!r} contradicts granularity {n_m[0]}:{n_m[1]}, which prunes "
                             f"{implied:g}; leave sparsity out for N:M")
        return implied
    sparsity = 0.5 if sparsity is None else sparsity
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _blocks_holding(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[nn.Module]:
    """The repeated blocks of the one stack that holds every target."""
    for stack_name, stack in repeated_blocks(model):
        if all(name.startswith(stack_name + ".") for name, _ in layers):
            return list(stack)
    raise ValueError(f"targets: one-shot pruning runs block by block, so every target must lie in one stack "
                     f"of repeated blocks ({[n for n, _ in repeated_blocks(model)]}); got {[n for n, _ in layers][:8]}")


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return getattr(embedding, "num_embeddings", None)


def _calibration_batches(calibration, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Calibration as a list of {"input_ids": (B, S), optional "attention_mask"} dicts, checked."""
    if isinstance(calibration, torch.Tensor) or isinstance(calibration, Mapping):
        calibration = [calibration]
    if not isinstance(calibration, Iterable) or isinstance(calibration, (str, bytes)):
        raise TypeError(f"calibration must be a LongTensor of input ids or an iterable of batches, got "
                        f"{type(calibration).__name__}")
    vocab = _vocab_size(model)
    batches = []
    for i, item in enumerate(calibration):
        batch = dict(item) if isinstance(item, Mapping) else {"input_ids": item}
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calibration[{i}]: input_ids must be an int64 or int32 tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        ids = ids.long().unsqueeze(0) if ids.dim() == 1 else ids.long()
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibration[{i}]: input_ids must be non-empty (batch, seq), got shape {tuple(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(f"calibration[{i}]: input ids must lie in [0, {vocab}) (the model's vocabulary), "
                             f"got ids in [{low}, {high}]")
        batch["input_ids"] = ids
        if batch.get("attention_mask") is not None and batch["attention_mask"].shape != ids.shape:
            raise ValueError(f"calibration[{i}]: attention_mask has shape {tuple(batch['attention_mask'].shape)}, "
                             f"input_ids {tuple(ids.shape)}")
        batches.append(batch)
    if not batches:
        raise ValueError("calibration is empty: one-shot pruning needs at least one sequence of input ids")
    return batches


def _token_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


# -- running blocks ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised from a hook to end a forward early once what it needs has been seen."""


def _to(x, device):
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _block_inputs(model: nn.Module, first: nn.Module, batches, device) -> list[tuple]:
    """(hidden, other positional args, kwargs, token mask) of the first block's call, per batch."""
    calls: list[tuple] = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append((_to(hidden, device), _to(tuple(args[1:]), device), _to(dict(kwargs), device)))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    try:
        for batch in batches:
            try:
                model(**_to(batch, _input_device(model)), **extra)
            except _Stop:
                continue
            raise RuntimeError("the model's forward never reached its first repeated block")
    finally:
        handle.remove()
    return [(*call, _token_mask(batch).reshape(-1)) for call, batch in zip(calls, batches)]


def _input_device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return (embedding.weight if embedding is not None else next(model.parameters())).device


def _run(block: nn.Module, call: tuple) -> torch.Tensor:
    out = block(call[0], *call[1], **call[2])
    return out[0] if isinstance(out, (tuple, list)) else out


class _InputStats:
    """Σ x xᵀ (float64; the products in float32 unless x is float64) and Σ x² (float64) of one layer's inputs, over the
    calibration tokens (padding left out)."""

    def __init__(self, in_features: int, device):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, token_mask: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if token_mask.numel() == x.shape[0] and not bool(token_mask.all()):
            x = x[token_mask.to(x.device)]
        xg = x if x.dtype == torch.float64 else x.float()
        self.gram += (xg.t() @ xg).double()
        self.sq_sum += x.double().square().sum(dim=0)


def _input_groups(block: nn.Module, layers: list[tuple[str, nn.Module]], call: tuple) -> list[list[tuple[str, nn.Module]]]:
    """The block's targets in the order it calls them, grouped by the input tensor they read."""
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(
        lambda mod, args, out, name=name: seen.append((name, mod, args[0])) if not any(mod is s[1] for s in seen)
        else None) for name, m in layers]
    try:
        _run(block, call)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, m in layers if not any(m is s[1] for s in seen)]
    if missing:
        raise ValueError(f"targets {missing} are never called by their block's forward, so calibration cannot reach them")
    groups: list[list[tuple[str, nn.Module]]] = []
    last = None
    for name, module, x in seen:
        if groups and x is last:
            groups[-1].append((name, module))
        else:
            groups.append([(name, module)])
        last = x
    return groups


def _collect(block: nn.Module, groups: list[list[tuple[str, nn.Module]]], inputs: list[tuple]) -> list[_InputStats]:
    """Input statistics of each group's layers over every calibration batch; the forward stops once
    the last group has been seen."""
    stats = [_InputStats(in_out_features(g[0][1])[0], inputs[0][0].device) for g in groups]
    current: dict[str, torch.Tensor] = {}

    def hook(index):
        def record(module, args, out):
            stats[index].add(args[0], current["mask"])
            if index == len(groups) - 1:
                raise _Stop
        return record

    handles = [g[0][1].register_forward_hook(hook(i)) for i, g in enumerate(groups)]
    try:
        for call in inputs:
            current["mask"] = call[3]
            try:
                _run(block, call)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def _apply(name: str, module: nn.Module, new_weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> LayerResult:
    """Write the pruned weight into the layer and measure it."""
    view = weight_out_in(module)
    old = view.to(torch.float64, copy=True)
    new = new_weight.masked_fill(mask, 0.0)
    view.copy_(new.to(view.dtype))
    new = view.double()  # as stored
    diff = old - new
    denominator = float(((old @ gram) * old).sum())
    error = float(((diff @ gram) * diff).sum()) / denominator if denominator > 0 else 0.0
    in_f, out_f = in_out_features(module)
    return LayerResult(name, in_f, out_f, float((view == 0).sum()) / view.numel(), error)


def _prune_from_dense(block, layers, inputs, method, sparsity, n_m) -> list[LayerResult]:
    """Wanda and magnitude: every group's statistics from one forward of the still-dense block."""
    groups = _input_groups(block, layers, inputs[0])
    stats = _collect(block, groups, inputs)
    results = []
    for group, st in zip(groups, stats):
        for name, module in group:
            w = weight_out_in(module)
            if method == "wanda":
                mask = wanda_mask(w, st.sq_sum, sparsity, n_m)
            else:
                mask = magnitude_mask(w, sparsity, n_m)
            results.append(_apply(name, module, w.double(), mask, st.gram))
    return results


def _prune_sequentially(block, layers, inputs, method, sparsity, n_m) -> list[LayerResult]:
    """SparseGPT: each group pruned and updated from inputs the already pruned groups produced."""
    groups = _input_groups(block, layers, inputs[0])
    results = []
    for group in groups:
        (st,) = _collect(block, [group], inputs)
        for name, module in group:
            new, mask = sparsegpt_prune(weight_out_in(module), st.gram, sparsity, n_m)
            results.append(_apply(name, module, new, mask, st.gram))
    return results
