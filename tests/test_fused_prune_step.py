"""fused_prune_step: Triton against the reference (exact masks and histograms), the op's
semantics checked independently of the reference (exact counts, 2:4 structure, formulas),
histogram hand-off to the next selection, non-contiguous inputs, contract and bad input."""

import itertools

import pytest
import torch
from conftest import FLOAT_DTYPES, triton_device, triton_kernels

import sparse_ops
from sparse_ops.reference import fused_prune_step_ref, prune_keys_ref, radix_histogram_ref

METHODS = ["magnitude", "mgpp", "movement", "soft_movement"]
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
    keys = prune_keys_ref(w, scores, method, granularity, br, bc)
    count = keys.numel() // 2
    thr = sparse_ops.prune_threshold([keys], count)
    kwargs = dict(method=method, granularity=granularity, block_rows=br, block_cols=bc, threshold=thr.value,
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
        next_keys = prune_keys_ref(got[0], got[2], method, granularity, kwargs["block_rows"], kwargs["block_cols"])
        state = torch.zeros(2, dtype=torch.int64, device=device)
        assert torch.equal(got[4], radix_histogram_ref([next_keys], state, 0, absolute=False))


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
    next_keys = prune_keys_ref(W, S, "movement", granularity, kwargs["block_rows"], kwargs["block_cols"])
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
        torch.ops.sparse_ops.fused_prune_step(w.clone(), torch.zeros_like(w), None, mask, None, method="magnitude",
                                              threshold=thr.value, tie_cut=thr.tie_cut)
        assert int(mask.sum()) == w.numel() - count


def test_non_contiguous_tensors_are_updated_in_place(device):
    base = torch.randn(3, 40, 24, device=device)
    w, grad, scores = base[0].t(), base[1].t() * 0.1, base[2].t()
    kwargs = dict(method="movement", threshold=0.0, score_lr=0.1, prior_scale=1e-4)
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
    kwargs = dict(method="magnitude")
    for key, value in over.items():
        (args if key in args else kwargs)[key] = value
    torch.ops.sparse_ops.fused_prune_step(*args.values(), **kwargs)


@pytest.mark.parametrize("over,match", [
    (dict(method="random"), "method must be one of"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(grad=torch.randn(8, 7)), "grad must have the shape of weight"),
    (dict(grad=torch.randn(8, 8).double()), "grad must have dtype"),
    (dict(mask=torch.zeros(8, 8)), "mask must have dtype torch.bool"),
    (dict(weight=torch.ones(8, 8, dtype=torch.int32)), "weight must have a floating dtype"),
    (dict(method="movement"), "scores is required"),
    (dict(score_lr=0.1), "score_lr is non-zero but scores is None"),
    (dict(histogram=torch.zeros(257, dtype=torch.int64)), "histogram is only emitted"),
    (dict(method="movement", scores=torch.randn(8, 8), histogram=torch.zeros(256, dtype=torch.int64)), "histogram must be int64"),
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
    with pytest.raises((ValueError, TypeError), match=match):
        _call(**over)
