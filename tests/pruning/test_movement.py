"""Movement pruning trained as the reference trains it: Adam on the scores against torch.optim.Adam on an
nn.Parameter of scores with a straight-through TopK (Hugging Face's movement-pruning semantics, written
out independently here), the first-order option, the scores' rate following the optimizer's schedule,
the one-key floor of a global TopK, and soft movement's λ_mvp control landing on the target."""

import math

import pytest
import torch
from torch import nn

from sparse_ops import Pruner, PruningConfig
from sparse_ops.ops import use_backend

TARGETS = dict(targets=(r"^(0|2)$",), exclude=())
STEPS = 30
T_I, T_E = 3, 20


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 3))


def toy_data(n=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def cubic_prune_count(step, numel, s_f):
    """docs/design.md §2.2 with s_i = 0, written out: how many keys are pruned at `step`."""
    if step < T_I:
        return 0
    s = s_f if step >= T_E else s_f - s_f * (1 - (step - T_I) / (T_E - T_I)) ** 3
    return min(numel - 1, math.floor(s * numel + 0.5))


class TopKMask(torch.autograd.Function):
    """M = TopK(S) (the `count` lowest scores pruned, lower index first among equal scores), with the
    straight-through estimator: ∂L/∂S receives ∂L/∂M."""

    @staticmethod
    def forward(ctx, scores, count):
        order = torch.sort(scores.flatten(), stable=True).indices
        mask = torch.ones(scores.numel(), dtype=scores.dtype)
        mask[order[:count]] = 0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def lr_lambda(step):
    return 1.0 - step / (STEPS + 5)


def initial_scores(weight, score_init):
    w = weight.detach().abs()
    return w / w.std() if score_init == "magnitude" else torch.zeros_like(w)


def reference_run(sparsity, score_init):
    """Scores as parameters in their own torch.optim.Adam (lr 1e-2, no weight decay), the weights in
    AdamW, both on the same linear decay: the forward uses W ⊙ TopK(S), so ∂L/∂S = ∂L/∂W'⊙W."""
    model = toy_model()
    linears = [model[0], model[2]]
    scores = [nn.Parameter(initial_scores(m.weight, score_init)) for m in linears]
    weights_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
    scores_opt = torch.optim.Adam(scores, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in (weights_opt, scores_opt)]
    for step, (x, y) in enumerate(toy_data()):
        masks = [TopKMask.apply(s, cubic_prune_count(step, s.numel(), sparsity)) for s in scores]
        h = torch.tanh(nn.functional.linear(x, model[0].weight * masks[0], model[0].bias))
        loss = nn.functional.cross_entropy(nn.functional.linear(h, model[2].weight * masks[1], model[2].bias), y)
        loss.backward()
        weights_opt.step(), scores_opt.step()
        weights_opt.zero_grad(), scores_opt.zero_grad()
        for s in scheds:
            s.step()
    final = [TopKMask.apply(s.detach(), cubic_prune_count(STEPS, s.numel(), sparsity)).bool() for s in scores]
    return model, [s.detach() for s in scores], final


def sparse_ops_run(config):
    model = toy_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    pruner = Pruner(model, config, optimizer)
    for x, y in toy_data():
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.after_backward()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
        sched.step()
    return model, pruner


@pytest.mark.parametrize("score_init", ["magnitude", "zeros"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_adam_scores_match_torch_adam_with_a_straight_through_topk(backend, score_init):
    sparsity = 0.8
    ref_model, ref_scores, ref_masks = reference_run(sparsity, score_init)
    config = PruningConfig(method="movement", sparsity=sparsity, start_step=T_I, end_step=T_E, score_init=score_init,
                           **TARGETS)
    assert config.scope == "local" and config.score_optimizer == "adam"
    assert PruningConfig(method="movement").score_init == "magnitude"  # the default
    with use_backend(backend):
        model, pruner = sparse_ops_run(config)
    for t, scores, mask in zip(pruner.targets, ref_scores, ref_masks):
        assert torch.equal(t.mask, mask), t.name
        torch.testing.assert_close(t.scores, scores, rtol=1e-5, atol=1e-7)
        assert int((~t.mask).sum()) == cubic_prune_count(STEPS, t.mask.numel(), sparsity)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    moved = pruner.targets[0].scores - initial_scores(toy_model()[0].weight, score_init)
    assert float(moved.abs().max()) > 0.05  # the scores did move, by Adam-sized steps


def test_first_order_scores_follow_the_learning_rate_schedule():
    """score_optimizer='sgd': S ← S − score_lr·(lr/initial lr)·∂L/∂W'⊙W, checked on one layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    config = PruningConfig(method="movement", sparsity=0.5, start_step=5, end_step=9, score_optimizer="sgd",
                           score_lr=0.3, score_init="zeros", targets=(r"^0$",), exclude=())
    pruner = Pruner(model, config, optimizer)
    want = torch.zeros(6, 8)
    for step in range(3):
        grad = torch.randn(6, 8)
        w = model[0].weight.detach().clone()
        model[0].weight.grad = grad.clone()
        pruner.after_backward()
        want -= 0.3 * 0.5 ** step * grad * w
        optimizer.step()
        pruner.after_optimizer_step()
        sched.step()
        torch.testing.assert_close(pruner.targets[0].scores, want, rtol=1e-6, atol=1e-8)


def test_global_topk_never_empties_a_matrix():
    """A matrix whose scores are all lower than every other score keeps its best key, and the other
    matrices prune that many more: the total count stays exact."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    config = PruningConfig(method="movement", sparsity=0.5, start_step=0, end_step=1, scope="global",
                           score_optimizer="sgd", score_lr=1.0, targets=(r"^\d$",), exclude=())
    pruner = Pruner(model, config)
    with torch.no_grad():
        for i, t in enumerate(pruner.targets):
            t.weight.fill_(1.0)
    for i, t in enumerate(pruner.targets):  # scores after this step: matrix 0 lowest of all
        t.weight.grad = -torch.rand(16, 16) - (0.0 if i == 0 else 10.0 * i)
    pruner.after_backward()
    pruner.after_optimizer_step()
    kept = [int(t.mask.sum()) for t in pruner.targets]
    assert kept[0] == 1 and int(pruner.targets[0].scores.argmax()) == int(pruner.targets[0].mask.flatten().nonzero())
    assert sum(256 - k for k in kept) == pruner.schedule.prune_count(1, 3 * 256)
    with torch.no_grad():
        for t in pruner.targets:
            t.weight.grad = torch.zeros(16, 16)
    config99 = PruningConfig(method="movement", sparsity=0.999, start_step=0, end_step=1, scope="global",
                             targets=(r"^\d$",), exclude=())
    pruner = Pruner(model, config99)
    for t in pruner.targets:
        t.weight.grad = torch.randn(16, 16)
    pruner.after_backward()
    assert [int(t.mask.sum()) for t in pruner.targets] == [1, 1, 1]  # capped: one key per matrix


@pytest.mark.parametrize("score_init", ["magnitude", "zeros"])
def test_soft_movement_lands_within_half_a_point(score_init):
    """λ_mvp steering on a layer whose gradients mix a persistent signal with noise: the sparsity
    reached after the cool-down is within 0.5 points of the target."""
    torch.manual_seed(0)
    layer = nn.Linear(96, 128)
    model = nn.Sequential(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = 200
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    config = PruningConfig(method="soft_movement", sparsity=0.9, start_step=20, end_step=140, targets=(r"^0$",),
                           exclude=(), score_init=score_init)
    pruner = Pruner(model, config, optimizer)
    signal = torch.randn(128, 96)
    reached = []
    for step in range(steps):
        layer.weight.grad = 1e-3 * (signal + 2.0 * torch.randn(128, 96))
        pruner.after_backward()
        optimizer.step()
        pruner.after_optimizer_step()
        sched.step()
        reached.append(pruner.sparsity()["global"])
    assert all(r == 0.0 for r in reached[:19])
    assert abs(reached[-1] - 0.9) <= 0.005, reached[-20:]
    stats = pruner.stats()
    assert stats["pruning/lambda_mvp"] > 0 and math.isfinite(stats["pruning/threshold"])


def test_magnitude_score_init_starts_from_the_magnitude_ranking():
    model = toy_model()
    config = PruningConfig(method="movement", sparsity=0.5, start_step=0, end_step=4, score_init="magnitude", **TARGETS)
    pruner = Pruner(model, config)
    for t in pruner.targets:
        w = t.weight.detach().abs()
        torch.testing.assert_close(t.scores, w / w.std())
    x, y = toy_data(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    pruner.after_backward()  # step 0 = t_i: the mask of this forward came from the initial scores
    for t in pruner.targets:  # after one Adam step (≤ ~1e-2) the next TopK is still close to magnitude's
        w = t.weight.detach().abs()
        magnitude_keep = w > w.flatten().kthvalue(pruner.schedule.prune_count(1, w.numel())).values
        assert (t.mask == magnitude_keep).float().mean() > 0.9
    with pytest.raises(ValueError, match="score_init must be"):
        PruningConfig(method="movement", score_init="kaiming")
