"""format="auto": the measured choice of a SparseLinear format, and the cache of the decisions.

    choice = choose_format(weight, bias, block_size=(32, 32), tokens=128, build=SparseLinear.from_weight)
    choice.format, choice.ms, choice.cached     # e.g. "csr", {"bsr": 0.21, "csr": 0.12, "dense": 0.30}, False

The candidates (auto_formats) are built from the weight with `build(weight, bias, format, block_size)`
and timed on a random (tokens, in_features) input of the weight's dtype and device (time_forward
unless a timer is given); the fastest wins, dense whenever dense is at least as fast. Decisions are
cached by format_cache_key in a FormatCache (memory, backed by a JSON file). This module knows the
layers only through `build`: sparse_ops.sparse.linear passes SparseLinear.from_weight (its
choose_format and measure_formats, and SparseLinear.from_dense(format="auto"), do so for you).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import formats
from ..ops import timing
from ..ops._extension import has_cuda_kernel
from ..ops.machine import cpu_name
from .formats import AUTO_FORMATS, FORMATS, LAYER_DTYPES, check_format, check_positive_int, semi_structured_unavailable

Timer = Callable[[nn.Module, torch.Tensor], float]
"""timer(layer, x) -> milliseconds of one layer(x) call. Injectable so tests do not depend on timing."""

Builder = Callable[[torch.Tensor, "torch.Tensor | None", str, tuple], nn.Module]
"""build(weight, bias, format, block_size) -> a layer of that format computing F.linear(x, weight, bias)."""


def auto_formats(weight: torch.Tensor) -> tuple[str, ...]:
    """The candidates format="auto" times for this weight: bsr, csr and dense, plus 2:4 where the
    weight is 2:4 and torch's semi-structured path serves its device and dtype."""
    if semi_structured_unavailable(weight.device, weight.dtype) is not None or weight.shape[1] % 4:
        return AUTO_FORMATS
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(2)
    return AUTO_FORMATS + ("2:4",) if bool((groups <= 2).all()) else AUTO_FORMATS


def time_forward(layer: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median time (ms) of layer(x) under no_grad, by sparse_ops.ops.timing: a warm-up call, three timed
    single calls (the fastest sets the batch size), then `repeats` samples, each averaging enough calls
    to last about 1 ms (at most 100)."""
    def call():
        return layer(x)

    with torch.no_grad():
        call()
        once = min(timing.call_ms(call, x.device) for _ in range(3))
        calls = max(1, min(100, int(1.0 / max(once, 1e-3))))
        samples = timing.sample_ms(call, x.device, repeats=repeats, calls=calls)
    return statistics.median(samples)


def measure_formats(weight: torch.Tensor, bias: torch.Tensor | None, candidates=FORMATS, block_size=(32, 32),
                    tokens: int = 128, timer: Timer | None = None, *, build: Builder) -> dict[str, float]:
    """{format: ms} of build(weight, bias, format, block_size) on a random (tokens, in_features) input
    of the weight's dtype and device, timed by `timer` (time_forward unless given)."""
    check_positive_int("tokens", tokens)
    for fmt in candidates:
        check_format(fmt)
    timer = time_forward if timer is None else timer
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(tokens, weight.shape[1], generator=generator, device=weight.device,
                    dtype=torch.float32).to(weight.dtype)
    return {fmt: float(timer(build(weight, bias, fmt, block_size), x)) for fmt in candidates}


@dataclass(frozen=True)
class FormatChoice:
    """The chosen format, the measured ms per candidate, and whether it came from the cache."""

    format: str
    ms: dict[str, float] = field(default_factory=dict)
    cached: bool = False


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{cpu_name()}:{torch.get_num_threads()}threads"


def format_cache_key(weight: torch.Tensor, block_size=(32, 32), tokens: int = 128, has_bias: bool = False) -> str:
    """The key a decision is cached under: device name, torch version, sparse_ops kernels in use,
    dtype, shape, tokens, block size, bias, and the sparsity levels rounded to 1% (the fraction of zero
    entries and of all-zero blocks). It holds the sparsity level, not the pattern: two layers of one
    shape and sparsity share a decision even when their zeros lie elsewhere."""
    from .. import ops

    br, bc = formats.check_block_size(block_size)
    out_features, in_features = weight.shape
    zero = weight == 0
    nbr, nbc = -(-out_features // br), -(-in_features // bc)
    padded = torch.ones(nbr * br, nbc * bc, dtype=torch.bool, device=weight.device)
    padded[:out_features, :in_features] = zero
    empty_blocks = padded.view(nbr, br, nbc, bc).all(3).all(1).float().mean().item()
    if weight.device.type == "cpu":
        backend = "/".join(ops.cpu_backend(op) for op in ("csr_linear", "bsr_linear"))
    else:
        backend = weight.device.type + ("/csr_cuda" if has_cuda_kernel("sparse_ops::csr_linear_cuda") else "")
    fields = [_device_name(weight.device), f"torch={torch.__version__}", f"kernels={backend}",
              f"dtype={str(weight.dtype).replace('torch.', '')}", f"shape={out_features}x{in_features}",
              f"tokens={tokens}", f"block={br}x{bc}", f"bias={has_bias}",
              f"sparsity={zero.float().mean().item():.2f}", f"block_sparsity={empty_blocks:.2f}"]
    return "|".join(fields)


class FormatCache:
    """Decisions of format="auto": a process-wide dict, backed by a JSON file.

    directory: where format_choices.json lives; by default $SPARSE_OPS_CACHE_DIR, else
    ~/.cache/sparse_ops (read when used, not at construction). An empty SPARSE_OPS_CACHE_DIR, or
    directory="", keeps the cache in memory only. A cache file that cannot be read or written is
    ignored with a warning: a cache never breaks an export."""

    FILE_NAME = "format_choices.json"

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = directory
        self.entries: dict[str, dict] = {}

    def path(self) -> str | None:
        directory = self.directory
        if directory is None:
            directory = os.environ.get("SPARSE_OPS_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                                            "sparse_ops"))
        return os.path.join(os.fspath(directory), self.FILE_NAME) if os.fspath(directory) else None

    def _read_file(self) -> dict[str, dict]:
        path = self.path()
        if path is None or not os.path.isfile(path):
            return {}
        try:
            with open(path) as f:
                entries = json.load(f)["entries"]
            return {k: v for k, v in entries.items() if isinstance(v, dict) and v.get("format") in FORMATS}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"sparse_ops: ignoring the unreadable format cache {path} ({exc})", RuntimeWarning,
                          stacklevel=3)
            return {}

    def get(self, key: str) -> dict | None:
        """{"format": ..., "ms": {...}} or None; looks in memory, then in the file."""
        if key not in self.entries:
            entry = self._read_file().get(key)
            if entry is None:
                return None
            self.entries[key] = entry
        return self.entries[key]

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        path = self.path()
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            merged = {**self._read_file(), key: entry}
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "entries": merged}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file
        except OSError as exc:
            warnings.warn(f"sparse_ops: cannot write the format cache {path} ({exc})", RuntimeWarning, stacklevel=3)

    def clear(self) -> None:
        """Forget the decisions held in memory (the file stays)."""
        self.entries.clear()


FORMAT_CACHE = FormatCache()


def choose_format(weight: torch.Tensor, bias: torch.Tensor | None = None, block_size=(32, 32), tokens: int = 128, *,
                  build: Builder, timer: Timer | None = None,
                  cache: FormatCache | None = FORMAT_CACHE) -> FormatChoice:
    """The fastest of dense, csr, bsr(block_size) and, where auto_formats offers it, 2:4 for this weight
    at `tokens` tokens, on its device and in its dtype, each built by `build`; dense whenever dense is at
    least as fast. A decision found in `cache` (key: format_cache_key) is returned without timing;
    cache=None times every call and stores nothing."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in LAYER_DTYPES:
        raise ValueError(f"weight must be a 2-D floating tensor, got {getattr(weight, 'dtype', type(weight))}")
    block_size = formats.check_block_size(block_size)
    check_positive_int("tokens", tokens)
    key = format_cache_key(weight, block_size, tokens, bias is not None) if cache is not None else None
    if cache is not None and (entry := cache.get(key)) is not None:
        return FormatChoice(entry["format"], dict(entry.get("ms", {})), cached=True)
    candidates = auto_formats(weight)
    ms = measure_formats(weight, bias, candidates, block_size, tokens, timer, build=build)
    best = min(candidates, key=lambda fmt: (ms[fmt], fmt != "dense"))
    if cache is not None:
        cache.put(key, {"format": best, "ms": ms})
    return FormatChoice(best, ms, cached=False)
