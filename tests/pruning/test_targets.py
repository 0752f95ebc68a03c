"""Targets in any transformers model (docs/design.md §2.8): the default is every nn.Linear and
transformers Conv1D inside the repeated blocks, for BERT, RoBERTa, Llama, Qwen2, Mistral, Gemma, OPT
and GPT-2; regexes override it. Every method at every granularity prunes GPT-2's Conv1D (weight
stored (in, out)) with the exact counts, in the (out, in) orientation: blocks are (rows, cols) of
(out, in) and 2:4 groups run along the input features, dim 0 of the stored weight."""

import pytest
import torch
from _architectures import ARCHITECTURES, expected_targets, tiny_model
from test_pruner import make_config
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from sparse_ops.pruning.config import DEFAULT_EXCLUDE, PruningConfig
from sparse_ops.pruning.pruner import Pruner
from sparse_ops.pruning.targets import find_targets, in_out_features, is_prunable, repeated_blocks

# what PruningConfig.targets defaulted to before the default became the repeated blocks: configs
# saved with it must keep selecting the same layers
LEGACY_TARGETS = (
    r"(^|\.)(encoder|layers?)\.\d+\.attention\.self\.(query|key|value)$",
    r"(^|\.)(encoder|layers?)\.\d+\.attention\.output\.dense$",
    r"(^|\.)(encoder|layers?)\.\d+\.intermediate\.dense$",
    r"(^|\.)(encoder|layers?)\.\d+\.output\.dense$",
    r"(^|\.)layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
)
STEPS = dict(start_step=2, end_step=8, interval=2)
BLOCK = (8, 16)  # rows × cols of the (out, in) matrix; divides every GPT-2 matrix (96/32/128 × 32/128)


def config(method, **over):
    """test_pruner's configuration, on this file's shorter schedule."""
    return make_config(method, **{**STEPS, **over})


def train(model, pruner, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randint(3, 99, (2, 12), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        pruner.after_backward()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
    model.eval()


# ----------------------------------------------------------------------------------------------
# the default targets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_targets_are_the_block_projections(arch):
    model = tiny_model(arch)
    assert [name for name, _ in find_targets(model)] == expected_targets(arch)
    assert [t.name for t in Pruner(model, config("magnitude")).targets] == expected_targets(arch)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_config_saved_with_the_old_regexes_selects_the_same_layers(arch):
    model = tiny_model(arch)
    saved = config("magnitude").to_dict()
    saved["targets"] = list(LEGACY_TARGETS)
    legacy = PruningConfig.from_json(PruningConfig.from_dict(saved).to_json())
    assert legacy.targets == LEGACY_TARGETS
    assert [t.name for t in Pruner(model, legacy).targets] == expected_targets(arch)


def test_gpt2_layers_are_conv1d_and_the_head_stays_out():
    model = tiny_model("gpt2")
    found = dict(find_targets(model))
    assert all(type(m) is Conv1D for m in found.values())
    assert in_out_features(found["transformer.h.0.attn.c_attn"]) == (32, 96)
    assert in_out_features(found["transformer.h.0.mlp.c_proj"]) == (128, 32)
    assert [name for name, _ in repeated_blocks(model)] == ["transformer.h"]
    assert is_prunable(model.lm_head) and "lm_head" not in found


def test_regexes_override_the_default_and_exclude_applies_to_both():
    model = tiny_model("gpt2")
    assert [n for n, _ in find_targets(model, targets=(r"mlp\.c_fc$",))] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert [n for n, _ in find_targets(model, exclude=(r"\.attn\.",))] == [
        n for n in expected_targets("gpt2") if ".mlp." in n]
    # a regex may reach outside the blocks; exclude still removes its matches
    assert [n for n, _ in find_targets(model, targets=(r"lm_head$",))] == ["lm_head"]
    with pytest.raises(ValueError, match="targets: no nn.Linear or Conv1D"):
        find_targets(model, targets=(r"lm_head$",), exclude=DEFAULT_EXCLUDE)


def test_config_default_is_none_and_round_trips(tmp_path):
    cfg = config("movement")
    assert cfg.targets is None and cfg.to_dict()["targets"] is None
    assert PruningConfig.from_json(cfg.to_json()) == cfg
    assert PruningConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_yaml(str(tmp_path / "c.yaml"))
    assert PruningConfig.from_yaml(str(tmp_path / "c.yaml")).targets is None
    explicit = config("movement", targets=[r"c_fc$"])
    assert explicit.targets == (r"c_fc$",) and PruningConfig.from_json(explicit.to_json()) == explicit


@pytest.mark.parametrize("make,match", [
    (lambda: find_targets(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))),
     r"targets=None: Sequential has no repeated blocks"),
    (lambda: Pruner(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), config("magnitude")), r"targets=None"),
    (lambda: find_targets(nn.Sequential(nn.ReLU()), targets=(".",)), r"targets: no nn.Linear or Conv1D"),
    (lambda: config("magnitude", targets=()), "targets must be None .* or hold at least one"),
    (lambda: config("magnitude", targets=r"c_fc$"), "targets must be a tuple of regular expressions"),
    (lambda: config("magnitude", exclude=r"lm_head"), "exclude must be a tuple of regular expressions"),
])
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_model_without_blocks_can_still_be_pruned_by_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [n for n, _ in find_targets(model, targets=(r"^0$",))] == ["0"]


# ----------------------------------------------------------------------------------------------
# every method and granularity on GPT-2's Conv1D
# ----------------------------------------------------------------------------------------------
def check_orientation(pruner, granularity):
    """The masks are (out, in); after finalize the stored (in, out) weights are zero exactly where they say."""
    for t in pruner.targets:
        w = t.module.weight.detach()
        in_features, out_features = w.shape
        assert t.mask.shape == (out_features, in_features)
        assert torch.equal(w.t() != 0, t.mask), t.name
        if granularity == "block":
            blocks = t.mask.view(out_features // BLOCK[0], BLOCK[0], in_features // BLOCK[1], BLOCK[1])
            assert torch.equal(blocks.all(3).all(1), blocks.any(3).any(1)), t.name  # constant on each block
        if granularity == "2:4":  # 2 of every 4 consecutive input features: along dim 0 of the stored weight
            assert bool(((w != 0).view(in_features // 4, 4, out_features).sum(1) == 2).all()), t.name


@pytest.mark.parametrize("method", ["magnitude", "mgpp", "movement", "soft_movement"])
@pytest.mark.parametrize("granularity", ["element", "block", "2:4"])
def test_every_method_prunes_gpt2_conv1d(method, granularity):
    model = tiny_model("gpt2")
    cfg = config(method, granularity=granularity, block_size=BLOCK, sparsity=0.5 if granularity == "2:4" else 0.75)
    pruner = Pruner(model, cfg, optimizer := torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert len(pruner.targets) == 8
    train(model, pruner, optimizer, steps=STEPS["end_step"] + 2)
    x = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=x).logits  # movement: the masked forward of the Conv1D
    sparsity = pruner.sparsity()
    pruner.finalize()
    assert all("forward" not in vars(t.module) for t in pruner.targets)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=1e-5, atol=1e-5)
    check_orientation(pruner, granularity)
    weight = BLOCK[0] * BLOCK[1] if granularity == "block" else 1
    pruned = {t.name: int((~t.mask).sum()) // weight for t in pruner.targets}
    assert sparsity["global"] == sum(int((t.mask == 0).sum()) for t in pruner.targets) / sum(
        t.mask.numel() for t in pruner.targets)
    if granularity == "2:4":
        assert all(pruned[t.name] == t.mask.numel() // 2 for t in pruner.targets)
    elif method == "soft_movement":  # its sparsity is set by λ_mvp, not forced: it prunes, keeping a floor
        assert 0 < sum(pruned.values()) and all(bool(t.mask.any()) for t in pruner.targets)
    elif cfg.scope == "global":
        assert sum(pruned.values()) == pruner.count(pruner.targets, STEPS["end_step"])
    else:
        assert all(pruned[t.name] == pruner.count([t], STEPS["end_step"]) for t in pruner.targets)


class _Stack(nn.Module):
    """Two blocks of one layer each, Conv1D or nn.Linear, computing the same function."""

    def __init__(self, conv: bool, weights):
        super().__init__()
        layers = []
        for w in weights:  # w: (out, in)
            layer = Conv1D(w.shape[0], w.shape[1]) if conv else nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                layer.weight.copy_(w.t() if conv else w)
                layer.bias.zero_()
            block = nn.Module()
            block.proj = layer
            layers.append(block)
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for block in self.layers:
            x = torch.tanh(block.proj(x))
        return x


@pytest.mark.parametrize("method", ["magnitude", "movement"])
@pytest.mark.parametrize("granularity", ["element", "block", "2:4"])
def test_conv1d_gets_the_masks_of_the_equivalent_linear(method, granularity):
    """The same weights as Conv1D (stored (in, out)) and as nn.Linear: the same (out, in) masks."""
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(24, 16, generator=g), torch.randn(16, 24, generator=g)]
    x = torch.randn(5, 16, generator=g)
    masks = {}
    for conv in (True, False):
        model = _Stack(conv, weights)
        cfg = config(method, granularity=granularity, block_size=(4, 8), sparsity=0.5 if granularity == "2:4" else 0.6,
                     start_step=0, end_step=2, interval=1, scope="local")
        pruner = Pruner(model, cfg, optimizer := torch.optim.SGD(model.parameters(), lr=0.0))
        for _ in range(3):
            model(x).square().sum().backward()
            pruner.after_backward()
            optimizer.step()
            pruner.after_optimizer_step()
            optimizer.zero_grad()
        masks[conv] = [t.mask.clone() for t in pruner.targets]
        assert [t.transposed for t in pruner.targets] == [conv, conv]
    assert all(torch.equal(a, b) for a, b in zip(masks[True], masks[False]))
    assert not all(bool(m.all()) for m in masks[True])


def test_finalize_and_save_pretrained_gpt2_is_a_plain_checkpoint_with_zeros(tmp_path):
    model = tiny_model("gpt2")
    pruner = Pruner(model, config("movement", sparsity=0.5), optimizer := torch.optim.AdamW(model.parameters()))
    train(model, pruner, optimizer, steps=STEPS["end_step"] + 1)
    masks = {t.name: t.mask.clone() for t in pruner.targets}
    pruner.finalize().save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    modules = dict(loaded.named_modules())
    for name, mask in masks.items():
        assert type(modules[name]) is Conv1D
        assert torch.equal(modules[name].weight.t() != 0, mask)
        assert int((~mask).sum()) == mask.numel() // 2
    x = torch.randint(3, 99, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
