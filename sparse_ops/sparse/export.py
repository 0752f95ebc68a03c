"""Export a pruned model for inference, and save / load the exported model.

    model = sparse_ops.export(model, format="auto", block_size=(32, 32), tokens=128)
    print(model.sparse_ops_report)               # per layer: shape, sparsity, format, ms, speedup
    sparse_ops.save_exported(model, "model.safetensors")
    skeleton = AutoModel.from_config(config)     # later, anywhere (no GPU needed)
    sparse_ops.load_exported(skeleton, "model.safetensors")

export replaces, in place, the pruned nn.Linear layers of any model (a transformers model included)
by SparseLinear; the weights are copied exactly (zeros are dropped, nothing is rounded). A
transformers Conv1D (GPT-2's layer, y = x·W + b with W stored (in, out)) is replaced the same way by
the SparseLinear of its transposed weight, (out, in), and its bias: the same function of x. Where an
exported linear feeds an exact GELU in a transformers-style intermediate block (a module whose only
children are `dense` and `intermediate_act_fn`, as in BERT, RoBERTa and MiniLM), the GELU is fused
into the sparse op's epilogue (SparseLinear(activation="gelu")) and `intermediate_act_fn` becomes
nn.Identity; fuse_activations=False keeps them apart. The query, key and value linears of an
attention module, exported in one compressed format, run on CPU as one op over their stacked rows
(sparse_ops.sparse.stacked; stack_qkv=False keeps them apart). The saved file is safetensors: every tensor
of model.state_dict() (tensors shared between names stored once), and in its metadata the plan
{module name: {format, block_size, in, out, bias, activation, fused, stacked}} that load_exported
applies to a freshly built dense skeleton before loading the tensors (strict).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import formats
from .linear import (
    FORMAT_CACHE,
    FORMATS,
    FormatCache,
    SparseLinear,
    Timer,
    choose_format,
    measure_formats,
)
from .stacked import StackedLinears, unstackable
from ..pruning.targets import Conv1D, in_out_features, weight_out_in

EXPORT_FORMATS = ("auto",) + FORMATS
KEPT_DENSE = "kept dense"
FORMAT_VERSION = "1"
_VERSION_KEY = "sparse_ops_format_version"
_PLAN_KEY = "sparse_ops_plan"
_REPORT_KEY = "sparse_ops_report"


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One nn.Linear or Conv1D the exporter considered (shape: (out, in) either way). format is "bsr", "csr", "dense" (exported, dense being the
    fastest or asked for) or "kept dense" (not pruned / not matched: left an nn.Linear, not timed).
    ms: measured milliseconds per format at the report's token count ("dense" always, when timed)."""

    name: str
    out_features: int
    in_features: int
    sparsity: float
    format: str
    block_size: tuple[int, int] | None = None
    ms: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    note: str = ""  # why a layer was kept dense when it qualified (e.g. its weight is tied elsewhere)
    activation: str = "none"  # "gelu": the GELU that followed the layer is fused into it
    stacked_with: tuple[str, ...] = ()  # the group (itself included) computed as one op over stacked rows

    @property
    def dense_ms(self) -> float | None:
        return self.ms.get("dense")

    @property
    def sparse_ms(self) -> float | None:
        """ms of the chosen format (equal to dense_ms when dense was chosen)."""
        return self.ms.get(self.format)

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": [self.out_features, self.in_features], "sparsity": self.sparsity,
                "format": self.format, "block_size": list(self.block_size) if self.block_size else None,
                "ms": dict(self.ms), "dense_ms": self.dense_ms, "sparse_ms": self.sparse_ms,
                "speedup": self.speedup, "cached": self.cached, "note": self.note, "activation": self.activation,
                "stacked_with": list(self.stacked_with)}


@dataclass
class ExportReport:
    """What export did: one LayerReport per nn.Linear / Conv1D of the model, plus the timing conditions.
    str() is an aligned table with totals; to_dict() is JSON-ready."""

    layers: list[LayerReport]
    tokens: int
    device: str
    dtype: str

    def exported(self) -> list[LayerReport]:
        return [row for row in self.layers if row.format != KEPT_DENSE]

    def totals(self) -> dict:
        """Sums over the exported layers: dense ms, chosen-format ms, and their ratio."""
        timed = [row for row in self.exported() if row.dense_ms is not None and row.sparse_ms is not None]
        dense = sum(row.dense_ms for row in timed)
        chosen = sum(row.sparse_ms for row in timed)
        return {"layers": len(self.layers), "exported": len(self.exported()),
                "kept_dense": len(self.layers) - len(self.exported()), "dense_ms": dense, "sparse_ms": chosen,
                "speedup": dense / chosen if chosen > 0 else None}

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "device": self.device, "dtype": self.dtype,
                "layers": [row.to_dict() for row in self.layers], "totals": self.totals()}

    def __str__(self) -> str:
        def ms(value):
            return "" if value is None else f"{value:.4f}"

        candidates = [fmt for fmt in FORMATS if fmt != "dense" and any(fmt in row.ms for row in self.layers)]
        header = ["layer", "shape", "sparsity", "format", "dense ms"] + [f"{fmt} ms" for fmt in candidates]
        header += ["chosen ms", "speedup", ""]
        rows = []
        for row in self.layers:
            fmt = row.format + (f" {row.block_size[0]}x{row.block_size[1]}" if row.block_size else "")
            rows.append([row.name, f"{row.out_features}x{row.in_features}", f"{row.sparsity:.3f}", fmt,
                         ms(row.dense_ms)] + [ms(row.ms.get(c)) for c in candidates]
                        + [ms(row.sparse_ms), "" if row.speedup is None else f"{row.speedup:.2f}x",
                           ", ".join(filter(None, ["cached" if row.cached else row.note,
                                                   "+gelu" if row.activation != "none" else "",
                                                   "stacked" if row.stacked_with else ""]))])
        totals = self.totals()
        rows.append(["total", "", "", f"{totals['exported']} of {totals['layers']} exported", ms(totals["dense_ms"])]
                    + [""] * len(candidates)
                    + [ms(totals["sparse_ms"]), "" if totals["speedup"] is None else f"{totals['speedup']:.2f}x", ""])
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        numeric = set(range(2, len(header) - 1)) - {3}

        def line(cells):
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        title = f"sparse_ops export: {self.tokens} tokens, {self.dtype} on {self.device}"
        rule = "-" * len(line(header))
        return "\n".join([title, line(header), rule] + [line(r) for r in rows[:-1]] + [rule, line(rows[-1])])


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def _check_export_args(model, format, patterns, block_size, tokens, min_sparsity, dtype):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _exportable(model):
        raise TypeError(f"model is itself an {type(model).__name__}, which cannot be replaced in place: use "
                        "sparse_ops.SparseLinear.from_dense(model, ...)")
    format_rules = None
    if isinstance(format, dict):
        if not format:
            raise ValueError("format must be a format name or a non-empty dict {regex: format}")
        format_rules = [(_compile("format", pattern), _check_export_format(fmt)) for pattern, fmt in format.items()]
    else:
        _check_export_format(format)
    if patterns is not None:
        if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) or not patterns:
            raise ValueError(f"patterns must be None or a non-empty list of regexes on module names, got {patterns!r}")
        patterns = [_compile("patterns", p) for p in patterns]
    block_size = formats.check_block_size(block_size)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    if (not isinstance(min_sparsity, (int, float)) or isinstance(min_sparsity, bool) or math.isnan(min_sparsity)
            or not 0 <= min_sparsity < 1):
        raise ValueError(f"min_sparsity must lie in [0, 1), got {min_sparsity!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be None or one of float32, float16, bfloat16, float64, got {dtype!r}")
    return format_rules, patterns, block_size


def _check_export_format(fmt) -> str:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {list(EXPORT_FORMATS)} (or a dict regex -> format), got {fmt!r}")
    return fmt


def _compile(argument: str, pattern) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{argument} must hold regex strings, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{argument}: {pattern!r} is not a valid regex ({exc})") from None


def _exportable(module: nn.Module) -> bool:
    """An nn.Linear or a transformers Conv1D, not a subclass (e.g. MultiheadAttention's out_proj, whose
    weight its parent reads directly)."""
    return type(module) is nn.Linear or type(module) is Conv1D


def _as_linear(layer: nn.Module) -> nn.Linear:
    """The layer itself if it is an nn.Linear; for a Conv1D, an nn.Linear computing the same function
    (its weight transposed to (out, in), a contiguous copy; the same bias tensor)."""
    if type(layer) is nn.Linear:
        return layer
    in_features, out_features = in_out_features(layer)
    linear = nn.Linear(in_features, out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight_out_in(layer).detach().contiguous(), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return linear


def _sparsity(weight: torch.Tensor) -> float:
    return 1.0 - torch.count_nonzero(weight).item() / weight.numel()


def _tied_weights(model: nn.Module, linears: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """{linear name: another name of its weight} for the linears whose .weight another module also
    holds (a head tied to the embeddings): replacing such a layer would silently untie them."""
    module_names: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), set()).add(name)
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    tied = {}
    for name, linear in linears:
        own = {f"{n}.weight" if n else "weight" for n in module_names[id(linear)]}
        others = [h for h in holders.get(id(linear.weight), []) if h not in own]
        if others:
            tied[name] = others[0]
    return tied


_ACT_CHILD = "intermediate_act_fn"


def _is_exact_gelu(module: nn.Module) -> bool:
    """nn.GELU() (erf) or transformers' GELUActivation calling F.gelu: what the "gelu" epilogue computes."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is torch.nn.functional.gelu


def _fusable_gelus(model: nn.Module, names: set[str]) -> dict[str, str]:
    """{linear name: name of the GELU module after it} for the linears among `names` that are the `dense`
    of a transformers-style intermediate block: a module whose children are exactly `dense` and
    `intermediate_act_fn` (an exact GELU), whose forward is act(dense(x))."""
    fused = {}
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        if set(children) != {"dense", _ACT_CHILD} or not _is_exact_gelu(children[_ACT_CHILD]):
            continue
        linear_name = f"{parent_name}.dense" if parent_name else "dense"
        if linear_name in names:
            fused[linear_name] = f"{parent_name}.{_ACT_CHILD}" if parent_name else _ACT_CHILD
    return fused


_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))


def _qkv_siblings(model: nn.Module, names: set[str]) -> list[tuple[str, ...]]:
    """The (query, key, value) name triples among `names` that are children of one attention module
    (named query/key/value, q_proj/k_proj/v_proj or q/k/v), nn.Linear layers of one in_features."""
    groups = []
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for trio in _QKV_NAMES:
            layers = [children.get(c) for c in trio]
            if not all(type(m) is nn.Linear for m in layers) or len({m.in_features for m in layers}) != 1:
                continue
            full = tuple(f"{parent_name}.{c}" if parent_name else c for c in trio)
            if all(n in names for n in full) and len({id(m) for m in layers}) == len(layers):
                groups.append(full)
    return groups


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Swap every reference to a replaced module (a module shared under several names included)."""
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])


def export(model: nn.Module, format="auto", *, patterns=None, block_size=(32, 32), tokens: int = 128,
           min_sparsity: float = 0.5, dtype: torch.dtype | None = None, timer: Timer | None = None,
           cache: FormatCache | None = FORMAT_CACHE, fuse_activations: bool = True,
           stack_qkv: bool = True) -> nn.Module:
    """Replace, in place, the pruned nn.Linear and transformers Conv1D layers of `model` by SparseLinear
    and return the model, with its report in `model.sparse_ops_report` (ExportReport).

    Which layers: every module of type nn.Linear or Conv1D (not subclasses: e.g. MultiheadAttention's
    out_proj, whose weight its parent reads directly) whose weight has a fraction of zeros >=
    min_sparsity; or, when `patterns` (regexes, re.search on module names) is given, those layers
    whose name matches one of them, whatever their sparsity. A Conv1D becomes the SparseLinear of its
    weight transposed to (out, in), with its bias. A module shared under several names
    is replaced everywhere. A layer whose weight another module also holds (tied, e.g. a language-model
    head sharing the embeddings) is kept dense with a warning. The others are left as they are and
    listed as "kept dense".
    format: "auto" (time dense, csr and bsr(block_size) at `tokens` tokens on the layer's device and
    keep the fastest: sparse_ops.sparse.linear.choose_format, decisions cached in `cache`), "bsr", "csr", "2:4" or
    "dense" (the chosen format is timed against dense for the report), or a dict {regex: format}
    whose first key matching a layer's name decides it ("auto" when none matches).
    dtype: convert the whole model to it first (None keeps the model's dtype).
    timer: timer(layer, x) -> ms, time_forward unless given. Weights and biases are copied bit for bit.
    fuse_activations: fuse the exact GELU of transformers-style intermediate blocks into their exported
    `dense` (see the module docstring); the report marks those layers "+gelu".
    stack_qkv: where the query, key and value linears of an attention module are all exported in one
    compressed format (csr/2:4, or bsr), compute them on CPU as one op over their stacked rows
    (sparse_ops.sparse.stacked.StackedLinears: x read and packed once, one kernel call instead of three; the
    modules and their state_dict stay as they are). The report marks them "stacked".
    """
    format_rules, patterns, block_size = _check_export_args(model, format, patterns, block_size, tokens,
                                                            min_sparsity, dtype)
    linears = [(name, m) for name, m in model.named_modules() if _exportable(m)]
    if not linears:
        raise ValueError("model has no nn.Linear or Conv1D layer: a model with nothing to prune cannot be exported")
    sparsities = {name: _sparsity(m.weight.detach()) for name, m in linears}
    if patterns is not None:
        selected = [name for name, _ in linears if any(p.search(name) for p in patterns)]
        if not selected:
            raise ValueError(f"patterns {[p.pattern for p in patterns]} match none of the model's nn.Linear / "
                             f"Conv1D layers (e.g. {[name for name, _ in linears[:3]]}): a model with nothing to prune")
    else:
        selected = [name for name, _ in linears if sparsities[name] >= min_sparsity]
        if not selected:
            raise ValueError(f"no nn.Linear or Conv1D of the model has sparsity >= min_sparsity={min_sparsity} (the sparsest has "
                             f"{max(sparsities.values()):.3f}): a model with nothing to prune")
    selected = set(selected)
    tied = {name: other for name, other in _tied_weights(model, linears).items() if name in selected}
    for name, other in tied.items():
        warnings.warn(f"export: {name} is kept dense: its weight is also {other} (tied), which a sparse layer "
                      "would silently untie", stacklevel=2)
    selected -= set(tied)
    if not selected:
        raise ValueError(f"every selected layer has a tied weight ({sorted(tied)}): a model with nothing to "
                         "export")
    for flag, value in (("fuse_activations", fuse_activations), ("stack_qkv", stack_qkv)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    gelus = _fusable_gelus(model, selected) if fuse_activations else {}
    if dtype is not None:  # only now: a rejected export leaves the model untouched
        model.to(dtype)
        sparsities = {name: _sparsity(m.weight.detach()) for name, m in linears}
    rows, replacements = [], {}
    for name, layer in linears:
        in_features, out_features = in_out_features(layer)
        if name not in selected:
            note = f"tied to {tied[name]}" if name in tied else ""
            rows.append(LayerReport(name, out_features, in_features, sparsities[name], KEPT_DENSE, note=note))
            continue
        fmt = format if format_rules is None else next((f for p, f in format_rules if p.search(name)), "auto")
        linear = _as_linear(layer)
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        cached = False
        try:
            if fmt == "auto":
                choice = choose_format(weight, bias, block_size, tokens, timer=timer, cache=cache)
                fmt, ms, cached = choice.format, choice.ms, choice.cached
            else:
                ms = measure_formats(weight, bias, tuple(dict.fromkeys(("dense", fmt))), block_size, tokens, timer)
            activation = "gelu" if name in gelus else "none"
            replacements[id(layer)] = SparseLinear.from_dense(linear, fmt, block_size, activation=activation)
        except ValueError as exc:  # e.g. format "2:4" for a weight that is not: name the layer
            raise ValueError(f"export of {name} as {fmt!r}: {exc}") from None
        rows.append(LayerReport(name, out_features, in_features, sparsities[name], fmt,
                                block_size if fmt == "bsr" else None, ms, cached, activation=activation))
    if stack_qkv:
        by_name = {row.name: row for row in rows}
        for names in _qkv_siblings(model, selected):
            layers = [replacements[id(model.get_submodule(n))] for n in names]
            if unstackable(layers) is None:
                StackedLinears(layers).prepare()
                for n in names:
                    by_name[n].stacked_with = names
    _replace_modules(model, replacements)
    for act_name in gelus.values():  # its work is now the epilogue of the layer before it
        _set_submodule(model, act_name, nn.Identity())
    model.sparse_ops_fused = dict(gelus)
    first = linears[0][1].weight
    model.sparse_ops_report = ExportReport(rows, tokens, str(first.device), str(first.dtype).replace("torch.", ""))
    return model


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
def _plan(model: nn.Module) -> dict[str, dict]:
    fused = getattr(model, "sparse_ops_fused", {})
    names = {id(m): name for name, m in model.named_modules()}

    def stacked(m: SparseLinear):
        if m._stack is None or not all(id(x) in names for x in m._stack[0].members):
            return None
        return [names[id(x)] for x in m._stack[0].members]

    return {name: {"format": m.format, "block_size": list(m.block_size) if m.block_size else None,
                   "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                   "activation": m.activation, "fused": fused.get(name), "stacked": stacked(m)}
            for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def save_exported(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every tensor of model.state_dict() to the safetensors file `path` (tensors shared between
    names are stored once), with the export plan and format version in its metadata (and the export
    report, when the model has one). Tensors are written as they are: no dtype change."""
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = _plan(model)
    if not plan:
        raise ValueError("model holds no SparseLinear: export it with sparse_ops.export before save_exported")
    metadata = {_VERSION_KEY: FORMAT_VERSION, _PLAN_KEY: json.dumps(plan, sort_keys=True)}
    report = getattr(model, "sparse_ops_report", None)
    if isinstance(report, ExportReport):
        metadata[_REPORT_KEY] = json.dumps(report.to_dict())
    save_model(model, os.fspath(path), metadata=metadata)


def read_plan(path: str | os.PathLike) -> dict[str, dict]:
    """The export plan stored in a file written by save_exported."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {os.fspath(path)!r} is not a file")
    with safe_open(os.fspath(path), "pt") as f:
        metadata = f.metadata() or {}
    if _PLAN_KEY not in metadata:
        raise ValueError(f"path {os.fspath(path)!r} was not written by sparse_ops.save_exported (no export plan "
                         "in its metadata)")
    if metadata.get(_VERSION_KEY) != FORMAT_VERSION:
        raise ValueError(f"path {os.fspath(path)!r} has sparse_ops format version {metadata.get(_VERSION_KEY)!r}; "
                         f"this sparse_ops reads version {FORMAT_VERSION}")
    return json.loads(metadata[_PLAN_KEY])


def load_exported(model: nn.Module, path: str | os.PathLike, *, device: torch.device | str | None = None) -> nn.Module:
    """Load a file written by save_exported into `model`, a freshly built dense skeleton of the same
    architecture (e.g. AutoModel.from_config(config)): each nn.Linear or Conv1D the plan names becomes an empty
    SparseLinear of the saved format (in the skeleton's dtype: build the skeleton in the saved dtype
    for a bit-exact load), then every tensor is loaded (strict: missing or unexpected keys raise).
    device: move the model there and load the tensors onto it (None: load where the model is; every
    format has a CPU kernel, so no GPU is needed). Returns the model, modified in place and in eval
    mode: exported layers are for inference, and a skeleton from from_config starts in training mode
    (dropout on)."""
    from safetensors.torch import load_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plan = read_plan(path)
    replacements = {}
    for name, spec in plan.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the file's plan names module {name!r}, which model lacks: build model with the "
                             "architecture that was exported") from None
        if isinstance(module, SparseLinear):
            dtype, where = module.dtype, module.device
            shape = (module.out_features, module.in_features, module.bias is not None)
        elif isinstance(module, (nn.Linear, Conv1D)):
            dtype, where = module.weight.dtype, module.weight.device
            shape = in_out_features(module)[::-1] + (module.bias is not None,)
        else:
            raise TypeError(f"model.{name} is a {type(module).__name__}; the file holds a SparseLinear there, so "
                             "model must have an nn.Linear, a Conv1D (or a SparseLinear) at that name")
        if shape != (spec["out"], spec["in"], spec["bias"]):
            raise ValueError(f"model.{name} has (out, in, bias) = {shape}, the file has "
                             f"{(spec['out'], spec['in'], spec['bias'])}")
        replacements[id(module)] = SparseLinear(spec["in"], spec["out"], spec["format"],
                                                spec["block_size"] or (32, 32), bias=spec["bias"], dtype=dtype,
                                                device=where, activation=spec.get("activation", "none"))
    fused = {name: spec["fused"] for name, spec in plan.items() if spec.get("fused")}
    for name, act_name in fused.items():
        try:
            act = model.get_submodule(act_name)
        except AttributeError:
            raise ValueError(f"the file's plan fuses {act_name!r} into {name!r}, but model has no module "
                             f"{act_name!r}: build model with the architecture that was exported") from None
        if not (_is_exact_gelu(act) or isinstance(act, nn.Identity)):
            raise ValueError(f"the file's plan fuses the GELU {act_name!r} into {name!r}, but model has a "
                             f"{type(act).__name__} there")
    _replace_modules(model, replacements)
    for act_name in fused.values():
        _set_submodule(model, act_name, nn.Identity())
    model.sparse_ops_fused = fused
    if device is not None:
        model.to(device)
    load_model(model, os.fspath(path), strict=True, device=str(device) if device is not None else "cpu")
    for names in {tuple(spec["stacked"]) for spec in plan.values() if spec.get("stacked")}:
        StackedLinears([model.get_submodule(n) for n in names]).prepare()
    return model.eval()
