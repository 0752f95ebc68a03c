"""Pruner on small real transformers configs: targets, every method and granularity end to end,
schedule exactness, MGPP regrowth and fixed masks, backends agreeing, resume bit-identical,
finalize + save_pretrained, config round trip and bad input."""

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from sparse_ops.pruning.config import PruningConfig
from sparse_ops.ops import use_backend
from sparse_ops.pruning.pruner import Pruner

STEPS = dict(start_step=2, end_step=10, interval=3)


def tiny_bert(seed=0, hidden=32, layers=2):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def batches(n, seed=0, batch=4, length=12):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(0, 97, (batch, length), generator=g),
                 labels=torch.randint(0, 2, (batch,), generator=g)) for _ in range(n)]


def make_config(method, **over):
    kw = dict(method=method, sparsity=0.75, **STEPS, num_train_examples=64, score_lr=1.0, soft_l1=50.0)
    if method == "mgpp":
        kw["initial_sparsity"] = 0.3
    kw.update(over)
    return PruningConfig(**kw)


def train(model, pruner, optimizer, data, start=0):
    losses = []
    for batch in data[start:]:
        loss = model(**batch).loss
        loss.backward()
        pruner.after_backward()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def run(method, steps=12, seed=0, **over):
    model = tiny_bert(seed)
    pruner = Pruner(model, make_config(method, **over), optimizer := torch.optim.AdamW(model.parameters(), lr=1e-3))
    losses = train(model, pruner, optimizer, batches(steps, seed))
    return model, pruner, losses


def test_default_targets_are_the_encoder_linears():
    pruner = Pruner(tiny_bert(), make_config("magnitude"))
    names = [t.name for t in pruner.targets]
    assert len(names) == 2 * 6
    assert all(n.startswith("bert.encoder.layer.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"query", "key", "value", "dense"}


def test_default_targets_match_llama_projections():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    names = {t.name.rsplit(".", 1)[-1] for t in Pruner(model, make_config("magnitude")).targets}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("method", ["magnitude", "mgpp", "movement"])
@pytest.mark.parametrize("granularity,scope", [("element", "global"), ("element", "local"), ("block", "global")])
def test_reaches_target_sparsity_exactly_at_end_step(method, granularity, scope):
    model, pruner, losses = run(method, granularity=granularity, scope=scope, block_size=(8, 8))
    assert all(torch.isfinite(torch.tensor(losses)))
    groups = pruner.groups()
    for group in groups:
        keys = sum(t.num_keys for t in group)
        pruned_keys = sum(int((~t.mask).sum()) for t in group) // (64 if granularity == "block" else 1)
        assert pruned_keys == pruner.schedule.prune_count(pruner.config.end_step, keys)
    if method != "movement":  # enforced masks: the weights themselves are zero
        for t in pruner.targets:
            assert bool((t.weight[~t.mask] == 0).all())


def test_two_four_pattern():
    for method in ("magnitude", "movement"):
        _, pruner, losses = run(method, granularity="2:4", sparsity=0.5)
        for t in pruner.targets:
            assert (t.mask.view(-1, 4).sum(1) == 2).all()


@pytest.mark.parametrize("scope", ["global", "local"])
def test_soft_movement_prunes_and_keeps_a_floor(scope):
    _, pruner, losses = run("soft_movement", soft_threshold=0.0, soft_l1=1e6, score_lr=10.0, scope=scope,
                          score_init="zeros")
    floored = 0
    for t in pruner.targets:
        kept = int(t.mask.sum())
        floor = math.ceil(pruner.config.soft_min_keep * t.mask.numel()) + 1
        assert kept >= floor
        if t.rule[0] == "movement":  # the floor applied: exactly `floor` weights stay
            assert kept == floor
            floored += 1
    assert floored > 0 and pruner.sparsity()["global"] > 0.5


def test_two_four_movement_starts_at_start_step():
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, make_config("movement", granularity="2:4", sparsity=0.5), optimizer)
    assert all(bool(t.mask.all()) for t in pruner.targets)
    train(model, pruner, optimizer, batches(STEPS["start_step"] - 1))
    assert all(bool(t.mask.all()) for t in pruner.targets)
    train(model, pruner, optimizer, batches(2))
    assert all(bool((t.mask.view(-1, 4).sum(1) == 2).all()) for t in pruner.targets)


def test_mgpp_sparsity_counts_zero_weights_between_events():
    model = tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay where the event put them
    pruner = Pruner(model, make_config("mgpp", start_step=1, end_step=13, interval=6), optimizer)
    train(model, pruner, optimizer, batches(3))  # the event at t_i = 1, then a step without one
    assert all(bool(t.mask.all()) for t in pruner.targets)  # no mask enforced between events
    assert pruner.sparsity()["global"] == pytest.approx(0.3, abs=1e-3)


def test_mgpp_regrows_between_events_and_fixes_the_mask_after_end_step():
    model = tiny_bert()
    cfg = make_config("mgpp", start_step=1, end_step=13, interval=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, cfg, optimizer)
    data = batches(18)
    train(model, pruner, optimizer, data[:2])  # steps 0, 1: the event at t_i = 1 prunes s_i
    pruned_at_event = [~t.mask.clone() for t in pruner.targets]
    assert sum(int(p.sum()) for p in pruned_at_event) > 0
    train(model, pruner, optimizer, data[:4])  # steps 2..5: no event, no mask
    assert all(bool(t.mask.all()) for t in pruner.targets)
    regrown = sum(int((t.weight.detach()[p] != 0).sum()) for t, p in zip(pruner.targets, pruned_at_event))
    assert regrown > 0
    train(model, pruner, optimizer, data[:9])  # through t_e = 13
    fixed = [t.mask.clone() for t in pruner.targets]
    train(model, pruner, optimizer, data[:3])
    assert all(torch.equal(f, t.mask) for f, t in zip(fixed, pruner.targets))
    assert all(bool((t.weight.detach()[~t.mask] == 0).all()) for t in pruner.targets)
    stats = pruner.stats()
    assert stats["pruning/lambda"] == pytest.approx(cfg.lam_final)
    assert stats["pruning/prior_threshold"] > 0


@pytest.mark.parametrize("method", ["mgpp", "movement"])
def test_reference_and_triton_paths_produce_the_same_masks(method):
    masks = {}
    for backend in (None, "reference", "triton"):
        with use_backend(backend):
            _, pruner, _ = run(method, steps=8)
        masks[backend] = [t.mask.clone() for t in pruner.targets]
    for backend in ("reference", "triton"):
        assert all(torch.equal(a, b) for a, b in zip(masks[None], masks[backend])), backend


@pytest.mark.parametrize("method", ["mgpp", "movement", "soft_movement"])
def test_resume_from_checkpoint_is_bit_identical(method, tmp_path):
    data = batches(12)
    model, pruner, _ = run(method, steps=12)
    want = [t.mask.clone() for t in pruner.targets]

    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, make_config(method), optimizer)
    train(model, pruner, optimizer, data[:5])
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict(),
                "rng": torch.get_rng_state()}, tmp_path / "ckpt.pt")
    del model, optimizer, pruner

    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model = tiny_bert(seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(state["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(state["optimizer"])
    pruner = Pruner(model, make_config(method), optimizer)
    pruner.load_state_dict(state["pruner"])
    torch.set_rng_state(state["rng"])  # dropout continues as it would have
    train(model, pruner, optimizer, data, start=5)
    assert all(torch.equal(a, t.mask) for a, t in zip(want, pruner.targets))


def test_finalize_and_save_pretrained_load_as_plain_transformers(tmp_path):
    model, pruner, _ = run("movement")
    masks = {t.name: t.mask.clone() for t in pruner.targets}
    pruner.finalize()
    assert "forward" not in vars(pruner.targets[0].module)
    model.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path)
    for name, mask in masks.items():
        w = loaded.get_submodule(name).weight
        assert bool((w[~mask] == 0).all())
        assert torch.equal(w, model.get_submodule(name).weight)
    assert sum(int((loaded.get_submodule(n).weight != 0).sum()) for n in masks) == sum(int(m.sum()) for m in masks.values())
    x = batches(1)[0]["input_ids"]
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_config_round_trips_json_and_yaml(tmp_path):
    cfg = make_config("mgpp", granularity="block", block_size=(16, 32), targets=(r"dense$",))
    assert PruningConfig.from_json(cfg.to_json()) == cfg
    assert PruningConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_yaml(str(tmp_path / "c.yaml"))
    assert PruningConfig.from_yaml(str(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("make,match", [
    (lambda: Pruner(tiny_bert(), make_config("magnitude", targets=(r"nothing_matches",))), "targets: no nn.Linear or Conv1D of the model matches"),
    (lambda: make_config("magnitude", sparsity=1.0), r"s_f must lie in \[0, 1\)"),
    (lambda: make_config("magnitude", sparsity=-0.1), r"s_f must lie in \[0, 1\)"),
    (lambda: make_config("magnitude", start_step=10, end_step=5), "t_e must be > t_i"),
    (lambda: make_config("magnitude", granularity="block", block_size=(0, 8)), "block_size must be two positive ints"),
    (lambda: make_config("magnitude", granularity="2:4", sparsity=0.7), "sparsity must be 0.5 for granularity='2:4'"),
    (lambda: make_config("mgpp", num_train_examples=None), "num_train_examples must be a positive int"),
    (lambda: make_config("bogus"), "method must be one of"),
    (lambda: PruningConfig.from_dict({"method": "mgpp", "sparsitty": 0.9}), "unknown PruningConfig field"),
    (lambda: Pruner(tiny_bert(), make_config("magnitude"),
                    torch.optim.SGD(tiny_bert().parameters(), lr=0.1)), "optimizer does not hold"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_two_four_needs_multiple_of_four_features():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("layers", torch.nn.ModuleList([torch.nn.Linear(6, 8)]))
    cfg = make_config("magnitude", granularity="2:4", sparsity=0.5, targets=(r"layers\.0$",))
    with pytest.raises(ValueError, match="2:4 needs a multiple of 4"):
        Pruner(model, cfg)


def test_after_backward_without_gradients_says_so():
    model = tiny_bert()
    pruner = Pruner(model, make_config("magnitude"))
    with pytest.raises(RuntimeError, match="has no gradient"):
        pruner.after_backward()
