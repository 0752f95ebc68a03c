"""Helpers for tests/pruning/test_distributed.py: one DDP rank (run in a spawned process) and the
single-process reference it must match bit for bit.

Both sides train the same tiny BERT (dropout off, same seed) on the same global batches. A DDP rank
sees its slice of each batch; DDP's default comm hook multiplies each rank's gradient by 1/world and
all-reduces (sums) them. The reference emulates that exactly for world = 2: backward on half 0 → g0,
backward on half 1 → g1, grad = g0/2 + g1/2 (halving is exact and a sum of two is commutative), so
the weights, scores, thresholds and masks must agree bit for bit, not merely approximately.

Everything here runs with one intra-op thread: CPU matmul reductions may split differently with
another thread count, and then gradients would differ in the last bit between the two sides.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib

import torch
from transformers import BertConfig, BertForSequenceClassification

STEPS = 12
WORLD = 2
GLOBAL_BATCH = 4
SCHEDULE = dict(start_step=2, end_step=9, interval=2, sparsity=0.8)


def bert(seed: int = 0, hidden: int = 32, layers: int = 2) -> BertForSequenceClassification:
    """tests/test_pruner.tiny_bert with dropout off, so no RNG enters the forward."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def case_config(case: dict):
    from test_pruner import make_config

    return make_config(case["method"], granularity=case.get("granularity", "element"),
                       scope=case.get("scope", "global"), block_size=tuple(case.get("block_size", (8, 8))),
                       **SCHEDULE)


def data() -> list[dict]:
    from test_pruner import batches

    return batches(STEPS, seed=0, batch=GLOBAL_BATCH)


def part(batch: dict, rank: int, world: int = WORLD) -> dict:
    """Rank `rank`'s contiguous share of a global batch (what a DistributedSampler-style split gives)."""
    n = next(iter(batch.values())).shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def result(pruner, losses) -> dict:
    """What the test compares: masks, scores, target weights, the step and pruned counts."""
    return {"step": pruner.step, "losses": losses,
            "masks": {t.name: t.mask.clone() for t in pruner.targets},
            "scores": {t.name: t.scores.clone() for t in pruner.targets if t.scores is not None},
            "weights": {t.name: t.weight.detach().clone() for t in pruner.targets},
            "total_keys": sum(t.num_keys for t in pruner.targets),
            "pruned": sum(int((~t.mask).sum()) for t in pruner.targets),
            "want_pruned": pruner.schedule.prune_count(pruner.config.end_step, sum(t.num_keys for t in pruner.targets))}


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the single-process reference --------------------------------------------------------------------
def run_reference(case: dict) -> dict:
    from sparse_ops.pruning.pruner import Pruner

    with one_thread():
        model = bert()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pruner = Pruner(model, case_config(case), optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        losses = []
        for batch in data():
            loss0 = model(**part(batch, 0)).loss
            loss0.backward()
            g0 = [p.grad.clone() for p in params]
            optimizer.zero_grad()
            loss1 = model(**part(batch, 1)).loss
            loss1.backward()
            for p, a in zip(params, g0):
                p.grad = a.div(2) + p.grad.div(2)  # DDP: each rank's grad × 1/world, then a sum all-reduce
            pruner.after_backward()
            optimizer.step()
            pruner.after_optimizer_step()
            optimizer.zero_grad()
            losses.append((loss0.detach().item(), loss1.detach().item()))
        return result(pruner, losses)


# -- one DDP rank -------------------------------------------------------------------------------------
def run_rank(case: dict, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from sparse_ops.pruning.pruner import distributed_reduce
    from sparse_ops.pruning.pruner import Pruner

    reduce, shard = distributed_reduce()
    assert shard == (rank, world), shard
    calls = {"histograms": 0, "numel_shares": []}

    def counting_reduce(t: torch.Tensor) -> None:
        if t.numel() == 1:  # radix_select all-reduces its local key count first: this rank's share
            calls["numel_shares"].append(int(t))
        else:
            calls["histograms"] += 1
        reduce(t)

    model = bert()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    pruner = Pruner(model, case_config(case), optimizer, reduce=counting_reduce, shard=shard)
    losses = []
    for batch in data():
        loss = ddp(**part(batch, rank, world)).loss
        loss.backward()
        pruner.after_backward()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())
    out = result(pruner, losses)
    out["reduce_calls"] = calls
    out["targets"] = [t.name for t in pruner.targets]
    return out


def worker(rank: int, world: int, init_method: str, out_dir: str, cases: list[dict]) -> None:
    """Entry point of each spawned process (torch.multiprocessing passes the rank first)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname resolves to
    torch.set_num_threads(1)
    import torch.distributed as dist

    import sparse_ops  # noqa: F401  (registers the ops)

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for case in cases:
            out = run_rank(case, rank, world)
            torch.save(out, pathlib.Path(out_dir) / f"{case_name(case)}-rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def case_name(case: dict) -> str:
    return "-".join(str(case.get(k, d)) for k, d in (("method", ""), ("granularity", "element"), ("scope", "global")))
