"""fused_prune_step: Triton against the reference (exact masks and histograms; also with Adam on
the scores), the op's semantics checked independently of the reference (exact counts, 2:4
structure, formulas, torch.optim.Adam on the scores), histogram hand-off to the next selection,
non-contiguous inputs, contract and bad input."""

import itertools

import pytest
import torch
from conftest import FLOAT_DTYPES, MOVEMENT, op_flags, triton_device, triton_kernels

import sparse_ops
from sparse_ops.ops import use_backend
from sparse_ops.ops.reference import fused_prune_step_ref, prune_keys_ref, radix_histogram_ref
from sparse_ops.pruning import METHODS

GRANULARITIES = {"element": (1, 1), "block": (8, 16), "2:4": (1, 1)}


def make_case(method, granularity, dtype, device, shape=(37, 52), seed=0):
    """Random weight/grad/scores (with ties) and kwargs thresholding half of the keys."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype).to(device)
    grad = (torch.randn(shape, generator=g) * 1e-2).to(dtype).to(device)
    scores = None
    if method in ("movement", "soft_movement"):
        scores = torch.randn(shape, generator=g).to(dtype).to(device)
        scores[:5] = 0.5  # a run of ties at the threshold
    br, bc = GRANULARITIES[granularity]
    keys = prune_keys_ref(w, scores, method in MOVEMENT, granularity, br, bc)
    count = keys.numel() // 2
    thr = sparse_ops.prune_threshold([keys], count)
    kwargs = dict(**op_flags(method), granularity=granularity, block_rows=br, block_cols=bc, threshold=thr.value,
                  tie_cut=thr.tie_cut, prior_scale=1e-3 if method == "mgpp" else 0.0,
                  score_lr=0.01 if scores is not None else 0.0, mask_weight=method == "magnitude",
                  sigmoid_l1=0.5 if method == "soft_movement" else 0.0)
    return w, grad, scores, kwargs, count


def run(impl, w, grad, scores, kwargs):
    W, G = w.clone(), grad.clone()
    S = scores.clone() if scores is not None else None
    M = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    H = torch.zeros(257, dtype=torch.int64, device=w.device) if scores is not None else None
    impl(W, G, S, M, H, **kwargs)
    return W, G, S, M, H


@pytest.mark.parametrize("method,granularity,dtype",
                         list(itertools.product(METHODS, GRANULARITIES, FLOAT_DTYPES)))
def test_triton_matches_reference(device, method, granularity, dtype):
    kernels = triton_kernels()
    device = triton_device(device)
    w, grad, scores, kwargs, _ = make_case(method, granularity, dtype, device)
    kwargs["index_offset"] = 3
    want = run(fused_prune_step_ref, w, grad, scores, kwargs)
    got = run(kernels.fused_prune_step.fused_prune_step_triton, w, grad, scores, kwargs)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    assert torch.equal(got[3], want[3])  # mask
    assert torch.equal(got[0], want[0])  # weight (masked or untouched)
    torch.testing.assert_close(got[1], want[1], **tol)
    if scores is not None:
        torch.testing.assert_close(got[2], want[2], **tol)
        # the histogram describes exactly the keys the kernel stored (what the next selection reads)
        next_keys = prune_keys_ref(got[0], got[2], method in MOVEMENT, granularity, kwargs["block_rows"], kwargs["block_cols"])
        state = torch.zeros(2, dtype=torch.int64, device=device)
        assert torch.equal(got[4], radix_histogram_ref([next_keys], state, 0, absolute=False))


ADAM_SHAPES = {"element": (37, 53), "block": (37, 52), "2:4": (21, 36)}  # odd sizes, partial blocks/programs
ADAM = dict(score_beta1=0.9, score_beta2=0.999, score_eps=1e-8)


def adam_step_case(method, granularity, dtype, scores, device, seed):
    """Fresh random weight/grad in `dtype` for one step on the given (float32) scores, and kwargs
    thresholding half of the entry keys."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(scores.shape, generator=g).to(dtype).to(device)
    grad = (torch.randn(scores.shape, generator=g) * 1e-2).to(dtype).to(device)
    br, bc = GRANULARITIES[granularity]
    keys = prune_keys_ref(w, scores, method in MOVEMENT, granularity, br, bc)
    thr = sparse_ops.prune_threshold([keys], keys.numel() // 2)
    kwargs = dict(**op_flags(method), granularity=granularity, block_rows=br, block_cols=bc, threshold=thr.value,
                  tie_cut=thr.tie_cut, index_offset=3, score_lr=0.01,
                  sigmoid_l1=0.5 if method == "soft_movement" else 0.0, **ADAM)
    return w, grad, kwargs


def run_adam(impl, w, grad, scores, exp_avg, exp_avg_sq, kwargs):
    W, G, S, EA, EAS = w.clone(), grad.clone(), scores.clone(), exp_avg.clone(), exp_avg_sq.clone()
    M = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    H = torch.zeros(257, dtype=torch.int64, device=w.device)
    impl(W, G, S, M, H, EA, EAS, **kwargs)
    return W, G, S, M, H, EA, EAS


@pytest.mark.parametrize("method,granularity,dtype", list(itertools.product(MOVEMENT, GRANULARITIES, FLOAT_DTYPES)))
def test_triton_adam_matches_reference(device, method, granularity, dtype):
    """Adam on float32 scores and moments, weights in every dtype, three consecutive steps (so the
    moments matter), each step from the same entry state for both implementations."""
    kernels = triton_kernels()
    device = triton_device(device)
    shape = ADAM_SHAPES[granularity]
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    scores[:3] = 0.5  # ties at the threshold
    exp_avg, exp_avg_sq = torch.zeros_like(scores), torch.zeros_like(scores)
    for step in (1, 2, 3):
        w, grad, kwargs = adam_step_case(method, granularity, dtype, scores, device, seed=10 + step)
        kwargs["score_step"] = step
        want = run_adam(fused_prune_step_ref, w, grad, scores, exp_avg, exp_avg_sq, kwargs)
        got = run_adam(kernels.fused_prune_step.fused_prune_step_triton, w, grad, scores, exp_avg, exp_avg_sq,
                       kwargs)
        assert torch.equal(got[3], want[3])  # mask
        assert torch.equal(got[0], want[0])  # weight (untouched)
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(got[1], want[1], **tol)
        if method == "movement" and device == "cpu":
            # the moments use only +, -, × in the reference's order: bit for bit under the interpreter
            # (soft_movement's sigmoid and the scores' sqrt are not correctly rounded in torch on CPU)
            assert torch.equal(got[5], want[5]) and torch.equal(got[6], want[6])
        for g_t, w_t in ((got[5], want[5]), (got[6], want[6])):  # moments: a few float32 ulps
            torch.testing.assert_close(g_t, w_t, rtol=1e-6, atol=1e-6 * float(w_t.abs().max()))
        torch.testing.assert_close(got[2], want[2], rtol=3e-7, atol=1e-8)  # scores: about an ulp
        assert not torch.equal(got[2], scores) and not torch.equal(got[6], exp_avg_sq)
        # the histogram describes exactly the keys the kernel stored (what the next selection reads)
        next_keys = prune_keys_ref(got[0], got[2], method in MOVEMENT, granularity, kwargs["block_rows"], kwargs["block_cols"])
        state = torch.zeros(2, dtype=torch.int64, device=device)
        assert torch.equal(got[4], radix_histogram_ref([next_keys], state, 0, absolute=False))
        scores, exp_avg, exp_avg_sq = got[2], got[5], got[6]


@pytest.mark.parametrize("method", MOVEMENT)
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize("backend", ["op", "triton"])
def test_op_adam_is_torch_adam(device, method, granularity, backend):
    """The op's score update with moment buffers is torch.optim.Adam's step on ∂L/∂S (checked
    against torch's own optimiser, not the reference), for three consecutive steps."""
    if backend == "triton":
        triton_kernels()
        triton_device(device)
    shape = ADAM_SHAPES[granularity]
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    param = torch.nn.Parameter(scores.clone())
    opt = torch.optim.Adam([param], lr=0.01, betas=(ADAM["score_beta1"], ADAM["score_beta2"]),
                           eps=ADAM["score_eps"], foreach=False)
    S, EA, EAS = scores.clone(), torch.zeros_like(scores), torch.zeros_like(scores)
    for step in (1, 2, 3):
        w, grad, kwargs = adam_step_case(method, granularity, torch.float32, S, device, seed=20 + step)
        M = torch.zeros(shape, dtype=torch.bool, device=device)
        with use_backend("triton" if backend == "triton" else None):
            torch.ops.sparse_ops.fused_prune_step(w.clone(), grad.clone(), S, M, None, EA, EAS, **kwargs,
                                                  score_step=step)
        with torch.no_grad():
            score_grad = grad * w
            if kwargs["sigmoid_l1"]:
                sig = torch.sigmoid(param)
                score_grad = score_grad + kwargs["sigmoid_l1"] * sig * (1 - sig)
        param.grad = score_grad
        opt.step()
        state = opt.state[param]
        torch.testing.assert_close(S, param.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(EA, state["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(EAS, state["exp_avg_sq"], rtol=1e-5, atol=1e-11)
        assert not torch.equal(S, scores)
    # score_lr = 0: the scores and their moments stay as they are
    before = (S.clone(), EA.clone(), EAS.clone())
    with use_backend("triton" if backend == "triton" else None):
        torch.ops.sparse_ops.fused_prune_step(w.clone(), grad.clone(), S, M, None, EA, EAS,
                                              **dict(kwargs, score_lr=0.0), score_step=4)
    assert all(torch.equal(a, b) for a, b in zip((S, EA, EAS), before))


@pytest.mark.parametrize("method,granularity", list(itertools.product(METHODS, GRANULARITIES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_semantics(device, method, granularity, dtype):
    """Checks the op (whatever backend serves it) against the contract, not against the reference."""
    w, grad, scores, kwargs, count = make_case(method, granularity, dtype, device, shape=(64, 96), seed=1)
    W, G, S, M, H = run(torch.ops.sparse_ops.fused_prune_step, w, grad, scores, kwargs)
    rows, cols = w.shape
    if granularity == "2:4":
        assert (M.view(-1, 4).sum(1) == 2).all()
        key = (scores if scores is not None else w.abs()).float().view(-1, 4)
        kept_min = torch.where(M.view(-1, 4), key, float("inf")).min(1).values
        dropped_max = torch.where(M.view(-1, 4), -float("inf"), key).max(1).values
        assert (kept_min >= dropped_max).all()
    elif granularity == "block":
        br, bc = GRANULARITIES["block"]
        blocks = M.view(rows // br, br, cols // bc, bc)
        per_block = blocks.sum(dim=(1, 3))
        assert ((per_block == 0) | (per_block == br * bc)).all()  # constant on each block
        if method != "soft_movement":
            assert int((per_block == 0).sum()) == count
    elif method != "soft_movement":
        assert int((~M).sum()) == count  # exactly the number asked for
    if method == "soft_movement" and granularity == "element":
        assert torch.equal(M, scores > kwargs["threshold"])  # strict: ties are pruned
    if method == "soft_movement" and granularity == "block":
        br, bc = GRANULARITIES["block"]
        block_sums = scores.double().view(rows // br, br, cols // bc, bc).sum(dim=(1, 3)).float()
        assert torch.equal(per_block == br * bc, block_sums > kwargs["threshold"])
    # gradient: raw gradient where kept, 0 where pruned, plus the scaled prior gradient
    want_grad = torch.where(M, grad.float(), 0.0)
    if kwargs["prior_scale"]:
        want_grad += kwargs["prior_scale"] * torch.ops.sparse_ops.mgp_prior_grad(w.float(), 0.1, 1e-10, 0.05)
    torch.testing.assert_close(G.float(), want_grad, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    if scores is not None:  # first-order movement update from the raw gradient (+ L1 on sigmoid(S))
        s = scores.float()
        want_s = s - kwargs["score_lr"] * (grad.float() * w.float()
                                           + kwargs["sigmoid_l1"] * torch.sigmoid(s) * (1 - torch.sigmoid(s)))
        torch.testing.assert_close(S.float(), want_s, rtol=1e-2, atol=1e-2 if dtype != torch.float32 else 1e-6)
    assert torch.equal(W, torch.where(M, w, 0.0) if kwargs["mask_weight"] else w)


@pytest.mark.parametrize("granularity", ["element", "block"])
def test_emitted_histogram_feeds_the_next_selection(device, granularity):
    w, grad, scores, kwargs, _ = make_case("movement", granularity, torch.float32, device, shape=(48, 64))
    W, G, S, M, H = run(torch.ops.sparse_ops.fused_prune_step, w, grad, scores, kwargs)
    next_keys = prune_keys_ref(W, S, True, granularity, kwargs["block_rows"], kwargs["block_cols"])
    for count in (1, next_keys.numel() // 3, next_keys.numel()):
        fast = sparse_ops.prune_threshold([next_keys], count, first_histogram=H)
        full = sparse_ops.prune_threshold([next_keys], count)
        assert fast == full


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize("backend", ["op", "triton"])
def test_reuse_mask_keeps_the_given_mask(device, granularity, backend):
    """reuse_mask: a fixed mask (after t_e, or between magnitude events) masks grad and weight."""
    w, grad, scores, kwargs, _ = make_case("mgpp", granularity, torch.float32, device, shape=(32, 48))
    given = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)).to(device) > 0.6
    impl = torch.ops.sparse_ops.fused_prune_step
    if backend == "triton":
        impl = triton_kernels().fused_prune_step.fused_prune_step_triton
        triton_device(device)
    W, G, M = w.clone(), grad.clone(), given.clone()
    impl(W, G, None, M, None, **dict(kwargs, reuse_mask=True, mask_weight=True))
    assert torch.equal(M, given)
    assert torch.equal(W, torch.where(given, w, 0.0))
    prior = kwargs["prior_scale"] * torch.ops.sparse_ops.mgp_prior_grad(w, 0.1, 1e-10, 0.05)
    torch.testing.assert_close(G, torch.where(given, grad, 0.0) + prior)


def test_zero_and_all_but_one_sparsity(device):
    w = torch.randn(7, 9, device=device)
    for count in (0, w.numel() - 1):
        thr = sparse_ops.prune_threshold([w.abs()], count)
        mask = torch.empty(w.shape, dtype=torch.bool, device=device)
        torch.ops.sparse_ops.fused_prune_step(w.clone(), torch.zeros_like(w), None, mask, None, keys_from_scores=False,
                                              threshold=thr.value, tie_cut=thr.tie_cut)
        assert int(mask.sum()) == w.numel() - count


def test_non_contiguous_tensors_are_updated_in_place(device):
    base = torch.randn(3, 40, 24, device=device)
    w, grad, scores = base[0].t(), base[1].t() * 0.1, base[2].t()
    kwargs = dict(keys_from_scores=True, threshold=0.0, score_lr=0.1, prior_scale=1e-4)
    want = run(fused_prune_step_ref, w.contiguous(), grad.contiguous(), scores.contiguous(), kwargs)
    W, G, S = w.clone().t().contiguous().t(), grad.clone().t().contiguous().t(), scores.clone().t().contiguous().t()
    M = torch.zeros(24, 40, dtype=torch.bool, device=device).t().contiguous().t()
    assert not (W.is_contiguous() or G.is_contiguous() or S.is_contiguous() or M.is_contiguous())
    torch.ops.sparse_ops.fused_prune_step(W, G, S, M, None, **kwargs)
    assert torch.equal(M, want[3])
    torch.testing.assert_close(G, want[1])
    torch.testing.assert_close(S, want[2])


def test_opcheck_and_compile(device):
    w, grad, scores, kwargs, _ = make_case("movement", "element", torch.float32, device, shape=(16, 12))
    mask = torch.zeros(w.shape, dtype=torch.bool, device=device)
    hist = torch.zeros(257, dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.sparse_ops.fused_prune_step.default,
                          (w.clone(), grad.clone(), scores.clone(), mask, hist), kwargs)

    @torch.compile(fullgraph=True)
    def step(W, G, S, M, H):
        torch.ops.sparse_ops.fused_prune_step(W, G, S, M, H, **kwargs)
        return M.sum()

    want = run(fused_prune_step_ref, w, grad, scores, kwargs)
    W, G, S = w.clone(), grad.clone(), scores.clone()
    M, H = torch.zeros_like(mask), torch.zeros_like(hist)
    assert int(step(W, G, S, M, H)) == int(want[3].sum())
    assert torch.equal(M, want[3]) and torch.equal(H, want[4])


def _call(**over):
    args = dict(weight=torch.randn(8, 8), grad=torch.randn(8, 8), scores=None,
                mask=torch.zeros(8, 8, dtype=torch.bool), histogram=None)
    kwargs = dict(keys_from_scores=False)
    for key, value in over.items():
        (args if key in args else kwargs)[key] = value
    torch.ops.sparse_ops.fused_prune_step(*args.values(), **kwargs)


@pytest.mark.parametrize("over,match", [
    (dict(keys_from_scores="movement"), "type 'bool' for argument 'keys_from_scores'"),  # the schema's check
    (dict(granularity="row"), "granularity must be one of"),
    (dict(grad=torch.randn(8, 7)), "grad must have the shape of weight"),
    (dict(grad=torch.randn(8, 8).double()), "grad must have dtype"),
    (dict(mask=torch.zeros(8, 8)), "mask must have dtype torch.bool"),
    (dict(weight=torch.ones(8, 8, dtype=torch.int32)), "weight must have a floating dtype"),
    (dict(keys_from_scores=True), "scores is required"),
    (dict(score_lr=0.1), "score_lr is non-zero but scores is None"),
    (dict(histogram=torch.zeros(257, dtype=torch.int64)), "histogram is only emitted"),
    (dict(keys_from_scores=True, scores=torch.randn(8, 8), histogram=torch.zeros(256, dtype=torch.int64)), "histogram must be int64"),
    (dict(granularity="block", block_rows=0, block_cols=4), "block_rows must be a positive int"),
    (dict(granularity="block", block_rows=4, block_cols=-1), "block_cols must be a positive int"),
    (dict(block_rows=4), "must be 1 for granularity='element'"),
    (dict(granularity="2:4", weight=torch.randn(8, 6), grad=torch.randn(8, 6), mask=torch.zeros(8, 6, dtype=torch.bool)), "multiple of 4"),
    (dict(threshold=float("nan")), "threshold must not be NaN"),
    (dict(tie_cut=-1), "tie_cut must be a non-negative int"),
    (dict(prior_scale=1.0, lam=1.5), "lam must lie in"),
    (dict(prior_scale=float("inf")), "prior_scale must be a finite"),
    (dict(sigmoid_l1=float("nan")), "sigmoid_l1 must be a finite"),
])
def test_bad_input(over, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _call(**over)
