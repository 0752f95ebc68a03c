"""What every kernel module needs before it defines a kernel: to be imported as sparse_ops.kernels,
and a Triton interpreter that takes loop bounds loaded from memory.

This folder has no __init__.py on purpose: a regular package named `kernels` at the repository root
would shadow Hugging Face's `kernels` (which transformers imports) for anything run from there. The
folder is therefore at most an empty namespace package under that name, and its modules refuse to
load under it.
"""

import os

if not __name__.startswith("sparse_ops.kernels."):
    raise ImportError(f"{__name__!r}: the Triton kernels of sparse_ops are imported as sparse_ops.kernels, "
                      "not as a top-level package `kernels` (that name belongs to Hugging Face's kernels)")


def _index_any_scalar(interpreter) -> None:
    """Triton 3.6's interpreter turns a tensor into a loop bound with int(array), which NumPy >= 2.4
    refuses for the 1-element arrays that hold its scalars (`for k in range(lo, hi)` with lo, hi
    loaded from memory fails). Triton 3.9's reads the array's single element, as this does on any
    version."""
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index


if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interpreter

    if hasattr(_interpreter, "_patch_lang_tensor"):
        _index_any_scalar(_interpreter)
