"""Every op's schema, fake, input checks and per-device implementation, in one place.

Dispatch, per op (inputs are checked here first, whatever the backend):
  CUDA  -> the Triton launcher in sparse_ops.kernels (float64 falls back to the reference)
  CPU   -> the C++ kernel of sparse_ops._C when it was built: it implements the private op
           `<op>_cpu` (same schema, defined below) for the CPU key; else the reference
  Meta  -> the fake (shape/dtype only), so every op traces under torch.compile.

Schemas (docs/ops.md has the full contract):
  mgp_prior_grad(Tensor w, float lam, float var0, float var1, float scale=1.) -> Tensor
  radix_histogram(Tensor[] xs, Tensor state, int level, bool absolute) -> Tensor   (int64[257])
  kthvalue(Tensor x, int k) -> Tensor                                              (0-dim)
  kthvalue_multi(Tensor[] xs, int k, bool absolute=False) -> Tensor                (0-dim)
  fused_prune_step(Tensor(a!) weight, Tensor(b!) grad, Tensor(c!)? scores, Tensor(d!) mask,
                   Tensor(e!)? histogram, Tensor(f!)? score_exp_avg=None,
                   Tensor(g!)? score_exp_avg_sq=None, *, bool keys_from_scores=False,
                   bool strict_threshold=False, ...) -> ()
  csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias,
             int out_features, str activation="none") -> Tensor                   (..., out_features)
  bsr_linear(<the same>) -> Tensor                       (values of shape (nnz_blocks, br, bc))

The sparse linear ops compute act(x @ Wᵀ + bias) for W given in CSR / BSR by rows (sparse_ops.sparse.formats),
with int32 indices (csr: col_indices may also be uint16 when in_features <= 65,536), values and bias
in x.dtype, float32 accumulation and one rounding; activation "none" or "gelu" (exact, erf), fused
into the CPU kernels' write-back and applied after the product elsewhere. Their CUDA/CPU kernels
(`<op>_cuda`, `<op>_cpu`) receive x as a contiguous 2-D (M, in_features) tensor. The public ops
check everything, index contents included (O(nnz)); the `<op>_cpu` twins take
check_indices=False from SparseLinear, which validated its index tensors once, when they were built
or loaded.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from . import _checks, keys, reference
from ._extension import SCHEMA_VERSION, has_cpu_kernel, has_cuda_kernel  # noqa: F401  (SCHEMA_VERSION: re-exported)
from .prior import check_prior_args

LIB = "sparse_ops"
_lib = torch.library.Library(LIB, "FRAGMENT")  # noqa: TOR901 - schemas are defined once, here

_FUSED_SCHEMA = (
    "fused_prune_step(Tensor(a!) weight, Tensor(b!) grad, Tensor(c!)? scores, Tensor(d!) mask, "
    "Tensor(e!)? histogram, Tensor(f!)? score_exp_avg=None, Tensor(g!)? score_exp_avg_sq=None, *, "
    "bool keys_from_scores=False, bool strict_threshold=False, str granularity='element', int block_rows=1, "
    "int block_cols=1, float threshold=0., "
    "int tie_cut=0, int index_offset=0, float prior_scale=0., float lam=0.1, float var0=1e-10, "
    "float var1=0.05, float score_lr=0., float sigmoid_l1=0., int score_step=0, float score_beta1=0.9, "
    "float score_beta2=0.999, float score_eps=1e-8, bool mask_grad=True, bool mask_weight=False, "
    "bool reuse_mask=False) -> ()"
)
_lib.define("mgp_prior_grad(Tensor w, float lam, float var0, float var1, float scale=1.) -> Tensor")
_lib.define("radix_histogram(Tensor[] xs, Tensor state, int level, bool absolute) -> Tensor")
_lib.define("kthvalue(Tensor x, int k) -> Tensor")
_lib.define("kthvalue_multi(Tensor[] xs, int k, bool absolute=False) -> Tensor")
_lib.define(_FUSED_SCHEMA)
_SPARSE_LINEAR_ARGS = "(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, int out_features"
ACTIVATIONS = ("none", "gelu")
for _fmt in ("csr", "bsr"):
    _lib.define(f"{_fmt}_linear{_SPARSE_LINEAR_ARGS}, str activation='none') -> Tensor")
    # the C++ CPU kernel (csrc/cpu): the epilogue fused, and the index check skippable for SparseLinear
    _lib.define(f"{_fmt}_linear_cpu{_SPARSE_LINEAR_ARGS}, str activation='none', bool check_indices=True) -> Tensor")
# the CUDA kernel (csrc/cuda): int32 indices, no epilogue (the activation is applied after it)
_lib.define(f"csr_linear_cuda{_SPARSE_LINEAR_ARGS}) -> Tensor")
# Private twins that csrc/ implements for the CPU key (TORCH_LIBRARY_IMPL(sparse_ops, CPU, m)) and,
# for csr_linear, the CUDA key (csrc/cuda).
CPP_OPS = ("mgp_prior_grad", "radix_histogram", "fused_prune_step", "csr_linear", "bsr_linear")
CUDA_OPS = ("csr_linear",)
for _op in ("mgp_prior_grad", "radix_histogram", "fused_prune_step"):  # the same schema as their public op
    _schema = str(getattr(torch.ops.sparse_ops, _op).default._schema)
    _lib.define(_schema.replace(f"{LIB}::{_op}(", f"{_op}_cpu(", 1))


def _triton_kernel(name: str):
    """The Triton module sparse_ops.kernels.<name>, imported lazily: Triton is only needed on CUDA."""
    return importlib.import_module(f"sparse_ops.kernels.{name}")


_forced = {"backend": None}


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Run the ops on one backend: "reference" (plain PyTorch, any device), "triton" (CUDA, or CPU
    under TRITON_INTERPRET=1), or None (the default choice by device). For tests and debugging."""
    if backend not in (None, "reference", "triton"):
        raise ValueError(f"backend must be None, 'reference' or 'triton', got {backend!r}")
    previous, _forced["backend"] = _forced["backend"], backend
    try:
        yield
    finally:
        _forced["backend"] = previous


def forced_backend() -> str | None:
    """The backend use_backend forces now, or None."""
    return _forced["backend"]


def _use_triton(t: torch.Tensor) -> bool:
    if _forced["backend"] is not None:
        return _forced["backend"] == "triton" and t.dtype != torch.float64
    return t.device.type == "cuda" and t.dtype != torch.float64


def _use_cpp(op: str, t: torch.Tensor) -> bool:
    return _forced["backend"] is None and t.device.type == "cpu" and has_cpu_kernel(f"{LIB}::{op}_cpu")


# ---------------------------------------------------------------------------------------------
# mgp_prior_grad
# ---------------------------------------------------------------------------------------------
def _check_mgp(w, lam, var0, var1, scale):
    _checks.check_float_tensor("w", w)
    check_prior_args(lam, var0, var1)
    _checks.check_finite_scalar("scale", scale)


@torch.library.register_fake(f"{LIB}::mgp_prior_grad")
def _mgp_prior_grad_fake(w, lam, var0, var1, scale=1.0):
    _check_mgp(w, lam, var0, var1, scale)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _mgp_prior_grad_impl(w, lam, var0, var1, scale=1.0):
    _check_mgp(w, lam, var0, var1, scale)
    if _use_triton(w):
        return _triton_kernel("mgp_prior_grad").mgp_prior_grad_triton(w, lam, var0, var1, scale)
    if _use_cpp("mgp_prior_grad", w):
        return torch.ops.sparse_ops.mgp_prior_grad_cpu(w, lam, var0, var1, scale)
    return reference.mgp_prior_grad_ref(w, lam, var0, var1, scale).contiguous()


# ---------------------------------------------------------------------------------------------
# radix_histogram (internal building block of kthvalue and of global thresholds)
# ---------------------------------------------------------------------------------------------
def _check_histogram(xs, state, level):
    _checks.check_tensor_list("xs", xs)
    if state.dtype != torch.int64 or state.numel() != 2:
        raise ValueError(f"state must be an int64 tensor of 2 elements, got {state.dtype} {tuple(state.shape)}")
    if state.device != xs[0].device:
        raise ValueError(f"state must be on {xs[0].device} like xs, got {state.device}")
    levels = keys.KEY_BITS[xs[0].dtype] // keys.RADIX_BITS
    if not 0 <= level < levels:
        raise ValueError(f"level must lie in [0, {levels}) for {xs[0].dtype}, got {level}")


@torch.library.register_fake(f"{LIB}::radix_histogram")
def _radix_histogram_fake(xs, state, level, absolute):
    _check_histogram(xs, state, level)
    return state.new_empty(keys.RADIX_BINS + 1)


def _radix_histogram_impl(xs, state, level, absolute):
    _check_histogram(xs, state, level)
    if _use_triton(xs[0]):
        return _triton_kernel("kthvalue").radix_histogram_triton(xs, state, level, absolute)
    if _use_cpp("radix_histogram", xs[0]):
        return torch.ops.sparse_ops.radix_histogram_cpu(xs, state, level, absolute)
    return reference.radix_histogram_ref(xs, state, level, absolute)


# ---------------------------------------------------------------------------------------------
# kthvalue / kthvalue_multi (composite: radix select over radix_histogram)
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake(f"{LIB}::kthvalue")
def _kthvalue_fake(x, k):
    _checks.check_float_tensor("x", x)
    _checks.check_kth(x.numel(), k, "x")
    return x.new_empty(())


@torch.library.register_fake(f"{LIB}::kthvalue_multi")
def _kthvalue_multi_fake(xs, k, absolute=False):
    _checks.check_tensor_list("xs", xs)
    _checks.check_kth(sum(x.numel() for x in xs), k, "xs")
    return xs[0].new_empty(())


def _kthvalue_impl(x, k):
    from .select import radix_select, signed_zero_like_input

    _checks.check_float_tensor("x", x)
    return signed_zero_like_input(radix_select([x], k, absolute=False, name="x").value, [x])


def _kthvalue_multi_impl(xs, k, absolute=False):
    from .select import radix_select, signed_zero_like_input

    value = radix_select(list(xs), k, absolute=absolute).value
    return value if absolute else signed_zero_like_input(value, xs)


# ---------------------------------------------------------------------------------------------
# fused_prune_step
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake(f"{LIB}::fused_prune_step")
def _fused_prune_step_fake(weight, grad, scores, mask, histogram, score_exp_avg=None, score_exp_avg_sq=None,
                           **kwargs):
    _checks.check_fused_args(weight, grad, scores, mask, histogram, score_exp_avg, score_exp_avg_sq, **kwargs)


def _fused_prune_step_impl(weight, grad, scores, mask, histogram, score_exp_avg=None, score_exp_avg_sq=None,
                           **kwargs):
    _checks.check_fused_args(weight, grad, scores, mask, histogram, score_exp_avg, score_exp_avg_sq, **kwargs)
    if _use_triton(weight) and (scores is None or scores.dtype != torch.float64):
        kernel = _triton_kernel("fused_prune_step").fused_prune_step_triton
    elif _use_cpp("fused_prune_step", weight):
        kernel = torch.ops.sparse_ops.fused_prune_step_cpu
    else:
        kernel = reference.fused_prune_step_ref
    # kernels stream flat memory: run them on contiguous copies and write the results back
    tensors = (weight, grad, scores, mask, histogram, score_exp_avg, score_exp_avg_sq)
    work = [t if t is None or t.is_contiguous() else t.contiguous() for t in tensors]
    kernel(*work, **kwargs)
    for t, w in zip(tensors, work):
        if w is not t:
            t.copy_(w)


# ---------------------------------------------------------------------------------------------
# csr_linear / bsr_linear (inference)
# ---------------------------------------------------------------------------------------------
_SPARSE_LINEAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NARROW_INDEX_LIMIT = 1 << 16  # uint16 col_indices address in_features <= 65,536


def _check_sparse_linear(fmt, x, crow, col, values, bias, out_features, activation):
    if not isinstance(x, torch.Tensor) or x.dtype not in _SPARSE_LINEAR_DTYPES:
        raise TypeError(f"x must be a tensor of dtype float32, float16, bfloat16 or float64, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., in_features) with in_features >= 1, got {tuple(x.shape)}")
    if not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        narrow_ok = name == "col_indices" and fmt == "csr" and isinstance(t, torch.Tensor) and t.dtype == torch.uint16
        if not isinstance(t, torch.Tensor) or (t.dtype != torch.int32 and not narrow_ok) or t.dim() != 1:
            extra = " (csr col_indices: or uint16)" if name == "col_indices" and fmt == "csr" else ""
            raise TypeError(f"{name} must be a 1-D int32 tensor{extra} (convert with .to(torch.int32)), got "
                            f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
    if col.dtype == torch.uint16 and x.shape[-1] > NARROW_INDEX_LIMIT:
        raise ValueError(f"col_indices: uint16 indices address in_features <= {NARROW_INDEX_LIMIT}, got "
                         f"in_features={x.shape[-1]}; use int32")
    for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")
    if values.dtype != x.dtype:
        raise TypeError(f"values must have the dtype of x ({x.dtype}), got {values.dtype}")
    if fmt == "csr":
        if values.dim() != 1:
            raise ValueError(f"values must be 1-D (nnz,) for csr_linear, got shape {tuple(values.shape)}")
        rows = out_features
    else:
        if values.dim() != 3 or values.shape[1] < 1 or values.shape[2] < 1:
            raise ValueError(f"values must have shape (nnz_blocks, block_rows, block_cols) for bsr_linear, got "
                             f"{tuple(values.shape)}")
        rows = -(-out_features // values.shape[1])
    _checks.check_compressed_counts(crow, col, values, rows)
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"bias must be None or of shape ({out_features},) and dtype {x.dtype}, got "
                         f"{bias.dtype} {tuple(bias.shape)}")


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The epilogue where the kernel has none: GELU (exact, erf) in float32 for 16-bit outputs."""
    if activation == "none":
        return y
    return torch.nn.functional.gelu(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y).to(y.dtype)


def _sparse_linear_fake(fmt):
    def fake(x, crow_indices, col_indices, values, bias, out_features, activation="none"):
        _check_sparse_linear(fmt, x, crow_indices, col_indices, values, bias, out_features, activation)
        return x.new_empty(*x.shape[:-1], out_features)

    return fake


def _sparse_linear_kernel(fmt, x, values):
    """(kernel, fused): the kernel for these inputs, and whether it takes (activation, check_indices)."""
    op = f"{fmt}_linear"
    if _forced["backend"] == "reference" or x.dtype == torch.float64:
        return getattr(reference, f"{op}_ref"), False
    if fmt == "bsr" and _use_triton(x) and max(values.shape[1:]) <= _triton_kernel("bsr_linear").MAX_BLOCK:
        return _triton_kernel("bsr_linear").bsr_linear_triton, False
    if x.device.type == "cuda" and has_cuda_kernel(f"{LIB}::{op}_cuda"):
        return getattr(torch.ops.sparse_ops, f"{op}_cuda"), False
    if x.device.type == "cpu" and has_cpu_kernel(f"{LIB}::{op}_cpu"):
        return getattr(torch.ops.sparse_ops, f"{op}_cpu"), True
    return getattr(reference, f"{op}_ref"), False


def _sparse_linear_impl(fmt):
    def impl(x, crow_indices, col_indices, values, bias, out_features, activation="none"):
        _check_sparse_linear(fmt, x, crow_indices, col_indices, values, bias, out_features, activation)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if x2.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], out_features)
        kernel, fused = _sparse_linear_kernel(fmt, x, values)
        if not fused and col_indices.dtype == torch.uint16:  # only the C++ kernel reads 2-byte columns
            col_indices = col_indices.to(torch.int32)
        args = [t.contiguous() for t in (crow_indices, col_indices, values)]
        bias = None if bias is None else bias.contiguous()
        if fused:
            y = kernel(x2, *args, bias, out_features, activation, True)
        else:
            y = _activate(kernel(x2, *args, bias, out_features), activation)
        return y.view(*x.shape[:-1], out_features)

    return impl


def _sparse_linear_setup_context(ctx, inputs, output):
    x, crow, col, values, bias, out_features, *rest = inputs
    ctx.activation = rest[0] if rest else "none"
    ctx.save_for_backward(x if ctx.activation != "none" else None, crow, col, values, bias)
    ctx.in_features, ctx.out_features = x.shape[-1], out_features


def _sparse_linear_backward(fmt):
    """Gradients for x and bias only (the layers are for inference; the stored weight is a constant):
    grad_x = grad_pre @ W with W densified in float32 — correct, not a fast path. With an activation,
    grad_pre = gelu'(pre) · grad, the pre-activation recomputed by the op without it."""
    to_dense = reference.csr_to_dense_ref if fmt == "csr" else reference.bsr_to_dense_ref

    def backward(ctx, grad):
        x, crow, col, values, bias = ctx.saved_tensors
        if ctx.needs_input_grad[3]:
            raise RuntimeError(f"{fmt}_linear does not differentiate its stored weight values; detach them")
        if ctx.activation != "none":
            op = getattr(torch.ops.sparse_ops, f"{fmt}_linear")
            pre = op(x.detach(), crow, col, values, None if bias is None else bias.detach(), ctx.out_features)
            grad = torch.ops.aten.gelu_backward(grad, pre)
        weight = to_dense(crow, col, values, (ctx.out_features, ctx.in_features))
        cdt = reference.compute_dtype(grad.dtype)
        grad_x = (grad.to(cdt) @ weight.to(cdt)).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, ctx.out_features).sum(0) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, None, grad_bias, None, None

    return backward


def _sparse_linear_cpu_fake(fmt):
    """The C++ kernel's output under tracing (SparseLinear calls it directly when compiled on CPU)."""
    def fake(x, crow_indices, col_indices, values, bias, out_features, activation="none", check_indices=True):
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D (tokens, in_features) for {fmt}_linear_cpu, got {tuple(x.shape)}")
        _check_sparse_linear(fmt, x, crow_indices, col_indices, values, bias, out_features, activation)
        return x.new_empty(x.shape[0], out_features)

    return fake


for _fmt in ("csr", "bsr"):
    torch.library.register_fake(f"{LIB}::{_fmt}_linear")(_sparse_linear_fake(_fmt))
    torch.library.register_fake(f"{LIB}::{_fmt}_linear_cpu")(_sparse_linear_cpu_fake(_fmt))
    _lib.impl(f"{_fmt}_linear", _sparse_linear_impl(_fmt), "CompositeExplicitAutograd")
    torch.library.register_autograd(f"{LIB}::{_fmt}_linear", _sparse_linear_backward(_fmt),
                                    setup_context=_sparse_linear_setup_context)


# One implementation for every backend; it checks the inputs and picks the kernel by device.
for _name, _fn in (
    ("mgp_prior_grad", _mgp_prior_grad_impl),
    ("radix_histogram", _radix_histogram_impl),
    ("kthvalue", _kthvalue_impl),
    ("kthvalue_multi", _kthvalue_multi_impl),
    ("fused_prune_step", _fused_prune_step_impl),
):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


def cpu_backend(op: str) -> str:
    """'cpp' when sparse_ops._C implements `op` on CPU, else 'reference'."""
    return "cpp" if has_cpu_kernel(f"{LIB}::{op}_cpu") else "reference"
