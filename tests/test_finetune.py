"""sparse_ops.finetune: the fine-tune-and-prune loop on a tiny random BERT, and soft movement's tuner."""

import json
import math
import os

import pytest
import torch
from _tiny import make_csv, make_model_dir, one_thread  # noqa: F401  (autouse fixture)
from torch import nn

from sparse_ops import Pruner, PruningConfig, data, finetune
from sparse_ops.finetune import FinetuneConfig, SoftMovementTuner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, tokenizer, splits, tokenised batches) of the tiny synthetic task."""
    root = tmp_path_factory.mktemp("finetune")
    model_dir = make_model_dir(str(root / "model"))
    splits = data.load_csv(make_csv(str(root / "data.csv"), 240), "review", "sentiment", group_column="movie")
    tok = data.load_tokenizer(model_dir)
    return model_dir, tok, splits, finetune.tokenize_splits(splits, tok, max_length=16)


def _config(**kw):
    base = {"steps": 20, "batch_size": 8, "lr": 3e-3, "log_every": 10, "device": "cpu", "interval": 4}
    return FinetuneConfig(**{**base, **kw})


def _run(tiny, out=None, **kw):
    model_dir, tok, splits, batches = tiny
    return finetune.run(_config(**kw), splits, tok, model_path=model_dir, batches=batches, out=out,
                        progress=False, log=lambda line: None)


def _target_weights(model):
    return [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and ".encoder.layer." in f".{name}" and not name.endswith("pooler.dense")]


@pytest.mark.parametrize("granularity", ["element", "block"])
@pytest.mark.parametrize("method", ["magnitude", "mgpp", "movement"])
def test_pruning_reaches_the_exact_count(tiny, method, granularity):
    sparsity = 0.8
    result = _run(tiny, method=method, sparsity=sparsity, granularity=granularity, block_size=(16, 16))
    weights = _target_weights(result["model"])
    assert len(weights) == 12  # q, k, v, attention output, intermediate, output of 2 layers
    if granularity == "element":
        zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    else:  # blocks of 16x16 all zero, or none of them zero
        blocks = [w.detach().reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16).abs().sum((1, 3)) for w in weights]
        zeros, total = sum(int((b == 0).sum()) for b in blocks), sum(b.numel() for b in blocks)
        assert sum(int((w == 0).sum()) for w in weights) == 256 * zeros
    assert zeros == math.floor(sparsity * total + 0.5)
    assert result["sparsity"] == pytest.approx(zeros / total if granularity == "element" else zeros * 256 /
                                               sum(w.numel() for w in weights))
    assert set(result["accuracy"]) == {"dev", "test"}


def test_soft_movement_lands_near_the_target(tiny):
    result = _run(tiny, method="soft_movement", sparsity=0.8, steps=30)
    assert abs(result["sparsity"] - 0.8) < 0.1
    assert result["soft_movement"]["lambda_history"]


def test_soft_movement_tuner_tracks_the_schedule_when_movement_is_linear():
    """Constant gradients and weights make every score's movement exactly linear in time, so the tuner's
    projection is exact: at every event h the mask S > τ prunes the fraction s(h) of the schedule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    grad = torch.randn(48, 64)
    config = PruningConfig(method="soft_movement", sparsity=0.9, start_step=10, end_step=70, interval=10,
                           targets=(r"^0$",), exclude=(), soft_threshold=SoftMovementTuner.WARMUP_THRESHOLD,
                           soft_l1=0.0, score_lr=1e-2)
    pruner = Pruner(model, config)
    tuner = SoftMovementTuner(pruner, total_steps=100)
    mask = pruner.targets[0].mask
    checked = 0
    for step in range(100):
        if step < 10:
            assert mask.all()
        model[0].weight.grad = grad.clone()
        tuner.before_step()
        pruner.after_backward()
        pruner.after_optimizer_step()
        nxt = step + 1
        if nxt in (20, 30, 40, 50, 60, 70, 80, 90, 100):
            pruned = int((~mask).sum())
            assert abs(pruned - config.schedule().sparsity(nxt) * mask.numel()) <= 2, (nxt, pruned)
            checked += 1
    assert checked == 9


def test_dense_finetuning_learns_and_is_deterministic(tiny):
    a = _run(tiny, method="dense", steps=40, lr=5e-3, batch_size=16)
    assert a["accuracy"]["test"] >= 0.85 and a["accuracy"]["dev"] >= 0.85
    assert a["sparsity"] == 0.0
    b, c = _run(tiny, method="dense", steps=3), _run(tiny, method="dense", steps=3)
    for p, q in zip(b["model"].parameters(), c["model"].parameters()):
        assert torch.equal(p, q)
    d = _run(tiny, method="dense", steps=3, seed=1)
    assert not torch.equal(d["model"].classifier.weight, b["model"].classifier.weight)


def test_checkpoint_round_trip(tiny, tmp_path):
    out = str(tmp_path / "ckpt")
    result = _run(tiny, out=out, method="movement", sparsity=0.7)
    model = result["model"].eval()
    loaded = data.load_model(out, num_labels=None).eval()
    x = tiny[3]["test"].batch(list(range(8)))
    x.pop("labels")
    with torch.no_grad():
        assert torch.equal(model(**x).logits, loaded(**x).logits)
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    state = torch.load(os.path.join(out, finetune.PRUNER_STATE), weights_only=True)
    assert state["step"] == 20 and len(state["masks"]) == 12
    with open(os.path.join(out, finetune.RUN_JSON)) as f:
        run = json.load(f)
    assert run["accuracy"] == result["accuracy"] and run["data"]["source"]["kind"] == "csv"
    assert finetune.load_run(out)["config"]["method"] == "movement"


def test_config_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        FinetuneConfig(method="random")
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        FinetuneConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="granularity"):
        FinetuneConfig(granularity="2:4")
    with pytest.raises(ValueError, match="steps must be >= 10"):
        FinetuneConfig(method="mgpp", steps=5)
    with pytest.raises(ValueError, match="lr must be a positive"):
        FinetuneConfig(lr=0.0)
    with pytest.raises(ValueError, match="block_size"):
        FinetuneConfig(block_size=(0, 32))
    assert FinetuneConfig(steps=200).schedule_steps() == (20, 140)
    assert FinetuneConfig(method="mgpp", sparsity=0.9).pruning_config(100).initial_sparsity == 0.45
    assert FinetuneConfig(method="dense").pruning_config(100) is None
