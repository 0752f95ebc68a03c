"""mgp_prior_grad: the formula against an independent float64 / high-precision computation,
every backend against the reference, stability at extremes, contract and bad input."""

import math

import mpmath
import pytest
import torch
from conftest import FLOAT_DTYPES, triton_device, triton_kernels

from sparse_ops.ops.prior import mgp_threshold
from sparse_ops.ops.reference import mgp_prior_grad_ref

PRIORS = [(0.1, 1e-10, 0.05), (0.1, 1e-9, 0.1), (0.5, 1e-4, 1.0), (1e-4, 1e-12, 0.05)]
EXTREMES = [0.0, 1e-6, -1e-6, 10.0, -10.0, 1e-3, -3e-5, 0.02, 1e30, -1e30]


def neg_log_prior_mp(theta, lam, v0, v1):
    """−log π(θ) in 60-digit arithmetic, straight from the mixture density."""
    theta, lam, v0, v1 = map(mpmath.mpf, (theta, lam, v0, v1))
    def normal(v):
        return mpmath.exp(-theta**2 / (2 * v)) / mpmath.sqrt(2 * mpmath.pi * v)
    return -mpmath.log(lam * normal(v1) + (1 - lam) * normal(v0))


@pytest.mark.parametrize("lam,var0,var1", PRIORS)
def test_formula_matches_finite_differences_of_neg_log_prior(lam, var0, var1):
    mpmath.mp.dps = 60
    thetas = [0.0, 1e-6, -1e-6, 3e-6, 1e-5, -2e-5, 1e-4, 5e-4, 1e-3, 0.01, -0.07, 0.3, 1.0, -10.0]
    got = torch.ops.sparse_ops.mgp_prior_grad(torch.tensor(thetas, dtype=torch.float64), lam, var0, var1)
    for theta, value in zip(thetas, got.tolist()):
        h = mpmath.mpf(10) ** -30
        fd = (neg_log_prior_mp(theta + h, lam, var0, var1) - neg_log_prior_mp(theta - h, lam, var0, var1)) / (2 * h)
        assert value == pytest.approx(float(fd), rel=1e-9, abs=1e-12), theta


def test_formula_matches_autograd_of_logsumexp_density():
    lam, v0, v1 = 0.1, 1e-10, 0.05
    theta = (torch.randn(2001, dtype=torch.float64) * torch.logspace(-7, 0, 2001, dtype=torch.float64)).requires_grad_()
    log_terms = torch.stack([math.log(lam) - theta**2 / (2 * v1) - 0.5 * math.log(2 * math.pi * v1),
                             math.log(1 - lam) - theta**2 / (2 * v0) - 0.5 * math.log(2 * math.pi * v0)])
    (-torch.logsumexp(log_terms, 0)).sum().backward()
    got = torch.ops.sparse_ops.mgp_prior_grad(theta.detach(), lam, v0, v1)
    torch.testing.assert_close(got, theta.grad, rtol=1e-10, atol=1e-12)


def test_threshold_is_where_both_components_are_equally_likely():
    lam, v0, v1 = 0.1, 1e-10, 0.05
    t = mgp_threshold(lam, v0, v1)
    def log_component(lam_i, v):
        return math.log(lam_i) - t * t / (2 * v) - 0.5 * math.log(v)
    assert log_component(lam, v1) == pytest.approx(log_component(1 - lam, v0), abs=1e-9)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(1,), (37, 53), (3, 5, 7), (0, 4)])
def test_op_matches_reference(device, dtype, shape):
    w = (torch.randn(shape, device=device) * 0.05).to(dtype)
    for lam, v0, v1 in PRIORS:
        got = torch.ops.sparse_ops.mgp_prior_grad(w, lam, v0, v1, 0.5)
        want = mgp_prior_grad_ref(w, lam, v0, v1, 0.5)
        assert got.dtype == dtype and got.shape == w.shape
        torch.testing.assert_close(got, want, rtol=2e-5 if dtype != torch.float16 else 1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_kernel_matches_reference(device, dtype):
    kernels = triton_kernels()
    device = triton_device(device)
    w = (torch.randn(2049, device=device) * 0.05).to(dtype)
    w[:10] = torch.tensor(EXTREMES[:10], dtype=dtype)
    for lam, v0, v1 in PRIORS:
        got = kernels.mgp_prior_grad.mgp_prior_grad_triton(w, lam, v0, v1, 1e-3)
        torch.testing.assert_close(got, mgp_prior_grad_ref(w, lam, v0, v1, 1e-3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("var0", [1e-10, 1e-12])
def test_stable_at_extremes(device, var0):
    w = torch.tensor(EXTREMES, device=device)
    g = torch.ops.sparse_ops.mgp_prior_grad(w, 0.1, var0, 0.05)
    assert torch.isfinite(g[:-2]).all()
    assert g[0] == 0.0
    # far in the slab the prior is the slab's Gaussian: θ/v1; near zero the spike's: θ/v0
    assert float(g[3]) == pytest.approx(10.0 / 0.05, rel=1e-6)
    assert float(g[1]) == pytest.approx(1e-6 / var0, rel=1e-3)
    assert not torch.isnan(g).any()


def test_non_contiguous_input(device):
    w = torch.randn(64, 48, device=device)[:, ::3].t()
    assert not w.is_contiguous()
    torch.testing.assert_close(torch.ops.sparse_ops.mgp_prior_grad(w, 0.1, 1e-9, 0.1),
                               mgp_prior_grad_ref(w.contiguous(), 0.1, 1e-9, 0.1))


def test_opcheck_and_compile(device):
    w = torch.randn(33, 17, device=device)
    torch.library.opcheck(torch.ops.sparse_ops.mgp_prior_grad.default, (w, 0.1, 1e-10, 0.05, 1e-4))
    compiled = torch.compile(lambda t: torch.ops.sparse_ops.mgp_prior_grad(t, 0.1, 1e-10, 0.05) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(w), 2 * mgp_prior_grad_ref(w, 0.1, 1e-10, 0.05))


@pytest.mark.parametrize("args,match", [
    ((torch.ones(3, dtype=torch.int32), 0.1, 1e-10, 0.05), "w must have a floating dtype"),
    ((torch.ones(3), 1.0, 1e-10, 0.05), "lam must lie in"),
    ((torch.ones(3), 0.0, 1e-10, 0.05), "lam must lie in"),
    ((torch.ones(3), 0.1, 0.0, 0.05), "var0 must be > 0"),
    ((torch.ones(3), 0.1, 0.1, 0.05), "var1 must be > var0"),
    ((torch.ones(3), 0.1, 1e-10, float("inf")), "var1 must be a finite"),
    ((torch.ones(3), 0.1, 1e-10, 0.05, float("nan")), "scale must be a finite"),
])
def test_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.sparse_ops.mgp_prior_grad(*args)
