"""`sparse_ops.hf`, the public path of the Hugging Face integrations (sparse_ops/integrations/hf.py)."""

from .integrations.hf import DistillationMixin, DistillationTrainer, PruningCallback

__all__ = ["DistillationMixin", "DistillationTrainer", "PruningCallback"]
