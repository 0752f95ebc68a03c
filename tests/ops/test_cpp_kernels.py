"""The C++ CPU kernels of sparse_ops._C (csrc/cpu) against the plain-PyTorch references.

The private ops torch.ops.sparse_ops.<op>_cpu are called directly, on fresh random inputs: odd
shapes, every dtype, extreme values, many ties. Masks, histograms, scores and masked weights must
match exactly; outputs that go through exp() (the prior, the sigmoid of the soft-movement L1 term) to
within a few ulps. With sigmoid_l1 != 0 the emitted histogram must be the histogram of the kernel's
own updated scores (which may differ from the reference's by an ulp). With Adam moments, the scores
must equal the reference's formula with a correctly rounded square root bit for bit (torch's CPU
sqrt, MKL VML's, is only within 1 ulp), and the reference's own scores to within a few ulps.

Skipped when the extension was not built, unless SPARSE_OPS_REQUIRE_EXT=1 (then it fails).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

import sparse_ops
from conftest import MOVEMENT, op_flags

from sparse_ops.ops import reference
from sparse_ops.pruning import METHODS
from sparse_ops.ops import CPP_OPS, cpu_backend

BUILT = all(cpu_backend(op) == "cpp" for op in CPP_OPS)
REQUIRED = os.environ.get("SPARSE_OPS_REQUIRE_EXT") == "1"
pytestmark = pytest.mark.skipif(not BUILT and not REQUIRED, reason="sparse_ops._C was not built")

OPS = torch.ops.sparse_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# relative tolerance for values that pass through exp(): a few ulps of the compute type, or one
# rounding of the output dtype
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EXTREMES = [0.0, -0.0, 1e-6, -1e-6, 10.0, -10.0, 1.0, -3e-4, 5e-3]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def test_extension_loaded():
    assert BUILT, f"sparse_ops._C not loaded: {sparse_ops.extension_error()}"


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, rtol: float,
                        what: str) -> None:
    """|actual − expected| ≤ rtol·(|expected| + |scale|) elementwise; infinities and NaNs must agree."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e, s = actual.double(), expected.double(), scale.double().abs()
    same = (a == e) | (a.isnan() & e.isnan())
    finite = a.isfinite() & e.isfinite() & s.isfinite()
    ok = same | (finite & ((a - e).abs() <= rtol * (e.abs() + s)))
    if not bool(ok.all()):
        i = int((~ok).flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} mismatches, first at {i}: "
                             f"{a.flatten()[i].item()!r} vs {e.flatten()[i].item()!r}")


def stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def random_values(shape, dtype, gen, extremes=True) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.rand(shape, generator=gen, dtype=torch.float64)
    if extremes and x.numel() > 0:
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (min(flat.numel(), 3 * len(EXTREMES)),), generator=gen)
        for j, p in enumerate(picks.tolist()):
            flat[p] = EXTREMES[j % len(EXTREMES)]
    return x.to(dtype)


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Same values, transposed (or strided) memory."""
    if x.dim() >= 2:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]


# ---------------------------------------------------------------------------------------------
# mgp_prior_grad
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (), (3, 100), (2, 3, 17), (0, 5)])
@pytest.mark.parametrize("var0", [1e-10, 1e-12, 1e-3])
def test_mgp_prior_grad(dtype, shape, var0):
    gen = torch.Generator().manual_seed(stable_seed(dtype, shape, var0))
    w = random_values(shape, dtype, gen) * 0.05
    for lam, var1, scale in ((0.1, 0.05, 1.0), (1e-4, 0.1, 1 / 12808), (0.9, 2.0 * var0, -2.5)):
        out = OPS.mgp_prior_grad_cpu(w, lam, var0, var1, scale)
        ref = reference.mgp_prior_grad_ref(w, lam, var0, var1, scale)
        assert out.is_contiguous()
        assert_close_scaled(out, ref, ref, RTOL[dtype], f"mgp_prior_grad {dtype} {shape} lam={lam}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_mgp_prior_grad_extremes_are_stable(dtype):
    """θ = 0, tiny, huge with var0 down to 1e-12: no NaN, and the reference's values."""
    values = [0.0, -0.0, 1e-30, 1e-6, -1e-6, 1e-3, 10.0, -10.0, 1e4]
    w = torch.tensor(values, dtype=torch.float64).to(dtype)
    for var0 in (1e-10, 1e-12):
        out = OPS.mgp_prior_grad_cpu(w, 0.1, var0, 0.05, 1.0)
        assert not out.isnan().any()
        assert_close_scaled(out, reference.mgp_prior_grad_ref(w, 0.1, var0, 0.05), out, RTOL[dtype], "extremes")


def test_mgp_prior_grad_non_contiguous():
    gen = torch.Generator().manual_seed(0)
    w = non_contiguous(random_values((37, 53), torch.float32, gen))
    assert not w.is_contiguous()
    out = OPS.mgp_prior_grad_cpu(w, 0.1, 1e-10, 0.05, 1.0)
    assert out.is_contiguous()
    ref = reference.mgp_prior_grad_ref(w, 0.1, 1e-10, 0.05)
    assert_close_scaled(out, ref, ref, RTOL[torch.float32], "non-contiguous")


def test_mgp_prior_grad_rejects_bad_dtype():
    with pytest.raises(RuntimeError, match="w must have dtype"):
        OPS.mgp_prior_grad_cpu(torch.ones(3, dtype=torch.int32), 0.1, 1e-10, 0.05, 1.0)


# ---------------------------------------------------------------------------------------------
# radix_histogram
# ---------------------------------------------------------------------------------------------
def histogram_inputs(dtype, gen):
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 1.0, -1.0,
                             1e-6, -1e-6, 65504.0, 1e-40], dtype=torch.float64).to(dtype)
    ties = torch.randint(-3, 4, (97,), generator=gen).to(dtype)
    dense = random_values((37, 53), dtype, gen)
    return [dense, non_contiguous(random_values((5, 9), dtype, gen)), specials, ties,
            torch.empty(0, dtype=dtype), random_values((1, 1), dtype, gen)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("absolute", [False, True])
def test_radix_histogram_every_level(dtype, absolute):
    gen = torch.Generator().manual_seed(DTYPES.index(dtype) * 2 + absolute)
    xs = histogram_inputs(dtype, gen)
    bits = reference.KEY_BITS[dtype]
    levels = bits // reference.RADIX_BITS
    # prefixes of real keys (so deeper levels count something), plus one that matches nothing
    keys = reference.order_keys(torch.cat([x.flatten() for x in xs]), absolute)
    samples = [int(keys[i]) & ((1 << bits) - 1) for i in (0, 7, keys.numel() - 3)]
    for level in range(levels):
        shift = bits - reference.RADIX_BITS * level
        prefixes = {key >> shift for key in samples} if level else {0}
        if level:
            prefixes.add((1 << (bits - shift)) - 1)
        for prefix in prefixes:
            state = torch.tensor([prefix if prefix < 2**63 else prefix - 2**64, 5], dtype=torch.int64)
            out = OPS.radix_histogram_cpu(xs, state, level, absolute)
            ref = reference.radix_histogram_ref(xs, state, level, absolute)
            assert_identical(out, ref, f"radix_histogram {dtype} level={level} prefix={prefix}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_radix_histogram_large_parallel(dtype):
    """Enough elements for several threads: per-thread histograms must merge exactly."""
    gen = torch.Generator().manual_seed(11)
    xs = [random_values((300_001,), dtype, gen), torch.randint(-5, 5, (70_000,), generator=gen).to(dtype)]
    state = torch.zeros(2, dtype=torch.int64)
    out = OPS.radix_histogram_cpu(xs, state, 0, True)
    assert_identical(out, reference.radix_histogram_ref(xs, state, 0, True), "large")
    assert int(out.sum()) == sum(x.numel() for x in xs)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kthvalue_through_cpp_histograms(dtype):
    """End to end: the public kthvalue (radix select over the C++ histograms) equals torch.kthvalue."""
    assert cpu_backend("radix_histogram") == "cpp"
    gen = torch.Generator().manual_seed(3)
    x = non_contiguous(random_values((37, 53), dtype, gen))
    for k in (1, 2, 977, x.numel() - 1, x.numel()):
        assert_identical(OPS.kthvalue(x, k), torch.kthvalue(x.flatten(), k).values, f"kthvalue k={k}")


# ---------------------------------------------------------------------------------------------
# fused_prune_step
# ---------------------------------------------------------------------------------------------
SHAPES = {
    "element": [((37, 53), (1, 1)), ((1, 1), (1, 1)), ((), (1, 1)), ((2, 3, 17), (1, 1)), ((0, 4), (1, 1))],
    "block": [((37, 53), (8, 8)), ((3, 100), (32, 32)), ((64, 64), (32, 32)), ((1, 1), (1, 1)),
              ((70, 33), (32, 16)), ((5, 7), (2, 3))],
    "2:4": [((37, 52), (1, 1)), ((1, 4), (1, 1)), ((8, 64), (1, 1))],
}
OPTIONS = [  # (prior_scale, var0, score_lr, mask_grad, mask_weight, sigmoid_l1)
    (0.0, 1e-10, 0.1, True, False, 0.0),
    (1 / 12808, 1e-10, 0.0, True, True, 0.0),
    (0.5, 1e-12, 0.05, False, True, 0.0),
    (0.0, 1e-10, 0.0, False, False, 0.0),
    (0.0, 1e-10, 0.1, True, True, 0.5),  # soft-movement L1 term on sigmoid(scores)
    (1 / 12808, 1e-10, 0.05, False, False, 1e-3),
]


def make_tensor(shape, dtype, gen, kind, block=None):
    """kind='ties': half-integer values, many equal keys; with `block` (rows, cols), constant per
    block too, so that block keys tie as well."""
    if kind != "ties":
        return random_values(shape, dtype, gen)
    if block is None:
        return (torch.randint(-3, 4, shape, generator=gen) * 0.5).to(dtype)
    (rows, cols), (br, bc) = shape, block
    per_block = torch.randint(-2, 3, (-(-rows // br), -(-cols // bc)), generator=gen) * 0.5
    full = per_block.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return full.contiguous().to(dtype)


def pick_threshold(keys: torch.Tensor, index_offset: int, gen) -> tuple[float, int]:
    """A threshold equal to a key value that ties with others, and a tie_cut in the middle of its ties."""
    flat = keys.flatten()
    if flat.numel() == 0:
        return 0.0, 0
    value = flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))]
    positions = (flat == value).nonzero().flatten()
    if positions.numel() == 0:  # NaN key
        return 0.0, index_offset
    middle = int(positions[positions.numel() // 2])
    return float(value), index_offset + middle


def run_both(*tensors, **kwargs):
    """Run the C++ kernel and the reference on separate clones (strides preserved) of the tensor
    arguments (weight, grad, scores, mask, histogram[, score_exp_avg, score_exp_avg_sq])."""
    def clones():
        return [None if t is None else t.clone() for t in tensors]

    cpp, ref = clones(), clones()
    OPS.fused_prune_step_cpu(*cpp, **kwargs)
    reference.fused_prune_step_ref(*ref, **kwargs)
    return cpp, ref


def check_fused(cpp, ref, kwargs, what, weight, scores=None, histogram=None):
    """Everything identical, except what goes through exp(): the grad when the prior is added (within
    a few ulps of |grad| + |prior(weight at entry)|) and, with sigmoid_l1 != 0, the scores (within a
    few ulps of |scores at entry| + |score_lr·sigmoid_l1|). The histogram must always be the level-0
    histogram of the keys of the kernel's own output (plus the histogram passed in); with
    sigmoid_l1 == 0 it must also equal the reference's."""
    (w1, g1, s1, m1, h1), (w2, g2, s2, m2, h2) = cpp, ref
    assert_identical(m1, m2, f"{what} mask")
    assert_identical(w1, w2, f"{what} weight")
    sigmoid = kwargs.get("sigmoid_l1", 0.0) != 0.0 and kwargs["score_lr"] != 0.0 and s1 is not None
    if s1 is not None:
        if sigmoid:
            ct = reference.compute_dtype(weight.dtype)
            scale = scores.to(ct).abs() + abs(kwargs["score_lr"] * kwargs["sigmoid_l1"])
            assert_close_scaled(s1, s2, scale, RTOL[s2.dtype], f"{what} scores")
        else:
            assert_identical(s1, s2, f"{what} scores")
    if h1 is not None:
        keys = reference.prune_keys_ref(w1, s1, kwargs["keys_from_scores"], kwargs["granularity"], kwargs["block_rows"],
                                        kwargs["block_cols"])
        state = torch.zeros(2, dtype=torch.int64)
        own = histogram + reference.radix_histogram_ref([keys], state, 0, absolute=False)
        assert_identical(h1, own, f"{what} histogram of the kernel's own scores")
        if not sigmoid:
            assert_identical(h1, h2, f"{what} histogram")
    if kwargs["prior_scale"] == 0.0:
        assert_identical(g1, g2, f"{what} grad")
    else:
        prior = reference.mgp_prior_grad_ref(weight.to(reference.compute_dtype(weight.dtype)), kwargs["lam"],
                                             kwargs["var0"], kwargs["var1"], kwargs["prior_scale"])
        assert_close_scaled(g1, g2, prior, RTOL[g2.dtype], f"{what} grad")


def fused_cases():
    for method, granularity in itertools.product(METHODS, reference.GRANULARITIES):
        pairs = [(dtype, dtype) for dtype in DTYPES]
        if granularity == "element":  # scores in another dtype than the weight
            pairs += [(torch.float32, torch.float16), (torch.bfloat16, torch.float32), (torch.float64, torch.float16)]
        for dtype, score_dtype in pairs:
            yield pytest.param(method, granularity, dtype, score_dtype,
                               id=f"{method}-{granularity}-{dtype_id(dtype)}-scores_{dtype_id(score_dtype)}")


@pytest.mark.parametrize("method,granularity,dtype,score_dtype", list(fused_cases()))
def test_fused_prune_step(method, granularity, dtype, score_dtype):
    movement = method in ("movement", "soft_movement")
    gen = torch.Generator().manual_seed(stable_seed(method, granularity, dtype, score_dtype))
    for case, ((shape, (br, bc)), options) in enumerate(itertools.product(SHAPES[granularity], OPTIONS)):
        prior_scale, var0, score_lr, mask_grad, mask_weight, sigmoid_l1 = options
        kind = "ties" if case % 2 == 0 else "random"
        block = (br, bc) if granularity == "block" else None
        weight = make_tensor(shape, dtype, gen, kind, block)
        grad = random_values(shape, dtype, gen)
        with_scores = movement or case % 3 == 0
        scores = make_tensor(shape, score_dtype, gen, kind, block) if with_scores else None
        mask = torch.rand(shape, generator=gen) < 0.5
        histogram = torch.randint(0, 100, (reference.RADIX_BINS + 1,), generator=gen) if movement else None
        if case % 4 == 1 and len(shape) == 2:
            weight, grad, mask = non_contiguous(weight), non_contiguous(grad), non_contiguous(mask)
            scores = None if scores is None else non_contiguous(scores)
        index_offset = [0, 5, 1000][case % 3]
        keys = reference.prune_keys_ref(weight, scores, method in MOVEMENT, granularity, br, bc)
        threshold, tie_cut = pick_threshold(keys, index_offset, gen)
        if case % 5 == 4:  # a threshold that is not representable in the key dtype
            threshold = threshold + 0.1
        kwargs = dict(**op_flags(method), granularity=granularity, block_rows=br, block_cols=bc, threshold=threshold,
                      tie_cut=tie_cut, index_offset=index_offset, prior_scale=prior_scale, lam=0.1, var0=var0,
                      var1=0.05, score_lr=score_lr if with_scores else 0.0, sigmoid_l1=sigmoid_l1,
                      mask_grad=mask_grad, mask_weight=mask_weight)
        cpp, ref = run_both(weight, grad, scores, mask, histogram, **kwargs)
        check_fused(cpp, ref, kwargs, f"case {case} shape={shape} block=({br},{bc}) {kwargs}", weight, scores,
                    histogram)


@pytest.mark.parametrize("threshold", [-math.inf, math.inf, 0.0])
@pytest.mark.parametrize("method", METHODS)
def test_fused_prune_step_threshold_edges(method, threshold):
    """0% and 100% pruning, and a zero threshold with zero keys present (ties at ±0)."""
    gen = torch.Generator().manual_seed(5)
    shape = (33, 40)
    weight = make_tensor(shape, torch.float32, gen, "ties", (4, 8))
    scores = make_tensor(shape, torch.float32, gen, "ties", (4, 8))
    grad = random_values(shape, torch.float32, gen)
    mask = torch.zeros(shape, dtype=torch.bool)
    histogram = torch.zeros(reference.RADIX_BINS + 1, dtype=torch.int64) if method.endswith("movement") else None
    for granularity, (br, bc) in (("element", (1, 1)), ("block", (4, 8))):
        kwargs = dict(**op_flags(method), granularity=granularity, block_rows=br, block_cols=bc, threshold=threshold,
                      tie_cut=300, index_offset=0, prior_scale=0.0, lam=0.1, var0=1e-10, var1=0.05, score_lr=0.0,
                      mask_grad=True, mask_weight=True)
        cpp, ref = run_both(weight, grad, scores, mask, histogram, **kwargs)
        check_fused(cpp, ref, kwargs, f"{granularity} threshold={threshold}", weight, scores, histogram)


def test_fused_prune_step_large_parallel():
    """A 3072x768 step (several threads, many chunks) equals the reference exactly."""
    gen = torch.Generator().manual_seed(9)
    shape = (3072, 768)
    weight = random_values(shape, torch.float32, gen, extremes=False)
    grad = random_values(shape, torch.float32, gen, extremes=False)
    scores = random_values(shape, torch.float32, gen, extremes=False)
    mask = torch.zeros(shape, dtype=torch.bool)
    histogram = torch.zeros(reference.RADIX_BINS + 1, dtype=torch.int64)
    cases = itertools.product((("element", (1, 1)), ("block", (32, 32)), ("2:4", (1, 1))), (0.0, 1e-2))
    for (granularity, (br, bc)), sigmoid_l1 in cases:
        keys = reference.prune_keys_ref(weight, scores, True, granularity, br, bc)
        threshold, tie_cut = pick_threshold(keys, 0, gen)
        kwargs = dict(keys_from_scores=True, granularity=granularity, block_rows=br, block_cols=bc, threshold=threshold,
                      tie_cut=tie_cut, index_offset=0, prior_scale=1e-4, lam=0.1, var0=1e-10, var1=0.05,
                      score_lr=0.01, sigmoid_l1=sigmoid_l1, mask_grad=True, mask_weight=False)
        cpp, ref = run_both(weight, grad, scores, mask, histogram, **kwargs)
        check_fused(cpp, ref, kwargs, f"large {granularity} sigmoid_l1={sigmoid_l1}", weight, scores, histogram)


def test_fused_prune_step_rejects_bad_arguments():
    w = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="mask must have dtype bool"):
        OPS.fused_prune_step_cpu(w, w.clone(), None, torch.zeros(4, 4), None, keys_from_scores=False)
    with pytest.raises(RuntimeError, match="grad must have the shape of weight"):
        OPS.fused_prune_step_cpu(w, torch.zeros(4, 5), None, w.bool(), None, keys_from_scores=False)
    with pytest.raises(RuntimeError, match="histogram must be int64"):
        OPS.fused_prune_step_cpu(w, w.clone(), w.clone(), w.bool(), torch.zeros(256, dtype=torch.int64),
                                 keys_from_scores=True)
    with pytest.raises(RuntimeError, match="scores is required"):
        OPS.fused_prune_step_cpu(w, w.clone(), None, w.bool(), None, keys_from_scores=True)
    with pytest.raises(RuntimeError, match="granularity must be one of"):
        OPS.fused_prune_step_cpu(w, w.clone(), None, w.bool(), None, keys_from_scores=False, granularity="row")


# ---------------------------------------------------------------------------------------------
# fused_prune_step with Adam on the scores (score_exp_avg, score_exp_avg_sq)
# ---------------------------------------------------------------------------------------------
# (weight dtype, dtype of scores and moments): 16/32-bit weights with float32 scores, float64 everything
ADAM_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
               (torch.float64, torch.float64)]
ADAM_OPTIONS = [  # (prior_scale, score_lr, mask_grad, mask_weight, sigmoid_l1, beta1, beta2, eps)
    (0.0, 1e-2, True, False, 0.0, 0.9, 0.999, 1e-8),  # torch.optim.Adam's defaults
    (1 / 12808, 5e-2, False, True, 0.0, 0.0, 0.5, 1e-12),  # β1 = 0, tiny eps
    (0.0, 1e-2, True, True, 0.5, 0.9, 0.999, 1e-8),  # soft-movement L1 term on sigmoid(scores)
    (0.5, 1e-3, False, False, 1e-3, 0.8, 0.99, 1e-6),
]
ADAM_STEPS = 5  # score_step 1..5 in a row, so the moments and both bias corrections matter


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded √x elementwise, in x.dtype: math.sqrt in float64 (for float32 x the float64
    root rounds to the correctly rounded float32 root). torch's own CPU sqrt goes through MKL VML
    (within 1 ulp, not always correctly rounded), so the reference's √v may differ from IEEE's by an ulp."""
    root = [math.sqrt(v) if v >= 0 else math.nan for v in x.flatten().tolist()]
    return torch.tensor(root, dtype=torch.float64).to(x.dtype).view(x.shape)


def adam_scores_ieee(scores: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     weight_dtype: torch.dtype, kwargs) -> torch.Tensor:
    """The reference's Adam step on `scores` (at entry) from the updated moments, every operation of
    the reference's in its order and rounding, with ieee_sqrt in place of torch's sqrt: what the kernel
    must compute bit for bit (the moments are stored in the compute dtype in every case tested)."""
    ct = reference.compute_dtype(weight_dtype)
    assert exp_avg.dtype == exp_avg_sq.dtype == ct
    step_size, bias2_sqrt = reference.adam_constants(kwargs["score_lr"], kwargs["score_step"], kwargs["score_beta1"],
                                                     kwargs["score_beta2"])
    s, m, v = scores.to(ct), exp_avg, exp_avg_sq
    return (s + (-step_size * m) / (ieee_sqrt(v) / bias2_sqrt + kwargs["score_eps"])).to(scores.dtype)


def check_fused_adam(cpp, ref, kwargs, what, entry):
    """The kernel's step with Adam moments against the reference's, both run on `entry`:
    * mask and weight identical; grad identical (within a few ulps of the prior when there is one);
    * moments identical when sigmoid_l1 == 0, else within a few ulps of |moment at entry| + |G| (resp.
      v + G²), G bounded by |g·w| + |sigmoid_l1| (the σ term goes through exp());
    * scores bit-identical to the reference's step computed from the kernel's own moments with a
      correctly rounded √ (adam_scores_ieee), and within a few ulps of the reference's (whose √ is
      torch's MKL sqrt);
    * histogram = histogram passed in + level-0 histogram of the kernel's own updated scores, and
      the reference's whenever the scores agree."""
    (w1, g1, s1, m1, h1, ea1, eas1), (w2, g2, s2, m2, h2, ea2, eas2) = cpp, ref
    weight, grad, scores, _, histogram, exp_avg, exp_avg_sq = entry
    ct = reference.compute_dtype(weight.dtype)
    assert_identical(m1, m2, f"{what} mask")
    assert_identical(w1, w2, f"{what} weight")
    if kwargs["sigmoid_l1"] == 0.0:
        assert_identical(ea1, ea2, f"{what} score_exp_avg")
        assert_identical(eas1, eas2, f"{what} score_exp_avg_sq")
    else:
        g_bound = (grad.to(ct) * weight.to(ct)).abs() + abs(kwargs["sigmoid_l1"])
        assert_close_scaled(ea1, ea2, exp_avg.to(ct).abs() + g_bound, RTOL[ct], f"{what} score_exp_avg")
        assert_close_scaled(eas1, eas2, exp_avg_sq.to(ct) + g_bound * g_bound, RTOL[ct], f"{what} score_exp_avg_sq")
    assert_identical(s1, adam_scores_ieee(scores, ea1, eas1, weight.dtype, kwargs), f"{what} scores (IEEE √)")
    step = (s2.double() - scores.double()).abs()
    assert_close_scaled(s1, s2, scores.abs() + step, RTOL[ct], f"{what} scores (reference)")
    keys = reference.prune_keys_ref(w1, s1, kwargs["keys_from_scores"], kwargs["granularity"], kwargs["block_rows"],
                                    kwargs["block_cols"])
    own = histogram + reference.radix_histogram_ref([keys], torch.zeros(2, dtype=torch.int64), 0, absolute=False)
    assert_identical(h1, own, f"{what} histogram of the kernel's own scores")
    if torch.equal(s1, s2):
        assert_identical(h1, h2, f"{what} histogram")
    if kwargs["prior_scale"] == 0.0:
        assert_identical(g1, g2, f"{what} grad")
    else:
        prior = reference.mgp_prior_grad_ref(weight.to(ct), kwargs["lam"], kwargs["var0"], kwargs["var1"],
                                             kwargs["prior_scale"])
        assert_close_scaled(g1, g2, prior, RTOL[g2.dtype], f"{what} grad")
    if bool((grad.to(ct) * weight.to(ct) != 0).any()):  # the step did something
        assert not torch.equal(s1, scores) and not torch.equal(eas1, exp_avg_sq), what


def adam_moments(shape, dtype, gen, fresh: bool):
    """Moment buffers: zeros (a fresh optimizer), or a random state (m any sign, v ≥ 0)."""
    if fresh:
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    m = random_values(shape, torch.float64, gen) * 0.01
    v = random_values(shape, torch.float64, gen).square() * 1e-3
    return m.to(dtype), v.to(dtype)


def adam_kwargs(method, granularity, br, bc, options, step, threshold, tie_cut, index_offset):
    prior_scale, score_lr, mask_grad, mask_weight, sigmoid_l1, beta1, beta2, eps = options
    return dict(**op_flags(method), granularity=granularity, block_rows=br, block_cols=bc, threshold=threshold,
                tie_cut=tie_cut, index_offset=index_offset, prior_scale=prior_scale, lam=0.1, var0=1e-10, var1=0.05,
                score_lr=score_lr, sigmoid_l1=sigmoid_l1, score_step=step, score_beta1=beta1, score_beta2=beta2,
                score_eps=eps, mask_grad=mask_grad, mask_weight=mask_weight)


@pytest.mark.parametrize("dtype,score_dtype", ADAM_DTYPES,
                         ids=[f"{dtype_id(w)}-scores_{dtype_id(s)}" for w, s in ADAM_DTYPES])
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
@pytest.mark.parametrize("method", ["movement", "soft_movement"])
def test_fused_prune_step_adam(method, granularity, dtype, score_dtype):
    """Adam on the scores, ADAM_STEPS consecutive steps (score_step 1, 2, ...), each from the kernel's
    own state (both run on the same inputs every step): odd shapes, ties, partial blocks,
    non-contiguous tensors and moments, with and without the histogram's input counts, fresh and
    random moments (see check_fused_adam for what must agree)."""
    gen = torch.Generator().manual_seed(stable_seed("adam", method, granularity, dtype, score_dtype))
    for case, ((shape, (br, bc)), options) in enumerate(itertools.product(SHAPES[granularity], ADAM_OPTIONS)):
        kind = "ties" if case % 2 == 0 else "random"
        block = (br, bc) if granularity == "block" else None
        weight = make_tensor(shape, dtype, gen, kind, block)
        scores = make_tensor(shape, score_dtype, gen, kind, block)
        exp_avg, exp_avg_sq = adam_moments(shape, score_dtype, gen, fresh=case % 3 == 0)
        mask = torch.rand(shape, generator=gen) < 0.5
        histogram = torch.randint(0, 100, (reference.RADIX_BINS + 1,), generator=gen)
        strided = case % 4 == 1 and len(shape) == 2 and min(shape) > 1
        for step in range(1, ADAM_STEPS + 1):
            grad = random_values(shape, dtype, gen)
            index_offset = [0, 5, 1000][(case + step) % 3]
            keys = reference.prune_keys_ref(weight, scores, method in MOVEMENT, granularity, br, bc)
            threshold, tie_cut = pick_threshold(keys, index_offset, gen)
            kwargs = adam_kwargs(method, granularity, br, bc, options, step, threshold, tie_cut, index_offset)
            entry = [weight, grad, scores, mask, histogram, exp_avg, exp_avg_sq]
            if strided:
                entry = [t if t is histogram else non_contiguous(t) for t in entry]
                assert not entry[5].is_contiguous() and not entry[6].is_contiguous()
            cpp, ref = run_both(*entry, **kwargs)
            check_fused_adam(cpp, ref, kwargs, f"case {case} step {step} shape={shape} block=({br},{bc}) {kwargs}",
                             entry)
            weight, _, scores, mask, histogram, exp_avg, exp_avg_sq = (t.contiguous() for t in cpp)


def test_fused_prune_step_adam_large_parallel():
    """A 1536x768 Adam step (several threads, many chunks) in every granularity."""
    gen = torch.Generator().manual_seed(19)
    shape = (1536, 768)
    weight = random_values(shape, torch.float32, gen, extremes=False)
    grad = random_values(shape, torch.float32, gen, extremes=False)
    scores = random_values(shape, torch.float32, gen, extremes=False)
    exp_avg, exp_avg_sq = adam_moments(shape, torch.float32, gen, fresh=False)
    mask = torch.zeros(shape, dtype=torch.bool)
    histogram = torch.zeros(reference.RADIX_BINS + 1, dtype=torch.int64)
    cases = itertools.product((("element", (1, 1)), ("block", (32, 32)), ("2:4", (1, 1))), (0.0, 1e-2))
    for (granularity, (br, bc)), sigmoid_l1 in cases:
        keys = reference.prune_keys_ref(weight, scores, True, granularity, br, bc)
        threshold, tie_cut = pick_threshold(keys, 0, gen)
        options = (1e-4, 1e-2, True, False, sigmoid_l1, 0.9, 0.999, 1e-8)
        kwargs = adam_kwargs("movement", granularity, br, bc, options, 7, threshold, tie_cut, 0)
        entry = [weight, grad, scores, mask, histogram, exp_avg, exp_avg_sq]
        cpp, ref = run_both(*entry, **kwargs)
        check_fused_adam(cpp, ref, kwargs, f"large {granularity} sigmoid_l1={sigmoid_l1}", entry)


@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
def test_fused_prune_step_adam_non_contiguous_moments(granularity):
    """Non-contiguous moment buffers (transposed, and every other column of a wider buffer) are read
    and updated in place, through the C++ kernel directly and through the public op: the results
    equal a run on contiguous copies bit for bit, and nothing outside the views is written."""
    gen = torch.Generator().manual_seed(stable_seed("adam strided", granularity))
    shape, (br, bc) = (24, 40), ((4, 8) if granularity == "block" else (1, 1))
    weight = random_values(shape, torch.float32, gen)
    scores = random_values(shape, torch.float32, gen)
    exp_avg, exp_avg_sq = adam_moments(shape, torch.float32, gen, fresh=False)
    kwargs = dict(keys_from_scores=True, granularity=granularity, block_rows=br, block_cols=bc, threshold=0.0,
                  score_lr=1e-2, score_step=3)

    def call(op, exp_avg, exp_avg_sq):
        w, s = weight.clone(), scores.clone()
        grad = random_values(shape, torch.float32, torch.Generator().manual_seed(4))
        mask = torch.zeros(shape, dtype=torch.bool)
        histogram = torch.zeros(reference.RADIX_BINS + 1, dtype=torch.int64)
        op(w, grad, s, mask, histogram, exp_avg, exp_avg_sq, **kwargs)
        return [w, grad, s, mask, histogram]

    want_avg, want_avg_sq = exp_avg.clone(), exp_avg_sq.clone()
    want = call(OPS.fused_prune_step_cpu, want_avg, want_avg_sq)
    for op in (OPS.fused_prune_step_cpu, OPS.fused_prune_step):
        transposed = (non_contiguous(exp_avg), non_contiguous(exp_avg_sq))
        wide = [torch.full((shape[0], 2 * shape[1]), 7.0) for _ in range(2)]
        for buffer, moment in zip(wide, (exp_avg, exp_avg_sq)):
            buffer[:, ::2] = moment
        strided = (wide[0][:, ::2], wide[1][:, ::2])
        for avg, avg_sq in (transposed, strided):
            assert not avg.is_contiguous() and not avg_sq.is_contiguous()
            ptrs = (avg.data_ptr(), avg_sq.data_ptr(), avg.stride(), avg_sq.stride())
            got = call(op, avg, avg_sq)
            assert ptrs == (avg.data_ptr(), avg_sq.data_ptr(), avg.stride(), avg_sq.stride())
            for a, b, name in zip(got + [avg, avg_sq], want + [want_avg, want_avg_sq],
                                  ["weight", "grad", "scores", "mask", "histogram", "exp_avg", "exp_avg_sq"]):
                assert_identical(a, b, f"{op} {name}")
        for buffer in wide:
            assert bool((buffer[:, 1::2] == 7.0).all()), "wrote outside the moment views"
    assert not torch.equal(want_avg_sq, exp_avg_sq)


def test_fused_prune_step_adam_rejects_bad_arguments():
    """The public op's checks (Python, before any kernel) name the argument; so do the C++ kernel's."""
    w = torch.zeros(4, 4)
    ok = dict(keys_from_scores=True, score_lr=1e-2, score_step=1)

    def args(scores=None, exp_avg=None, exp_avg_sq=None):
        scores = torch.zeros(4, 4) if scores is None else scores
        return [w.clone(), w.clone(), scores, w.bool(), None, exp_avg, exp_avg_sq]

    moments = (torch.zeros(4, 4), torch.zeros(4, 4))
    bad = [
        (args(exp_avg=moments[0]), ok, ValueError, "score_exp_avg and score_exp_avg_sq must be given together"),
        (args(exp_avg_sq=moments[1]), ok, ValueError, "score_exp_avg and score_exp_avg_sq must be given together"),
        (args(None, moments[0], moments[1].double()), ok, TypeError, "score_exp_avg_sq must have dtype"),
        (args(None, moments[0].double(), moments[1]), ok, TypeError, "score_exp_avg must have dtype"),
        (args(None, torch.zeros(4, 5), moments[1]), ok, ValueError, "score_exp_avg must have the shape of weight"),
        (args(torch.zeros(4, 4, dtype=torch.float16), *[m.half() for m in moments]), ok, TypeError,
         "scores must be float32 or float64"),
        (args(None, *moments), dict(ok, score_step=0), ValueError, "score_step must be"),
        (args(None, *moments), dict(ok, score_beta2=1.0), ValueError, "score_beta2 must lie in"),
    ]
    cpp_message = {"score_step must be": "score_step must be >= 1"}
    for tensors, kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            OPS.fused_prune_step(*tensors, **kwargs)
        with pytest.raises(RuntimeError, match=cpp_message.get(message, message)):
            OPS.fused_prune_step_cpu(*tensors, **kwargs)
    # the same moments twice, or the scores as a moment: the kernel's buffers must be distinct
    s = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="score_exp_avg and score_exp_avg_sq must be different"):
        OPS.fused_prune_step_cpu(w.clone(), w.clone(), s, w.bool(), None, moments[0], moments[0], **ok)
    with pytest.raises(RuntimeError, match="score_exp_avg must not be the scores"):
        OPS.fused_prune_step_cpu(w.clone(), w.clone(), s, w.bool(), None, s, moments[1], **ok)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so +0 and -0, and NaN payloads, are told apart)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("granularity", reference.GRANULARITIES)
@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_fused_prune_step_masking_is_masked_fill(method, granularity, dtype):
    """Pruned entries of grad (mask_grad) and weight (mask_weight) become exactly +0, even where they
    are NaN, ±inf or -0 (masked_fill, not multiplication by the mask); kept entries keep their bits."""
    gen = torch.Generator().manual_seed(stable_seed("masked_fill", method, granularity, dtype))
    shape, (br, bc) = (24, 40), ((4, 8) if granularity == "block" else (1, 1))
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=torch.float64)
    weight = random_values(shape, torch.float64, gen, extremes=False)
    grad = random_values(shape, torch.float64, gen, extremes=False)
    grad.view(-1)[torch.randperm(grad.numel(), generator=gen)[:300]] = specials.repeat(75)
    if method == "magnitude":  # NaN weights are never kept (NaN keys); ±inf always are; -0 ties at 0
        weight.view(-1)[torch.randperm(weight.numel(), generator=gen)[:40]] = specials.repeat(10)
    weight, grad = weight.to(dtype), grad.to(dtype)
    scores = random_values(shape, dtype, gen, extremes=False) if method == "movement" else None
    mask = torch.zeros(shape, dtype=torch.bool)
    histogram = torch.zeros(reference.RADIX_BINS + 1, dtype=torch.int64) if method == "movement" else None
    keys = reference.prune_keys_ref(weight, scores, method in MOVEMENT, granularity, br, bc)
    finite = keys.flatten()[keys.flatten().isfinite()]
    threshold = float(finite.median()) if finite.numel() else 0.0
    for score_lr in ((0.0, 0.1) if method == "movement" else (0.0,)):
        kwargs = dict(**op_flags(method), granularity=granularity, block_rows=br, block_cols=bc, threshold=threshold,
                      tie_cut=0, index_offset=0, prior_scale=0.0, lam=0.1, var0=1e-10, var1=0.05,
                      score_lr=score_lr, sigmoid_l1=0.0, mask_grad=True, mask_weight=True)
        cpp, ref = run_both(weight, grad, scores, mask, histogram, **kwargs)
        check_fused(cpp, ref, kwargs, f"masked_fill score_lr={score_lr}", weight, scores, histogram)
        w1, g1, _, m1, _ = cpp
        pruned = ~m1
        assert bool(pruned.any()) and bool(m1.any())
        assert bool(grad[pruned].isnan().any() | grad[pruned].isinf().any()), "no special value was pruned"
        assert bool((bits(g1)[pruned] == 0).all()), "pruned grads must be exactly +0"
        assert bool((bits(w1)[pruned] == 0).all()), "pruned weights must be exactly +0"
        assert torch.equal(bits(g1)[m1], bits(grad)[m1]), "kept grads must keep their bits"
        assert torch.equal(bits(w1)[m1], bits(weight)[m1]), "kept weights must keep their bits"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_radix_histogram_select_walk(dtype):
    """Every level of a radix select over ~600k keys (several threads and chunks; at deep levels few
    keys match the prefix, the case where the kernel skips runs of non-matching keys)."""
    gen = torch.Generator().manual_seed(17)
    xs = [random_values((300_007,), dtype, gen) * 0.02, random_values((517, 600), dtype, gen)]
    bits_ = reference.KEY_BITS[dtype]
    for absolute, k in ((True, 500_000), (False, 12_345)):
        state = torch.tensor([0, k], dtype=torch.int64)
        for level in range(bits_ // reference.RADIX_BITS):
            out = OPS.radix_histogram_cpu(xs, state, level, absolute)
            assert_identical(out, reference.radix_histogram_ref(xs, state, level, absolute),
                             f"level {level} absolute={absolute}")
            sparse_ops.ops.select._select_digit(out, state)
        want = torch.cat([x.flatten() for x in xs])
        want = torch.kthvalue(want.abs() if absolute else want, k).values
        got = reference.key_to_value(int(state[0]) & ((1 << bits_) - 1), dtype)
        assert_identical(got, want, f"selected value absolute={absolute}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_16bit_conversions_match_torch(dtype):
    """The kernels convert fp16/bf16 with their own branch-free code: through the score update
    (float32 weight, so float32 math), every 16-bit pattern must survive the round trip, and ~1.3M
    float32 values (all exponents, plus the exact midpoints between neighbouring 16-bit values, where
    rounding must go to even) must round exactly as torch's .to(dtype) does."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    samples = torch.arange(0, 2**32, 4099, dtype=torch.int64)
    samples = torch.where(samples >= 2**31, samples - 2**32, samples).to(torch.int32).view(torch.float32)
    lo, hi = every.float().double(), every.float().double().nextafter(torch.tensor(math.inf, dtype=torch.float64))
    finite = every.isfinite()
    nxt = (every.view(torch.int16) + 1).view(dtype).double()  # the next pattern up (magnitude order)
    ok = finite & nxt.isfinite()
    midpoints = ((lo[ok] + nxt[ok]) / 2).float()
    values = torch.cat([samples, midpoints, hi.float(), every.float()])
    for name, scores, grad in (("round trip", every.clone(), torch.zeros(every.shape)),
                               ("rounding", torch.zeros(values.shape, dtype=dtype), -values)):
        weight = torch.ones(scores.shape)
        kwargs = dict(keys_from_scores=True, threshold=0.0, score_lr=1.0)
        cpp, ref = run_both(weight, grad, scores, torch.zeros(scores.shape, dtype=torch.bool), None, **kwargs)
        out, want = cpp[2], ref[2]
        nan = want.isnan()
        assert torch.equal(out.isnan(), nan), name
        assert torch.equal(bits(out)[~nan], bits(want)[~nan]), name
        if name == "rounding":
            direct = values.to(dtype)
            keep = ~nan & (values != 0)  # 0 - (-(-0)) is +0
            assert torch.equal(bits(out)[keep], bits(direct)[keep]), "differs from torch's .to()"
        else:
            assert torch.equal(bits(out)[~nan], bits(every)[~nan])


_ISA_SCRIPT = r"""
import sys, torch, sparse_ops
assert sparse_ops.extension_error() is None, sparse_ops.extension_error()
from sparse_ops.ops import reference
OPS = torch.ops.sparse_ops
gen = torch.Generator().manual_seed(1)
out = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    x = (torch.randn(1001, 37, generator=gen, dtype=torch.float64) * 0.03).to(dtype)
    x.view(-1)[:9] = torch.tensor([0.0, -0.0, 1e-30, 1e-4, -1e-4, 10.0, float("inf"), float("nan"), -1.0],
                                  dtype=torch.float64).to(dtype)
    out[f"prior {dtype}"] = OPS.mgp_prior_grad_cpu(x, 0.1, 1e-10, 0.05, 0.25)
    state = torch.zeros(2, dtype=torch.int64)
    out[f"hist {dtype}"] = OPS.radix_histogram_cpu([x, x[:, 3:]], state, 0, True)
    state = torch.tensor([int(out[f"hist {dtype}"][:256].argmax()), 0])
    out[f"hist1 {dtype}"] = OPS.radix_histogram_cpu([x, x[:, 3:]], state, 1, True)
    for method, kw in (("mgpp", dict(prior_scale=1e-3)), ("soft_movement", dict(score_lr=0.1, sigmoid_l1=0.3))):
        w, g, s = x.clone(), x.flip(0).clone(), (x * 7).clone()
        m = torch.zeros(x.shape, dtype=torch.bool)
        h = torch.zeros(257, dtype=torch.int64) if method == "soft_movement" else None
        OPS.fused_prune_step_cpu(w, g, s if h is not None else None, m, h, keys_from_scores=h is not None,
                                 strict_threshold=h is not None, threshold=0.01,
                                 tie_cut=5, mask_weight=True, **kw)
        out[f"{method} {dtype}"] = [w, g, s, m, h]
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # Adam on the scores, moments with inf and NaN too, placed so that no operation meets two NaNs
    # (which of two NaN operands propagates is up to the compiler's operand order)
    for sigmoid_l1 in (0.0, 0.3):
        w, g, s = x.clone(), x.flip(0).clone(), (x * 7).flip(1).to(score_dtype)
        ea, eas = (x.roll(500, 0) * 0.1).to(score_dtype), x.roll(500, 0).square().to(score_dtype)
        m, h = torch.zeros(x.shape, dtype=torch.bool), torch.zeros(257, dtype=torch.int64)
        OPS.fused_prune_step_cpu(w, g, s, m, h, ea, eas, keys_from_scores=True, threshold=0.01, score_lr=0.1,
                                 sigmoid_l1=sigmoid_l1, score_step=2, prior_scale=1e-3)
        out[f"adam {sigmoid_l1} {dtype}"] = [w, g, s, m, h, ea, eas]
torch.save(out, sys.argv[1])
"""


def test_isa_dispatch_is_bit_identical(tmp_path):
    """The kernels run an AVX2 build of their loops when the CPU has AVX2, else the baseline x86-64
    one (SPARSE_OPS_CPU_BASELINE=1 forces it): both must give bit-identical results."""
    paths = {}
    for name, forced in (("default", "0"), ("baseline", "1")):
        paths[name] = tmp_path / f"{name}.pt"
        env = dict(os.environ, SPARSE_OPS_CPU_BASELINE=forced)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(paths[name])], check=True, env=env)
    a, b = torch.load(paths["default"]), torch.load(paths["baseline"])
    assert a.keys() == b.keys()
    for key in a:
        ta = a[key] if isinstance(a[key], list) else [a[key]]
        tb = b[key] if isinstance(b[key], list) else [b[key]]
        for x, y in zip(ta, tb):
            if x is None:
                assert y is None
            elif x.is_floating_point():
                assert torch.equal(bits(x), bits(y)), key
            else:
                assert torch.equal(x, y), key
