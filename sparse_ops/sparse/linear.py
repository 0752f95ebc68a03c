"""SparseLinear: an inference-only nn.Linear whose weight is stored as BSR, CSR or dense.

    layer = SparseLinear.from_dense(linear, format="bsr", block_size=(32, 32))
    y = layer(x)                      # x (..., in_features) -> y (..., out_features)

Numerics: y = x @ Wᵀ + bias with values and bias in the layer's dtype (float32, float16, bfloat16 or
float64), accumulated in float32 (float64 for float64) and rounded once, through
torch.ops.sparse_ops.bsr_linear / csr_linear (F.linear for "dense"). Nothing here builds a sparse
tensor subclass, so torch.compile(fullgraph=True) traces the forward. Gradients reach x and the bias,
never the stored weight (an inference layer; the backward densifies W, it is not a fast path).

The weight lives in buffers, so .to(device/dtype), .half(), state_dict() and load_state_dict() work;
index buffers (crow_indices, col_indices) stay int32 whatever dtype the module is converted to.
A layer loads any saved layer of its format and shape, whatever its number of stored entries (and,
for BSR, its block size): the loaded indices are validated before anything is replaced.

format="auto" (from_dense) times the candidates on the layer's device and keeps the fastest: see
choose_format and FormatCache.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from ..ops import reference
from ..ops._extension import has_cpu_kernel, has_cuda_kernel
from ..ops.machine import cpu_name
from ..ops import ACTIVATIONS, NARROW_INDEX_LIMIT, forced_backend

FORMATS = ("bsr", "csr", "2:4", "dense")
AUTO_FORMATS = ("bsr", "csr", "dense")  # what format="auto" times everywhere; auto_formats adds 2:4 on CUDA
_ROW_COMPRESSED = ("csr", "2:4")  # stored as CSR (2:4 also as torch's semi-structured tensor on CUDA)
_SEMI_DTYPES = (torch.float16, torch.bfloat16)
_INDEX_BUFFERS = ("crow_indices", "col_indices")
_COMPRESSED = ("crow_indices", "col_indices", "values")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor_version(t: torch.Tensor | None) -> int | None:
    """t._version (bumped by every in-place write), or None for None and for inference tensors
    (made under torch.inference_mode), which keep no version counter: for those only a new tensor
    (identity) is noticed, not an in-place write."""
    return None if t is None or t.is_inference() else t._version


def call_fast(fast: tuple, x: torch.Tensor, out_features: int, activation: str = "none",
              check_indices: bool = False) -> torch.Tensor:
    """One direct call of a CPU kernel, on validated buffers unless check_indices (then the kernel checks
    the indices itself, O(nnz)): fast = (kernel, crow, col, values, bias), x (..., in_features) ->
    (..., out_features)."""
    kernel, crow, col, values, bias = fast
    if x.dim() == 2:
        return kernel(x, crow, col, values, bias, out_features, activation, check_indices)
    y = kernel(x.reshape(-1, x.shape[-1]), crow, col, values, bias, out_features, activation, check_indices)
    return y.view(*x.shape[:-1], out_features)


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_format(format, allowed=FORMATS) -> str:
    if format not in allowed:
        raise ValueError(f"format must be one of {list(allowed)}, got {format!r}")
    return format


# ----------------------------------------------------------------------------------------------
# format="auto": timing the candidates, and caching the decision
# ----------------------------------------------------------------------------------------------
Timer = Callable[[nn.Module, torch.Tensor], float]
"""timer(layer, x) -> milliseconds of one layer(x) call. Injectable so tests do not depend on timing."""


def semi_structured_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's semi-structured 2:4 path (cuSPARSELt / CUTLASS) cannot serve a layer on this device
    and dtype, or None when it can: CUDA, compute capability 8.0 or newer, fp16 or bf16."""
    if device.type != "cuda":
        return f"device {device.type} (the semi-structured kernels are CUDA only)"
    if dtype not in _SEMI_DTYPES:
        return f"dtype {dtype} (the semi-structured kernels take float16 or bfloat16)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(device)} (needs 8.0+)"
    return None


_FALLBACK_WARNED: set[str] = set()


def _warn_fallback(reason: str) -> None:
    if reason not in _FALLBACK_WARNED:  # once per reason and process
        _FALLBACK_WARNED.add(reason)
        warnings.warn(f"SparseLinear format='2:4' computes through CSR here: {reason}", RuntimeWarning, stacklevel=4)


def auto_formats(weight: torch.Tensor) -> tuple[str, ...]:
    """The candidates format="auto" times for this weight: bsr, csr and dense, plus 2:4 where the
    weight is 2:4 and torch's semi-structured path serves its device and dtype."""
    if semi_structured_unavailable(weight.device, weight.dtype) is not None or weight.shape[1] % 4:
        return AUTO_FORMATS
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(2)
    return AUTO_FORMATS + ("2:4",) if bool((groups <= 2).all()) else AUTO_FORMATS


def time_forward(layer: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time (ms) of layer(x) under no_grad: a warm-up call, three timed single calls (the
    fastest sets the batch size), then `repeats` samples, each averaging enough calls to last about
    1 ms (at most 100); CUDA is synchronised around every timed region."""
    def sync():
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    def seconds(calls):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        sync()
        return (time.perf_counter() - start) / calls

    with torch.no_grad():
        layer(x)
        once = min(seconds(1) for _ in range(3))
        calls = max(1, min(100, int(1e-3 / max(once, 1e-6))))
        samples = [seconds(calls) for _ in range(repeats)]
    return statistics.median(samples) * 1e3


def measure_formats(weight: torch.Tensor, bias: torch.Tensor | None, candidates=FORMATS, block_size=(32, 32),
                    tokens: int = 128, timer: Timer | None = None) -> dict[str, float]:
    """{format: ms} of SparseLinear(format) built from (weight, bias) on a random (tokens, in_features)
    input of the weight's dtype and device, timed by `timer` (time_forward unless given)."""
    _check_positive_int("tokens", tokens)
    for fmt in candidates:
        _check_format(fmt)
    timer = time_forward if timer is None else timer
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(tokens, weight.shape[1], generator=generator, device=weight.device,
                    dtype=torch.float32).to(weight.dtype)
    return {fmt: float(timer(SparseLinear._from_weight(weight, bias, fmt, block_size), x)) for fmt in candidates}


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
                  timer: Timer | None = None, cache: FormatCache | None = FORMAT_CACHE) -> FormatChoice:
    """The fastest of dense, csr, bsr(block_size) and, where auto_formats offers it, 2:4 for this weight
    at `tokens` tokens, on its device and in its dtype; dense whenever dense is at least as fast. A
    decision found in `cache` (key: format_cache_key) is returned without timing; cache=None times
    every call and stores nothing."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in _DTYPES:
        raise ValueError(f"weight must be a 2-D floating tensor, got {getattr(weight, 'dtype', type(weight))}")
    block_size = formats.check_block_size(block_size)
    _check_positive_int("tokens", tokens)
    key = format_cache_key(weight, block_size, tokens, bias is not None) if cache is not None else None
    if cache is not None and (entry := cache.get(key)) is not None:
        return FormatChoice(entry["format"], dict(entry.get("ms", {})), cached=True)
    candidates = auto_formats(weight)
    ms = measure_formats(weight, bias, candidates, block_size, tokens, timer)
    best = min(candidates, key=lambda fmt: (ms[fmt], fmt != "dense"))
    if cache is not None:
        cache.put(key, {"format": best, "ms": ms})
    return FormatChoice(best, ms, cached=False)


class SparseLinear(nn.Module):
    """y = x @ Wᵀ + bias with W (out_features × in_features) held as "bsr", "csr", "2:4" or "dense".

    Buffers: bsr/csr/2:4 -> crow_indices (int32), col_indices (int32), values ((nnz_blocks, br, bc) for
    bsr, (nnz,) for csr and 2:4); dense -> weight (out, in); and bias (out,) or None. A new layer holds
    an all-zero weight; fill it with from_dense or load_state_dict.

    "2:4": at most 2 non-zeros in every 4 consecutive entries of a row (checked; the error names the
    first offending group). On CUDA in fp16/bf16 on sm_80+ the forward runs torch's semi-structured
    sparsity (torch.sparse.to_sparse_semi_structured: cuSPARSELt or CUTLASS), built from the CSR
    buffers whenever the layer is built, loaded or moved; elsewhere (CPU, fp32, shapes the
    semi-structured kernels refuse) it computes the same product through csr_linear, with a one-time
    warning. The state_dict is the CSR triple either way, so save and load stay exact.
    """

    def __init__(self, in_features: int, out_features: int, format: str, block_size=(32, 32), bias: bool = True,
                 dtype: torch.dtype | None = None, device=None, activation: str = "none"):
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.format = _check_format(format)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        br, bc = formats.check_block_size(block_size)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype}")
        kw = {"dtype": dtype, "device": device}
        index = {"dtype": formats.INDEX_DTYPE, "device": device}
        if format == "dense":
            self.register_buffer("weight", torch.zeros(out_features, in_features, **kw))
        else:
            row_compressed = format in _ROW_COMPRESSED
            rows = out_features if row_compressed else -(-out_features // br)
            self.register_buffer("crow_indices", torch.zeros(rows + 1, **index))
            self.register_buffer("col_indices", torch.zeros(0, **index))
            shape = (0,) if row_compressed else (0, br, bc)
            self.register_buffer("values", torch.zeros(shape, **kw))
        self.register_buffer("bias", torch.zeros(out_features, **kw) if bias else None)
        self._stack = None  # (StackedLinears, index) when computed with siblings reading the same input
        self._build_derived()

    def __getstate__(self):
        # what the forward derives from the buffers is rebuilt, not copied (deepcopy, pickle)
        return {**self.__dict__, "_semi": None, "_fast": None, "_validated": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_stack", None)
        self._build_derived()

    # ------------------------------------------------------------------------------------------
    # construction and conversion
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, format: str = "auto", block_size=(32, 32), tokens: int = 128, *,
                   timer: Timer | None = None, cache: FormatCache | None = FORMAT_CACHE,
                   activation: str = "none") -> SparseLinear:
        """A SparseLinear computing F.linear(x, linear.weight, linear.bias), in the weight's dtype and
        on its device; zeros of the weight are not stored (bsr stores every block holding a non-zero).
        activation="gelu" computes F.gelu of that (exact erf GELU), fused into the CPU kernels' write-back.

        format="auto" picks the fastest of dense, csr and bsr (block_size) at `tokens` tokens with
        choose_format (timer: time_forward unless given; a decision found in `cache`, for the same device,
        dtype, shape, tokens, block size and sparsity level, is reused; cache=None times every call)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_format(format, FORMATS + ("auto",))
        block_size = formats.check_block_size(block_size)
        weight = linear.weight.detach()
        if weight.dtype not in _DTYPES:
            raise TypeError(f"linear.weight must have a dtype in {[str(d) for d in _DTYPES]}, got {weight.dtype}")
        bias = None if linear.bias is None else linear.bias.detach()
        if format == "auto":
            format = choose_format(weight, bias, block_size, tokens, timer=timer, cache=cache).format
        return cls._from_weight(weight, bias, format, block_size, activation)

    @classmethod
    def _from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, format: str, block_size,
                     activation: str = "none") -> SparseLinear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, format, block_size, bias=bias is not None, dtype=weight.dtype,
                    device=weight.device, activation=activation)
        with torch.no_grad():
            if format == "dense":
                layer.weight.copy_(weight)
            else:
                triple = (formats.dense_to_csr(weight) if format in _ROW_COMPRESSED
                          else formats.dense_to_bsr(weight, block_size))
                layer._check_compressed(*triple)
                for name, t in zip(_COMPRESSED, triple):
                    layer._buffers[name] = t
            if bias is not None:
                layer.bias.copy_(bias)
        layer._build_derived()
        return layer

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with exactly this layer's weight and bias (same dtype and device, bit for bit); a
        layer's activation is not part of it (apply F.gelu after it for activation="gelu")."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.dtype,
                           device=self.device)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (out_features, in_features) tensor (a copy), in the layer's dtype."""
        shape = (self.out_features, self.in_features)
        if self.format == "dense":
            return self.weight.clone()
        to_dense = reference.csr_to_dense_ref if self.format in _ROW_COMPRESSED else reference.bsr_to_dense_ref
        return to_dense(self.crow_indices, self.col_indices, self.values, shape)

    # ------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return (self.weight if self.format == "dense" else self.values).dtype

    @property
    def device(self) -> torch.device:
        return (self.weight if self.format == "dense" else self.values).device

    @property
    def block_size(self) -> tuple[int, int] | None:
        """(block_rows, block_cols) of a bsr layer, None for csr and dense."""
        return (int(self.values.shape[1]), int(self.values.shape[2])) if self.format == "bsr" else None

    def nnz(self) -> int:
        """Stored weight entries (for bsr, whole blocks: padding and zeros inside blocks included)."""
        return (self.weight if self.format == "dense" else self.values).numel()

    def sparsity(self) -> float:
        """Fraction of W's entries that are zero."""
        stored = self.weight if self.format == "dense" else self.values
        return 1.0 - torch.count_nonzero(stored).item() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"format={self.format}"]
        if self.format == "bsr":
            parts += [f"block_size={self.block_size}", f"nnz_blocks={self.values.shape[0]}"]
        parts += [f"nnz={self.nnz()}", f"sparsity={self.sparsity():.4f}", f"bias={self.bias is not None}"]
        if self.activation != "none":
            parts.append(f"activation={self.activation}")
        return ", ".join(parts)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., in_features={self.in_features}), got {tuple(x.shape)}")
        fast = self._fast
        if (fast is not None and x.is_cpu and not (x.requires_grad and torch.is_grad_enabled())
                and forced_backend() is None):
            if torch.compiler.is_compiling():
                # traced: the kernel called directly on the buffers themselves (not the uint16 copy), and
                # since the graph cannot re-validate them it checks the indices on every call (O(nnz))
                if x.dtype == fast[3].dtype:
                    buffers = (fast[0], self.crow_indices, self.col_indices, self.values, self.bias)
                    return call_fast(buffers, x, self.out_features, self.activation, check_indices=True)
            else:
                fast = self._revalidate()
                if fast is not None and x.dtype == fast[3].dtype:
                    if self._stack is not None:  # one kernel call for the siblings reading x (sparse_ops.sparse.stacked)
                        group, index = self._stack
                        y = group.forward(index, x)
                        if y is not None:
                            return y
                    return call_fast(fast, x, self.out_features, self.activation)
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the layer's dtype {self.dtype}, got {x.dtype} (convert x, or the layer "
                            "with .to(dtype))")
        if self.format == "dense" or self._semi is not None:
            y = F.linear(x, self.weight if self._semi is None else self._semi, self.bias)
            return y if self.activation == "none" else F.gelu(y)
        # on another device, differentiated, another dtype, or a backend forced (use_backend): the op checks all
        op = torch.ops.sparse_ops.csr_linear if self.format in _ROW_COMPRESSED else torch.ops.sparse_ops.bsr_linear
        return op(x, self.crow_indices, self.col_indices, self.values, self.bias, self.out_features, self.activation)

    # ------------------------------------------------------------------------------------------
    # dtype/device conversion and loading
    # ------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Module conversions (.to, .half, .type, .cuda, ...) move the index buffers but never change
        their int32 dtype: a conversion that would is applied as a device move only."""
        indices = {name: self._buffers[name] for name in _INDEX_BUFFERS if name in self._buffers}
        result = super()._apply(fn, recurse)
        for name, old in indices.items():
            new = self._buffers[name]
            if new.dtype != formats.INDEX_DTYPE:
                self._buffers[name] = old.to(new.device)
        self._build_derived()
        return result

    def _buffer_state(self) -> tuple:
        """(crow, col, values, bias, crow's version, col's version): the buffers as validated."""
        bufs = self._buffers
        crow, col = bufs["crow_indices"], bufs["col_indices"]
        return crow, col, bufs["values"], bufs["bias"], tensor_version(crow), tensor_version(col)

    def _buffers_unchanged(self) -> bool:
        """The buffers are the very tensors validated last, and the indices were not written to since
        (in-place writes bump a tensor's _version; assigning a new tensor changes its identity;
        inference tensors have no version: see tensor_version). Checked on every CPU forward, so by
        identity and two version reads only."""
        v, bufs = self._validated, self._buffers
        if v is None:
            return False
        crow, col = bufs["crow_indices"], bufs["col_indices"]
        return (crow is v[0] and col is v[1] and bufs["values"] is v[2] and bufs["bias"] is v[3]
                and (v[4] is None or crow._version == v[4]) and (v[5] is None or col._version == v[5]))

    def _revalidate(self):
        """The fast-path tuple, after validating the buffers again if they were assigned or written to
        since the last validation (once: the next call finds them unchanged)."""
        if not self._buffers_unchanged():
            self._check_compressed(self.crow_indices, self.col_indices, self.values)
            self._build_derived()
        return self._fast

    def _build_derived(self) -> None:
        """What the forward derives from the (validated) buffers, rebuilt whenever the layer is built,
        loaded or moved:
        * on CPU, the direct call of the C++ kernel (`_fast`: one op call per forward, the index checks
          done here, once), with the columns as uint16 for csr/2:4 when in_features <= 65,536 (2 bytes
          per stored weight read instead of 4; the int32 buffer stays the saved form);
        * for 2:4, torch's semi-structured weight where that path serves the device, dtype and shape."""
        self._semi, self._fast, self._validated = None, None, None
        if self.format == "dense":
            return
        self._validated = self._buffer_state()
        op = "csr_linear_cpu" if self.format in _ROW_COMPRESSED else "bsr_linear_cpu"
        if self.device.type == "cpu" and self.dtype != torch.float64 and has_cpu_kernel(f"sparse_ops::{op}"):
            col = self.col_indices
            if self.format in _ROW_COMPRESSED and self.in_features <= NARROW_INDEX_LIMIT:
                col = col.to(torch.uint16)
            self._fast = (getattr(torch.ops.sparse_ops, op).default, self.crow_indices, col, self.values, self.bias)
        if self.format != "2:4":
            return
        reason = semi_structured_unavailable(self.device, self.dtype)
        if reason is None:
            try:
                self._semi = torch.sparse.to_sparse_semi_structured(self.dense_weight().contiguous())
            except (RuntimeError, ValueError) as exc:  # e.g. shapes the kernels do not take
                reason = f"to_sparse_semi_structured refused the {self.out_features}x{self.in_features} weight ({exc})"
        if reason is not None:
            _warn_fallback(reason)

    def _check_compressed(self, crow, col, values, name: str = "weight") -> None:
        """Validate a bsr/csr triple for this layer's shape (O(nnz)); ValueError naming what is wrong."""
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise ValueError(f"{name}: values must be a floating tensor, got {getattr(values, 'dtype', values)}")
        if self.format in _ROW_COMPRESSED:
            if values.dim() != 1:
                raise ValueError(f"{name}: this layer holds a {self.format} weight, so values must be 1-D (nnz,), "
                                 f"got shape {tuple(values.shape)}")
            rows, cols = self.out_features, self.in_features
        else:
            if values.dim() != 3 or values.shape[1] < 1 or values.shape[2] < 1:
                raise ValueError(f"{name}: this layer holds a bsr weight, so values must have shape (nnz_blocks, "
                                 f"block_rows, block_cols), got {tuple(values.shape)}")
            rows, cols = -(-self.out_features // values.shape[1]), -(-self.in_features // values.shape[2])
        formats.check_compressed(crow, col, values, rows, cols, name=name)
        if self.format == "2:4":
            formats.check_two_four(crow, col, cols, name=name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept compressed buffers of any nnz (and bsr block size): validate them, resize ours, then load."""
        if self.format != "dense":
            keys = [prefix + name for name in _COMPRESSED]
            present = [key for key in keys if key in state_dict]
            if present and len(present) != len(keys):
                error_msgs.append(f"{prefix or 'SparseLinear'}: crow_indices, col_indices and values must be loaded "
                                  f"together, got only {present}")
                return
            if present:
                crow, col, values = (state_dict[key] for key in keys)
                try:
                    self._check_compressed(crow, col, values, name=prefix.rstrip(".") or "weight")
                except ValueError as exc:
                    error_msgs.append(str(exc))
                    return
                for name, incoming in zip(_COMPRESSED, (crow, col, values)):
                    current = self._buffers[name]
                    if current.shape != incoming.shape:
                        self._buffers[name] = current.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._build_derived()
