"""PruningConfig: everything a pruning run is defined by; round-trips to and from JSON and YAML.

Defaults follow the published recipes (docs/design.md §2.1, §2.3): λ = 0.1 annealed to 0.1·0.001 over the
ramp, σ0² = 1e-10, σ1² = 0.05, global pruning every Δt = 100 steps for magnitude and MGPP; movement
scores trained by Adam at 1e-2 (betas 0.9/0.999, eps 1e-8) with a per-matrix TopK.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ..ops.keys import GRANULARITIES
from . import METHODS
from .schedule import CubicSchedule

SCORE_OPTIMIZERS = ("adam", "sgd")
SCORE_INITS = ("zeros", "magnitude")
DEFAULT_EXCLUDE = (r"(^|\.)(embeddings?|embed_tokens|pooler|classifier|lm_head|score|qa_outputs)(\.|$)",)


@dataclasses.dataclass
class PruningConfig:
    """What to prune, how, and when.

    method: "mgpp" | "magnitude" | "movement" | "soft_movement".
    sparsity: final fraction pruned s_f, in [0, 1). initial_sparsity: s_i (MGPP jumps to it at start_step).
    start_step / end_step: t_i and t_e of the cubic schedule (optimizer steps).
    interval: Δt between magnitude/MGPP pruning events during the ramp.
    granularity: "element" | "block" | "2:4"; block_size: (rows, cols) for "block".
    scope: "global" (one threshold over all targets) or "local" (one per matrix); None picks the
        published default: local for the movement methods, global for magnitude and MGPP.
    targets: None (the default) prunes every nn.Linear and transformers Conv1D inside the model's
        repeated blocks (sparse_ops.pruning.targets); a tuple of regular expressions (re.search on
        module names) picks the nn.Linear / Conv1D layers instead. exclude: regular expressions
        whose matches are left out either way.
    MGPP: lam → lam_final linearly over the ramp, var0, var1, num_train_examples (n of the 1/n scale).
    Movement: score_optimizer "adam" (bias-corrected Adam on the scores with score_betas, score_eps,
    no weight decay, as the reference) or "sgd" (S ← S − score_lr·∂L/∂W'⊙W); score_lr follows the
    optimizer's lr schedule. score_init "magnitude" (default: |w|/std(|w|) per matrix, so
    the first TopK is magnitude's and the scores' moves reorder it) or "zeros" (the reference's start,
    which collapses to the majority class at a few epochs: README, "Movement pruning's collapse").
    Soft movement: soft_threshold τ (None: set at t_i just below the lowest score), soft_l1 (None:
    λ_mvp steered so the sparsity tracks the schedule; a number: the final λ_mvp, ramped with the
    schedule, sparsity not controlled; the penalty is λ_mvp·mean(sigmoid(S)) over all targeted
    weights), soft_min_keep (fraction kept at least per matrix, plus one).
    """

    method: str = "mgpp"
    sparsity: float = 0.9
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 1000
    interval: int = 100
    granularity: str = "element"
    block_size: tuple[int, int] = (32, 32)
    scope: str | None = None
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    lam: float = 0.1
    lam_final: float | None = None
    var0: float = 1e-10
    var1: float = 0.05
    num_train_examples: int | None = None
    score_lr: float = 1e-2
    score_optimizer: str = "adam"
    score_init: str = "magnitude"
    score_betas: tuple[float, float] = (0.9, 0.999)
    score_eps: float = 1e-8
    soft_threshold: float | None = None
    soft_l1: float | None = None
    soft_min_keep: float = 0.005

    def __post_init__(self):
        if self.scope is None:
            self.scope = "local" if self.method in ("movement", "soft_movement") else "global"
        self.block_size = tuple(self.block_size)
        self.score_betas = tuple(self.score_betas)
        for name in ("targets", "exclude"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a tuple of regular expressions, got the string "
                                 f"{getattr(self, name)!r}: write ({getattr(self, name)!r},)")
        self.targets = None if self.targets is None else tuple(self.targets)
        self.exclude = tuple(self.exclude)
        if self.lam_final is None:
            self.lam_final = self.lam * 1e-3
        self.validate()

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.scope not in ("global", "local"):
            raise ValueError(f"scope must be 'global' or 'local', got {self.scope!r}")
        if len(self.block_size) != 2 or any(not isinstance(b, int) or b <= 0 for b in self.block_size):
            raise ValueError(f"block_size must be two positive ints, got {self.block_size!r}")
        if not isinstance(self.interval, int) or self.interval <= 0:
            raise ValueError(f"interval must be a positive int, got {self.interval!r}")
        if self.granularity == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"sparsity must be 0.5 for granularity='2:4', got {self.sparsity!r}")
        self.schedule()  # checks steps and sparsities
        if self.method == "mgpp":
            if not isinstance(self.num_train_examples, int) or self.num_train_examples <= 0:
                raise ValueError("num_train_examples must be a positive int for method='mgpp' "
                                 f"(the prior gradient is scaled by 1/n), got {self.num_train_examples!r}")
            from ..ops.prior import check_prior_args

            check_prior_args(self.lam, self.var0, self.var1)
            check_prior_args(self.lam_final, self.var0, self.var1)
        for name in ("score_lr", "score_eps", "soft_threshold", "soft_l1", "soft_min_keep"):
            value = getattr(self, name)
            if value is None and name in ("soft_threshold", "soft_l1"):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.score_init not in SCORE_INITS:
            raise ValueError(f"score_init must be 'zeros' or 'magnitude', got {self.score_init!r}")
        if self.score_optimizer not in SCORE_OPTIMIZERS:
            raise ValueError(f"score_optimizer must be 'adam' or 'sgd', got {self.score_optimizer!r}")
        if len(self.score_betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0
                                                 for b in self.score_betas):
            raise ValueError(f"score_betas must be two numbers in [0, 1), got {self.score_betas!r}")
        if self.score_eps < 0:
            raise ValueError(f"score_eps must be >= 0, got {self.score_eps!r}")
        if self.soft_l1 is not None and self.soft_l1 < 0:
            raise ValueError(f"soft_l1 must be None or >= 0, got {self.soft_l1!r}")
        if not 0.0 <= self.soft_min_keep < 1.0:
            raise ValueError(f"soft_min_keep must lie in [0, 1), got {self.soft_min_keep!r}")
        if self.targets is not None and (not self.targets or not all(isinstance(p, str) for p in self.targets)):
            raise ValueError("targets must be None (the layers of the model's repeated blocks) or hold at least "
                             f"one regular expression, got {self.targets!r}")

    def schedule(self) -> CubicSchedule:
        return CubicSchedule(t_i=self.start_step, t_e=self.end_step, s_f=self.sparsity, s_i=self.initial_sparsity)

    def lam_at(self, step: int) -> float:
        """λ annealed linearly from lam (at start_step) to lam_final (at end_step)."""
        progress = min(1.0, max(0.0, (step - self.start_step) / (self.end_step - self.start_step)))
        return self.lam + (self.lam_final - self.lam) * progress

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("block_size", "targets", "exclude", "score_betas"):
            d[key] = None if d[key] is None else list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruningConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PruningConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> "PruningConfig":
        return cls.from_dict(json.loads(_read_if_path(text_or_path)))

    def to_yaml(self, path: str | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str) -> "PruningConfig":
        import yaml

        return cls.from_dict(yaml.safe_load(_read_if_path(text_or_path)))


def _read_if_path(text_or_path: str) -> str:
    if "\n" not in text_or_path and text_or_path.endswith((".json", ".yaml", ".yml")):
        with open(text_or_path) as f:
            return f.read()
    return text_or_path
