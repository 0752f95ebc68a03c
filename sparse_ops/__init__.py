"""sparse_ops: fused pruning ops for training and sparse kernels for inference.

Importing the package registers torch.ops.sparse_ops.* (schemas and fakes in sparse_ops.ops) and
loads the compiled extension sparse_ops._C when it was built.
"""

from . import _dependencies  # noqa: F401  (first: it fails if something hides torch, transformers, ...)
from . import ops as _ops  # noqa: F401  (defines the ops before the extension implements them)
from .ops._extension import extension_error, load_extension
from .pruning.config import PruningConfig
from .pruning.distillation import distillation_loss
from .sparse.export import ExportReport, export, load_exported, save_exported
from .sparse.linear import SparseLinear
from .ops.prior import mgp_constants, mgp_threshold
from .pruning.oneshot import OneshotReport, oneshot
from .pruning.perplexity import perplexity
from .pruning.pruner import Pruner
from .pruning.schedule import CubicSchedule
from .ops.select import Selection, Threshold, prune_threshold, radix_select

load_extension()

__version__ = "0.1.0"
__all__ = ["CubicSchedule", "ExportReport", "OneshotReport", "Pruner", "PruningConfig", "Selection", "SparseLinear", "Threshold",
           "distillation_loss", "export", "extension_error", "load_exported", "mgp_constants", "mgp_threshold", "oneshot", "perplexity", "prune_threshold",
           "radix_select", "save_exported"]
