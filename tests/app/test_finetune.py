"""sparse_ops.app.finetune: the fine-tune-and-prune loop on a tiny random BERT, with and without a teacher."""

import json
import math
import os

import pytest
import torch
from _tiny import make_csv, make_model_dir, one_thread  # noqa: F401  (autouse fixture)
from torch import nn

from sparse_ops.app import data, finetune
from sparse_ops.app.finetune import FinetuneConfig


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


def _run(tiny, out=None, teacher=None, **kw):
    model_dir, tok, splits, batches = tiny
    return finetune.run(_config(**kw), splits, tok, model_path=model_dir, batches=batches, out=out,
                        teacher=teacher, progress=False, log=lambda line: None)


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
        keys = weights
    else:  # blocks of 16x16 all zero, or none of them zero
        keys = [w.detach().reshape(w.shape[0] // 16, 16, w.shape[1] // 16, 16).abs().sum((1, 3)) for w in weights]
        assert sum(int((w == 0).sum()) for w in weights) == 256 * sum(int((b == 0).sum()) for b in keys)
    zeros, total = sum(int((k == 0).sum()) for k in keys), sum(k.numel() for k in keys)
    if method == "movement":  # TopK per matrix by default: each matrix rounds its own count
        assert zeros == sum(math.floor(sparsity * k.numel() + 0.5) for k in keys)
    else:  # one global threshold
        assert zeros == math.floor(sparsity * total + 0.5)
    assert result["sparsity"] == pytest.approx(zeros / total if granularity == "element" else zeros * 256 /
                                               sum(w.numel() for w in weights))
    assert set(result["accuracy"]) == {"dev", "test"}


def test_soft_movement_reports_the_sparsity_it_reached(tiny):
    result = _run(tiny, method="soft_movement", sparsity=0.8, steps=30)
    assert 0.5 < result["sparsity"] < 0.99
    assert result["soft_movement"]["lambda_mvp"] > 0


def test_distillation_from_a_teacher(tiny):
    dense = _run(tiny, method="dense", steps=20)
    teacher = dense["model"].eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = _run(tiny, method="mgpp", sparsity=0.5, teacher=teacher)
    assert result["distill"]["teacher"] == "teacher" and result["distill"]["alpha"] == 0.5
    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # untouched
    plain = _run(tiny, method="mgpp", sparsity=0.5)
    assert plain["distill"] is None
    assert plain["final_loss"] != result["final_loss"]  # the distillation loss was the one minimised


def test_teacher_with_other_labels_is_refused(tiny):
    model_dir, tok, splits, batches = tiny
    teacher = data.load_model(model_dir, num_labels=None)
    teacher.config.num_labels = 3
    teacher.classifier = nn.Linear(teacher.classifier.in_features, 3)
    with pytest.raises(ValueError, match="teacher has 3 labels but the student has 2"):
        _run(tiny, method="mgpp", teacher=teacher)


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
    assert FinetuneConfig(method="mgpp", sparsity=0.9).pruning_config(100).initial_sparsity == 0.3
    assert FinetuneConfig(method="movement").pruning_config(100).scope == "local"
    assert FinetuneConfig(method="movement").pruning_config(100).score_optimizer == "adam"
    with pytest.raises(ValueError, match="distill_alpha must lie in"):
        FinetuneConfig(distill_alpha=1.5)
    with pytest.raises(ValueError, match="distill_temperature must be a positive"):
        FinetuneConfig(distill_temperature=0.0)
    assert FinetuneConfig(method="dense").pruning_config(100) is None
