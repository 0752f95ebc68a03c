"""Which layers of a model are pruned (docs/design.md §2.8, "Targets: which layers are pruned").

A prunable layer is an nn.Linear (weight (out, in), y = x·Wᵀ + b) or a transformers Conv1D (GPT-2's
layer: weight stored (in, out), y = x·W + b). By default the targets are the prunable layers inside
the model's repeated blocks, the ModuleList of layers (BERT's encoder.layer, Llama's model.layers,
GPT-2's transformer.h, OPT's decoder.layers), and nothing outside them: embeddings, pooler,
classifier and lm_head stay dense. Regular expressions on module names override the default.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; without it there is simply no Conv1D to find
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        """Stand-in that no module is an instance of."""


def is_prunable(module: nn.Module) -> bool:
    """An nn.Linear or a transformers Conv1D (subclasses included)."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """True for a Conv1D, whose weight is stored (in, out)."""
    return isinstance(module, Conv1D)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), a view of the parameter's data (transposed for a Conv1D)."""
    w = module.weight.data
    return w.t() if is_transposed(module) else w


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(name, ModuleList) of every outermost ModuleList whose children are all of one class and each
    hold a prunable layer: the stacks of transformer blocks (an encoder-decoder model has two)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue  # nested inside a stack already found (e.g. a block's experts)
        children = list(module)
        if len({type(c) for c in children}) != 1:
            continue
        if all(any(is_prunable(m) for m in c.modules()) for c in children):
            found.append((name, module))
    return found


def find_targets(model: nn.Module, targets: Iterable[str] | None = None,
                 exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer to prune, in the model's order.

    targets None: every prunable layer inside the repeated blocks; otherwise every prunable layer
    whose name matches one of the regular expressions (re.search). Either way, layers whose name
    matches an `exclude` expression are left out. Raises ValueError, naming `targets`, when nothing
    is found, so that a model is never silently left unpruned."""
    exclude_re = [re.compile(p) for p in exclude]
    prunable = [(name, m) for name, m in model.named_modules() if is_prunable(m)]
    if targets is None:
        stacks = [name for name, _ in repeated_blocks(model)]
        if not stacks:
            raise ValueError(f"targets=None: {type(model).__name__} has no repeated blocks (a ModuleList of "
                             f"layers holding nn.Linear or Conv1D); pass targets= regular expressions naming "
                             f"the layers to prune (its layers include {[n for n, _ in prunable][:8]})")
        found = [(name, m) for name, m in prunable
                 if any(name.startswith(s + ".") for s in stacks)]
        wanted = f"the layers of the repeated blocks {stacks}"
    else:
        include_re = [re.compile(p) for p in targets]
        found = [(name, m) for name, m in prunable if any(p.search(name) for p in include_re)]
        wanted = f"targets {[p.pattern for p in include_re]}"
    found = [(name, m) for name, m in found if not any(p.search(name) for p in exclude_re)]
    if not found:
        raise ValueError(f"targets: no nn.Linear or Conv1D of the model matches {wanted} (minus exclude "
                         f"{[p.pattern for p in exclude_re]}); its layers include {[n for n, _ in prunable][:8]}")
    return found
