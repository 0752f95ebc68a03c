"""SparseLinear: an inference-only nn.Linear whose weight is stored as BSR, CSR, 2:4 or dense.

    layer = SparseLinear.from_dense(linear, format="bsr", block_size=(32, 32))   # a BSRLinear
    y = layer(x)                      # x (..., in_features) -> y (..., out_features)

One small class per format behind one interface: SparseLinear is the base class and the factory
(SparseLinear.from_dense, SparseLinear.from_weight, and SparseLinear(in, out, format, ...) itself
build the format's class), DenseLinear, CSRLinear, TwoFourLinear (a CSRLinear whose weight is 2:4)
and BSRLinear are the formats. Every layer is an instance of SparseLinear and carries its format
name in `.format`.

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
sparse_ops.sparse.choice (choose_format, FormatCache); its names are also importable from here.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import choice, formats
from ..ops import reference
from ..ops._extension import has_cpu_kernel
from ..ops import ACTIVATIONS, NARROW_INDEX_LIMIT, forced_backend
from .choice import (  # noqa: F401  (the measured choice, importable from here as before)
    FORMAT_CACHE,
    FormatCache,
    FormatChoice,
    Timer,
    auto_formats,
    format_cache_key,
    time_forward,
)
from .formats import (  # noqa: F401  (the format names and checks, importable from here as before)
    AUTO_FORMATS,
    FORMATS,
    LAYER_DTYPES,
    check_format,
    check_positive_int,
    semi_structured_unavailable,
)

_INDEX_BUFFERS = ("crow_indices", "col_indices")
_COMPRESSED = ("crow_indices", "col_indices", "values")


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


_FALLBACK_WARNED: set[str] = set()


def _warn_fallback(reason: str) -> None:
    if reason not in _FALLBACK_WARNED:  # once per reason and process
        _FALLBACK_WARNED.add(reason)
        warnings.warn(f"SparseLinear format='2:4' computes through CSR here: {reason}", RuntimeWarning, stacklevel=4)


def measure_formats(weight: torch.Tensor, bias: torch.Tensor | None, candidates=FORMATS, block_size=(32, 32),
                    tokens: int = 128, timer: Timer | None = None) -> dict[str, float]:
    """{format: ms} of SparseLinear(format) built from (weight, bias): choice.measure_formats for this
    module's layers."""
    return choice.measure_formats(weight, bias, candidates, block_size, tokens, timer, build=SparseLinear.from_weight)


def choose_format(weight: torch.Tensor, bias: torch.Tensor | None = None, block_size=(32, 32), tokens: int = 128, *,
                  timer: Timer | None = None, cache: FormatCache | None = FORMAT_CACHE) -> FormatChoice:
    """The fastest SparseLinear format for this weight: choice.choose_format for this module's layers."""
    return choice.choose_format(weight, bias, block_size, tokens, build=SparseLinear.from_weight, timer=timer,
                                cache=cache)


class SparseLinear(nn.Module):
    """y = x @ Wᵀ + bias with W (out_features × in_features) held as "bsr", "csr", "2:4" or "dense".

    The base class of the four format classes and their factory: SparseLinear(in_features,
    out_features, format, ...) returns an instance of the format's class (DenseLinear, CSRLinear,
    TwoFourLinear, BSRLinear). Buffers: bsr/csr/2:4 -> crow_indices (int32), col_indices (int32),
    values ((nnz_blocks, br, bc) for bsr, (nnz,) for csr and 2:4); dense -> weight (out, in); and bias
    (out,) or None. A new layer holds an all-zero weight; fill it with from_dense or load_state_dict.

    Interface of every format: from_dense, from_weight, to_dense, dense_weight, dtype, device,
    block_size, nnz, sparsity, forward; and `stack` (the StackedLinears group it computes with, if any).
    """

    format: str  # the format's name, one of formats.FORMATS (a class attribute of each format's class)
    compressed_as: str | None = None  # the op computing its buffers: "csr", "bsr", or None (dense)
    _CLASSES: dict[str, type[SparseLinear]] = {}  # format -> class, filled as the format classes are defined

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "format" in cls.__dict__:
            SparseLinear._CLASSES[cls.format] = cls

    def __new__(cls, *args, **kwargs):
        # SparseLinear(in, out, format, ...) builds the format's class; an unknown format is left to
        # __init__, which names the formats. No arguments: unpickling, see __setstate__.
        if cls is SparseLinear and (len(args) > 2 or "format" in kwargs):
            format = args[2] if len(args) > 2 else kwargs["format"]
            if isinstance(format, str):
                cls = SparseLinear._CLASSES.get(format, cls)
        return super().__new__(cls)

    def __init__(self, in_features: int, out_features: int, format: str | None = None, block_size=(32, 32),
                 bias: bool = True, dtype: torch.dtype | None = None, device=None, activation: str = "none"):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        own = getattr(type(self), "format", None)  # None: the base class, reached with an unknown format
        if check_format(own if format is None else format) != own:
            raise ValueError(f"a {type(self).__name__} holds format {own!r}, got {format!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        block_size = formats.check_block_size(block_size)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in LAYER_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in LAYER_DTYPES]}, got {dtype}")
        self._register_weight(block_size, dtype, device)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._stack = None  # (StackedLinears, index) when computed with siblings reading the same input
        self._build_derived()

    def __getstate__(self):
        # what the forward derives from the buffers is rebuilt, not copied (deepcopy, pickle)
        return {**self.__dict__, "_semi": None, "_fast": None, "_validated": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        if type(self) is SparseLinear:  # pickled before SparseLinear had one class per format
            self.__class__ = SparseLinear._CLASSES[state["format"]]
        self.__dict__.setdefault("_stack", None)
        self._build_derived()

    # ------------------------------------------------------------------------------------------
    # what each format defines
    # ------------------------------------------------------------------------------------------
    def _register_weight(self, block_size: tuple[int, int], dtype: torch.dtype, device) -> None:
        """Register the (all-zero) weight buffers of the format."""
        raise NotImplementedError

    def _set_weight(self, weight: torch.Tensor, block_size: tuple[int, int]) -> None:
        """Store `weight` (out_features, in_features) in the format, validated."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (out_features, in_features) tensor (a copy), in the layer's dtype."""
        raise NotImplementedError

    def _stored(self) -> torch.Tensor:
        """The tensor holding the weight's stored entries (its dtype and device are the layer's)."""
        raise NotImplementedError

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        """The forward once x is checked and the CPU kernel call did not apply."""
        raise NotImplementedError

    def _cpu_kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The direct CPU kernel call's output, or None where it does not apply (dense: never)."""
        return None

    def _build_derived(self) -> None:
        """What the forward derives from the (validated) buffers, rebuilt whenever the layer is built,
        loaded or moved (dense: nothing)."""
        self._semi, self._fast, self._validated = None, None, None

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
        check_format(format, FORMATS + ("auto",))
        block_size = formats.check_block_size(block_size)
        weight = linear.weight.detach()
        if weight.dtype not in LAYER_DTYPES:
            raise TypeError(f"linear.weight must have a dtype in {[str(d) for d in LAYER_DTYPES]}, got {weight.dtype}")
        bias = None if linear.bias is None else linear.bias.detach()
        if format == "auto":
            format = choose_format(weight, bias, block_size, tokens, timer=timer, cache=cache).format
        return SparseLinear.from_weight(weight, bias, format, block_size, activation)

    @staticmethod
    def from_weight(weight: torch.Tensor, bias: torch.Tensor | None, format: str, block_size=(32, 32),
                    activation: str = "none") -> SparseLinear:
        """A layer of `format` holding exactly `weight` (out_features, in_features) and `bias` (out_features,)
        or None, in the weight's dtype and on its device (the format's checks apply: e.g. 2:4)."""
        out_features, in_features = weight.shape
        layer = SparseLinear(in_features, out_features, format, block_size, bias=bias is not None,
                             dtype=weight.dtype, device=weight.device, activation=activation)
        with torch.no_grad():
            layer._set_weight(weight, formats.check_block_size(block_size))
            if bias is not None:
                layer.bias.copy_(bias)
        layer._build_derived()
        return layer

    _from_weight = from_weight  # its name before it was public

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

    # ------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._stored().dtype

    @property
    def device(self) -> torch.device:
        return self._stored().device

    @property
    def block_size(self) -> tuple[int, int] | None:
        """(block_rows, block_cols) of a bsr layer, None for the other formats."""
        return None

    def nnz(self) -> int:
        """Stored weight entries (for bsr, whole blocks: padding and zeros inside blocks included)."""
        return self._stored().numel()

    def sparsity(self) -> float:
        """Fraction of W's entries that are zero."""
        return 1.0 - torch.count_nonzero(self._stored()).item() / (self.out_features * self.in_features)

    def _repr_format(self) -> list[str]:
        return []

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"format={self.format}"]
        parts += self._repr_format()
        parts += [f"nnz={self.nnz()}", f"sparsity={self.sparsity():.4f}", f"bias={self.bias is not None}"]
        if self.activation != "none":
            parts.append(f"activation={self.activation}")
        return ", ".join(parts)

    # ------------------------------------------------------------------------------------------
    # stacking with siblings (sparse_ops.sparse.stacked)
    # ------------------------------------------------------------------------------------------
    @property
    def stack(self):
        """(StackedLinears group, index of this layer in it) while the layer computes with siblings
        that read the same input, else None."""
        return self._stack

    def join_stack(self, group, index: int) -> None:
        """Compute with `group` (a StackedLinears, as its member `index`) from now on: a CPU forward asks
        group.forward(index, x) first and computes alone when that returns None."""
        self._stack = (group, index)

    def cpu_kernel(self) -> tuple | None:
        """(kernel, crow, col, values, bias): the direct CPU kernel call on this layer's buffers, validated
        again first if they were assigned or written to since; None where there is none (dense, not on
        CPU, float64, no compiled kernel)."""
        return None

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., in_features={self.in_features}), got {tuple(x.shape)}")
        y = self._cpu_kernel_forward(x)
        if y is not None:
            return y
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the layer's dtype {self.dtype}, got {x.dtype} (convert x, or the layer "
                            "with .to(dtype))")
        return self._compute(x)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.activation == "none" else F.gelu(y)


class DenseLinear(SparseLinear):
    """format "dense": W in the buffer `weight` (out_features, in_features), computed by F.linear."""

    format = "dense"

    def _register_weight(self, block_size, dtype, device) -> None:
        self.register_buffer("weight", torch.zeros(self.out_features, self.in_features, dtype=dtype, device=device))

    def _set_weight(self, weight, block_size) -> None:
        self.weight.copy_(weight)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.clone()

    def _stored(self) -> torch.Tensor:
        return self.weight

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return self._activate(F.linear(x, self.weight, self.bias))


class _CompressedLinear(SparseLinear):
    """What the compressed formats share: the (crow_indices, col_indices, values) buffers, validated
    when built, loaded or written to, and on CPU the direct call of the C++ kernel."""

    def _register_weight(self, block_size, dtype, device) -> None:
        index = {"dtype": formats.INDEX_DTYPE, "device": device}
        self.register_buffer("crow_indices", torch.zeros(self._rows(block_size) + 1, **index))
        self.register_buffer("col_indices", torch.zeros(0, **index))
        self.register_buffer("values", torch.zeros(self._empty_values_shape(block_size), dtype=dtype, device=device))

    def _rows(self, block_size) -> int:
        """Rows of the compressed form (block rows for bsr)."""
        raise NotImplementedError

    def _empty_values_shape(self, block_size) -> tuple[int, ...]:
        raise NotImplementedError

    def _compress(self, weight: torch.Tensor, block_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _check_values(self, values: torch.Tensor, name: str) -> tuple[int, int]:
        """Check the shape of values for this format; (rows, cols) of the compressed form it implies."""
        raise NotImplementedError

    def _set_weight(self, weight, block_size) -> None:
        triple = self._compress(weight, block_size)
        self._check_compressed(*triple)
        for name, t in zip(_COMPRESSED, triple):
            self._buffers[name] = t

    def _stored(self) -> torch.Tensor:
        return self.values

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        # on another device, differentiated, another dtype, or a backend forced (use_backend): the op checks all
        op = getattr(torch.ops.sparse_ops, f"{self.compressed_as}_linear")
        return op(x, self.crow_indices, self.col_indices, self.values, self.bias, self.out_features, self.activation)

    def cpu_kernel(self) -> tuple | None:
        return self._revalidate()

    def _cpu_kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        fast = self._fast
        if (fast is None or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled())
                or forced_backend() is not None):
            return None
        if torch.compiler.is_compiling():
            # traced: the kernel called directly on the buffers themselves (not the uint16 copy), and
            # since the graph cannot re-validate them it checks the indices on every call (O(nnz))
            if x.dtype == fast[3].dtype:
                buffers = (fast[0], self.crow_indices, self.col_indices, self.values, self.bias)
                return call_fast(buffers, x, self.out_features, self.activation, check_indices=True)
            return None
        fast = self._revalidate()
        if fast is None or x.dtype != fast[3].dtype:
            return None
        if self._stack is not None:  # one kernel call for the siblings reading x (sparse_ops.sparse.stacked)
            group, index = self._stack
            y = group.forward(index, x)
            if y is not None:
                return y
        return call_fast(fast, x, self.out_features, self.activation)

    # ------------------------------------------------------------------------------------------
    # dtype/device conversion, validation and loading
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
        """On CPU, the direct call of the C++ kernel (`_fast`: one op call per forward, the index checks
        done here, once), with the columns as uint16 for csr/2:4 when in_features <= 65,536 (2 bytes
        per stored weight read instead of 4; the int32 buffer stays the saved form)."""
        super()._build_derived()
        self._validated = self._buffer_state()
        op = f"{self.compressed_as}_linear_cpu"
        if self.device.type == "cpu" and self.dtype != torch.float64 and has_cpu_kernel(f"sparse_ops::{op}"):
            col = self.col_indices
            if self.compressed_as == "csr" and self.in_features <= NARROW_INDEX_LIMIT:
                col = col.to(torch.uint16)
            self._fast = (getattr(torch.ops.sparse_ops, op).default, self.crow_indices, col, self.values, self.bias)

    def _check_compressed(self, crow, col, values, name: str = "weight") -> None:
        """Validate a compressed triple for this layer's format and shape (O(nnz)); ValueError naming what
        is wrong."""
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise ValueError(f"{name}: values must be a floating tensor, got {getattr(values, 'dtype', values)}")
        rows, cols = self._check_values(values, name)
        formats.check_compressed(crow, col, values, rows, cols, name=name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept compressed buffers of any nnz (and bsr block size): validate them, resize ours, then load."""
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


class CSRLinear(_CompressedLinear):
    """format "csr": W's non-zero entries by rows (values (nnz,)), computed by csr_linear."""

    format = "csr"
    compressed_as = "csr"

    def _rows(self, block_size) -> int:
        return self.out_features

    def _empty_values_shape(self, block_size) -> tuple[int, ...]:
        return (0,)

    def _compress(self, weight, block_size):
        return formats.dense_to_csr(weight)

    def _check_values(self, values, name) -> tuple[int, int]:
        if values.dim() != 1:
            raise ValueError(f"{name}: this layer holds a {self.format} weight, so values must be 1-D (nnz,), "
                             f"got shape {tuple(values.shape)}")
        return self.out_features, self.in_features

    def dense_weight(self) -> torch.Tensor:
        return reference.csr_to_dense_ref(self.crow_indices, self.col_indices, self.values,
                                          (self.out_features, self.in_features))


class TwoFourLinear(CSRLinear):
    """format "2:4": a CSR weight with at most 2 non-zeros in every 4 consecutive entries of a row
    (checked; the error names the first offending group). On CUDA in fp16/bf16 on sm_80+ the forward runs
    torch's semi-structured sparsity (torch.sparse.to_sparse_semi_structured: cuSPARSELt or CUTLASS),
    built from the CSR buffers whenever the layer is built, loaded or moved; elsewhere (CPU, fp32, shapes
    the semi-structured kernels refuse) it computes the same product through csr_linear, with a one-time
    warning. The state_dict is the CSR triple either way, so save and load stay exact."""

    format = "2:4"

    def _check_compressed(self, crow, col, values, name: str = "weight") -> None:
        super()._check_compressed(crow, col, values, name)
        formats.check_two_four(crow, col, self.in_features, name=name)

    def _build_derived(self) -> None:
        super()._build_derived()
        reason = semi_structured_unavailable(self.device, self.dtype)
        if reason is None:
            try:
                self._semi = torch.sparse.to_sparse_semi_structured(self.dense_weight().contiguous())
            except (RuntimeError, ValueError) as exc:  # e.g. shapes the kernels do not take
                reason = f"to_sparse_semi_structured refused the {self.out_features}x{self.in_features} weight ({exc})"
        if reason is not None:
            _warn_fallback(reason)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        if self._semi is not None:
            return self._activate(F.linear(x, self._semi, self.bias))
        return super()._compute(x)


class BSRLinear(_CompressedLinear):
    """format "bsr": W's blocks (block_rows × block_cols) that hold a non-zero entry, by block rows
    (values (nnz_blocks, br, bc), W zero-padded to whole blocks), computed by bsr_linear."""

    format = "bsr"
    compressed_as = "bsr"

    def _rows(self, block_size) -> int:
        return -(-self.out_features // block_size[0])

    def _empty_values_shape(self, block_size) -> tuple[int, ...]:
        return (0, *block_size)

    def _compress(self, weight, block_size):
        return formats.dense_to_bsr(weight, block_size)

    def _check_values(self, values, name) -> tuple[int, int]:
        if values.dim() != 3 or values.shape[1] < 1 or values.shape[2] < 1:
            raise ValueError(f"{name}: this layer holds a bsr weight, so values must have shape (nnz_blocks, "
                             f"block_rows, block_cols), got {tuple(values.shape)}")
        return -(-self.out_features // values.shape[1]), -(-self.in_features // values.shape[2])

    def dense_weight(self) -> torch.Tensor:
        return reference.bsr_to_dense_ref(self.crow_indices, self.col_indices, self.values,
                                          (self.out_features, self.in_features))

    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    def _repr_format(self) -> list[str]:
        return [f"block_size={self.block_size}", f"nnz_blocks={self.values.shape[0]}"]
