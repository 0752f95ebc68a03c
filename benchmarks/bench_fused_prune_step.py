"""One pruning step over a set of weight matrices: separate PyTorch ops vs torch.compile vs sparse_ops.

One step is what a training loop does after backward, for every targeted matrix (global threshold):
  mgpp      t = count-th smallest |W| over all matrices; M = |W| > t;
            G = G⊙M + (1/n)·∂[−log π(W)]/∂W  (the prior gradient, in float32, is not masked: the order
            of fused_prune_step)
  movement  t = count-th smallest S over all matrices; M = S > t (scores before the update);
            S = S − η·G⊙W (unmasked G); G = G⊙M   (the first-order score update, score_optimizer="sgd")
  movement_adam  the same mask, with the scores' bias-corrected Adam step on G⊙W as torch.optim.Adam
            takes it (fp32 moments m, v read and written; the Pruner's default): m ← lerp(m, G⊙W, 1−β1),
            v ← β2·v + (1−β2)(G⊙W)², S ← S − (η/(1−β1^t))·m/(√v/√(1−β2^t) + ε); G = G⊙M
Variants, timed from the same state (gradients are restored before every call, outside the timing; the
first call, checked against eager's, is the first warm-up call):
  eager       the math as separate PyTorch ops; t = torch.kthvalue(torch.cat(keys)); prunes every tie of t
  compile     torch.compile (mode default) of `eager`; its first call (compile + run) is compile_s
  sparse_ops  sparse_ops.prune_threshold (radix select, exact count; movement reuses the level-0
              histogram the previous step emitted) + torch.ops.sparse_ops.fused_prune_step per matrix
  fused_only  torch.ops.sparse_ops.fused_prune_step per matrix with a precomputed threshold: the kernel alone
bytes_moved is the minimum traffic of the elementwise step: per element W read, G read+write, S read+write
(movement), m and v read+write (float32, movement_adam) and a 1-byte mask write. Threshold selection is not counted, so GB/s of the full-step variants is
an effective figure; fused_only's GB/s is the kernel's, to set against the measured copy bandwidth.
check compares each variant's first step with eager's: mask elements that differ (ties of t only, as
eager prunes all ties) and max |ΔG| / max |G| where the masks agree.
"""

from __future__ import annotations

import dataclasses
import traceback

import torch

import _common as C
import sparse_ops
from sparse_ops.ops import cpu_backend

PRIOR = dict(lam=0.1, var0=1e-10, var1=0.05)
PRIOR_SCALE = 1e-5   # 1/n, n = 100k training examples
SCORE_LR = 1e-2
ADAM = dict(score_step=10, score_beta1=0.9, score_beta2=0.999, score_eps=1e-8)  # a step after some training
MOVEMENT_METHODS = ("movement", "movement_adam")


# ---------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class State:
    """Weights, gradients, scores and masks of one set; the pristine grads/scores to restore."""

    weights: list[torch.Tensor]
    grads: list[torch.Tensor]
    scores: list[torch.Tensor]
    masks: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    grads0: list[torch.Tensor]
    scores0: list[torch.Tensor]

    @classmethod
    def random(cls, shapes, dtype, device) -> "State":
        torch.manual_seed(0)
        weights = [(0.02 * torch.randn(s, device=device)).to(dtype) for s in shapes]
        grads0 = [(1e-3 * torch.randn(s, device=device)).to(dtype) for s in shapes]
        scores0 = [(1e-2 * torch.randn(s, device=device)).to(dtype) for s in shapes]  # scores after some training
        return cls(weights, [g.clone() for g in grads0], [s.clone() for s in scores0],
                   [torch.empty(s, dtype=torch.bool, device=device) for s in shapes],
                   [torch.zeros(s, device=device) for s in shapes], [torch.zeros(s, device=device) for s in shapes],
                   grads0, scores0)

    def restore_grads(self) -> None:
        for g, g0 in zip(self.grads, self.grads0):
            g.copy_(g0)

    def reset(self) -> None:
        self.restore_grads()
        for s, s0 in zip(self.scores, self.scores0):
            s.copy_(s0)
        for m in self.exp_avg + self.exp_avg_sq:
            m.fill_(1e-8)  # moments of an earlier step: m, v > 0


# ---------------------------------------------------------------------------------------------
# (a) eager, (b) torch.compile of it
# ---------------------------------------------------------------------------------------------
def eager_mgpp(weights, grads, masks, count: int) -> None:
    """MGPP step as separate PyTorch ops, in place (see the module docstring)."""
    c1, c2, inv0, inv1 = sparse_ops.mgp_constants(**PRIOR)
    t = torch.kthvalue(torch.cat([w.abs().flatten() for w in weights]), count).values
    for w, g, m in zip(weights, grads, masks):
        m.copy_(w.abs() > t)
        g.masked_fill_(~m, 0)
        theta = w.float()
        p0 = torch.sigmoid(-(c2 * theta * theta + c1))
        g.add_((PRIOR_SCALE * theta * (p0 * inv0 + (1.0 - p0) * inv1)).to(g.dtype))


def eager_movement(weights, grads, scores, masks, count: int) -> None:
    """Movement step as separate PyTorch ops, in place (see the module docstring)."""
    t = torch.kthvalue(torch.cat([s.flatten() for s in scores]), count).values
    for w, g, s, m in zip(weights, grads, scores, masks):
        m.copy_(s > t)
        s.sub_(SCORE_LR * g * w)
        g.masked_fill_(~m, 0)


def eager_movement_adam(weights, grads, scores, masks, exp_avg, exp_avg_sq, count: int) -> None:
    """Movement step with Adam on the scores as separate PyTorch ops (torch.optim.Adam's single-tensor
    arithmetic), in place (see the module docstring)."""
    step_size, bias2_sqrt = sparse_ops.ops.reference.adam_constants(SCORE_LR, ADAM["score_step"], ADAM["score_beta1"],
                                                                ADAM["score_beta2"])
    t = torch.kthvalue(torch.cat([s.flatten() for s in scores]), count).values
    for w, g, s, m, ea, eq in zip(weights, grads, scores, masks, exp_avg, exp_avg_sq):
        m.copy_(s > t)
        score_grad = g * w
        ea.lerp_(score_grad, 1 - ADAM["score_beta1"])
        eq.mul_(ADAM["score_beta2"]).addcmul_(score_grad, score_grad, value=1 - ADAM["score_beta2"])
        s.addcdiv_(ea, (eq.sqrt() / bias2_sqrt).add_(ADAM["score_eps"]), value=-step_size)
        g.masked_fill_(~m, 0)


EAGER = {"mgpp": eager_mgpp, "movement": eager_movement, "movement_adam": eager_movement_adam}


def eager_step(fn, state: State, method: str, count: int):
    if method == "mgpp":
        return lambda: fn(state.weights, state.grads, state.masks, count)
    if method == "movement_adam":
        return lambda: fn(state.weights, state.grads, state.scores, state.masks, state.exp_avg, state.exp_avg_sq,
                          count)
    return lambda: fn(state.weights, state.grads, state.scores, state.masks, count)


# ---------------------------------------------------------------------------------------------
# (c) sparse_ops
# ---------------------------------------------------------------------------------------------
class SparseOpsStep:
    """prune_threshold + fused_prune_step per matrix. For movement the histogram of the scores the
    op emits is kept as the next step's first_histogram (the first one is computed at construction)."""

    def __init__(self, state: State, method: str, count: int):
        self.state, self.method, self.count = state, method, count
        self.movement = method in MOVEMENT_METHODS
        self.adam = method == "movement_adam"
        self.offsets = [0]
        for w in state.weights[:-1]:
            self.offsets.append(self.offsets[-1] + w.numel())
        if self.movement:
            self.kwargs = dict(keys_from_scores=True, score_lr=SCORE_LR, **(ADAM if self.adam else {}))
            prefix = torch.zeros(2, dtype=torch.int64, device=state.weights[0].device)
            self.histogram = torch.ops.sparse_ops.radix_histogram(state.scores, prefix, 0, False)
        else:
            self.kwargs = dict(keys_from_scores=False, prior_scale=PRIOR_SCALE, **PRIOR)
            self.histogram = None

    def threshold(self) -> sparse_ops.Threshold:
        if self.movement:
            return sparse_ops.prune_threshold(self.state.scores, self.count, first_histogram=self.histogram)
        return sparse_ops.prune_threshold(self.state.weights, self.count, absolute=True)

    def fused(self, thr: sparse_ops.Threshold) -> None:
        s = self.state
        histogram = torch.zeros_like(self.histogram) if self.movement else None
        none = [None] * len(s.weights)
        scores = s.scores if self.movement else none
        exp_avg, exp_avg_sq = (s.exp_avg, s.exp_avg_sq) if self.adam else (none, none)
        for w, g, sc, m, ea, eq, off in zip(s.weights, s.grads, scores, s.masks, exp_avg, exp_avg_sq, self.offsets):
            torch.ops.sparse_ops.fused_prune_step(w, g, sc, m, histogram, ea, eq, threshold=thr.value,
                                                  tie_cut=thr.tie_cut, index_offset=off, **self.kwargs)
        self.histogram = histogram

    def __call__(self) -> None:
        self.fused(self.threshold())


# ---------------------------------------------------------------------------------------------
# running one (set, method)
# ---------------------------------------------------------------------------------------------
def compare(state: State, ref: tuple[list, list]) -> str:
    ref_masks, ref_grads = ref
    differ, err, scale = 0, 0.0, 0.0
    for m, g, rm, rg in zip(state.masks, state.grads, ref_masks, ref_grads):
        same = m == rm
        differ += int((~same).sum())
        err = max(err, float(((g.float() - rg.float()) * same).abs().max()))
        scale = max(scale, float(rg.float().abs().max()))
    return f"mask≠eager {differ}, dG {err / scale:.1e}"


def bench_method(args, env, state: State, set_name: str, method: str, copy_gbps: float) -> list[dict]:
    dtype, device = state.weights[0].dtype, args.device
    numel = sum(w.numel() for w in state.weights)
    count = int(round(args.sparsity * numel))
    moments = 16 if method == "movement_adam" else 0  # two float32 buffers, read and written
    per_elem = dtype.itemsize * (3 + (2 if method in MOVEMENT_METHODS else 0)) + 1 + moments
    backend = "triton" if device == "cuda" else cpu_backend("fused_prune_step")
    eager_fn = EAGER[method]
    variants = [("eager", "aten", lambda: eager_step(eager_fn, state, method, count))]
    if not args.no_compile:
        variants.append(("compile", "inductor", lambda: eager_step(torch.compile(eager_fn), state, method, count)))
    variants.append(("sparse_ops", backend, lambda: SparseOpsStep(state, method, count)))

    def fused_only():
        step = SparseOpsStep(state, method, count)
        thr = step.threshold()
        return lambda: step.fused(thr)

    variants.append(("fused_only", backend, fused_only))

    rows, ref = [], None
    for variant, variant_backend, build in variants:
        print(f"  {set_name} {method} {variant} ...", flush=True)
        timing, compile_s, check, note = None, None, "", ""
        try:
            torch._dynamo.reset()
            state.reset()
            step = build()
            first_s = C.timed_first_call(step, device)
            compile_s = first_s if variant == "compile" else None
            if ref is None:
                ref = ([m.clone() for m in state.masks], [g.clone() for g in state.grads])
            else:
                check = compare(state, ref)
            timing = C.time_fn(step, device, warmup=args.warmup - 1, repeats=args.repeats, setup=state.restore_grads)
        except Exception as exc:  # a failing variant is recorded, the others still run
            traceback.print_exc()
            note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append(C.make_row(env, bench="fused_prune_step", set_name=set_name, numel=numel, dtype=dtype,
                               method=method, variant=variant, backend=variant_backend, timing=timing,
                               bytes_moved=per_elem * numel, copy_gbps=copy_gbps, compile_s=compile_s,
                               check=check, note=note))
    return rows


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sets", default=None,
                   help=f"comma list of {list(C.SETS)} (default bert-base,1b; tiny with --quick)")
    p.add_argument("--methods", default="mgpp,movement,movement_adam")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction pruned by the global threshold")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = C.resolve_args(p.parse_args())
    sets = (args.sets or ("tiny" if args.quick else "bert-base,1b")).split(",")
    dtype = getattr(torch, args.dtype)
    env = C.environment(args.device)
    copy_gbps = C.copy_bandwidth_gbps(args)
    print(f"device: {env['device']}; copy bandwidth {copy_gbps:.1f} GB/s; {args.repeats} repeats, "
          f"{args.warmup} warmup; sparsity {args.sparsity}; dtype {args.dtype}")

    notes = C.cpu_notes(("fused_prune_step", "radix_histogram")) if args.device == "cpu" else []
    rows = []
    for set_name in sets:
        shapes = C.SETS[set_name]
        numel = sum(r * c for r, c in shapes)
        if args.device == "cpu" and set_name in C.GPU_ONLY_SETS:
            note = f"skipped set {set_name!r} ({numel / 1e9:.2f}B params) on CPU: {C.GPU_ONLY_SETS[set_name]}"
            print(note)
            notes.append(note)
            rows.append(C.make_row(env, bench="fused_prune_step", set_name=set_name, numel=numel, dtype=dtype,
                                   method=args.methods, variant="skipped", backend="", timing=None, bytes_moved=0,
                                   copy_gbps=copy_gbps, note=note))
            continue
        print(f"set {set_name}: {len(shapes)} matrices, {numel / 1e6:.1f}M params")
        state = State.random(shapes, dtype, args.device)
        for method in args.methods.split(","):
            rows += bench_method(args, env, state, set_name, method, copy_gbps)
        del state

    C.finish(rows, args, env, copy_gbps, notes, f"fused_prune_step_{args.dtype}",
             f"fused prune step, {args.dtype}, {env['device']}", sparsity=args.sparsity)

if __name__ == "__main__":
    main()
