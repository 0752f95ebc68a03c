"""Pruning under torch.distributed: two DDP processes (gloo, CPU, a file:// store in tmp_path, so
nothing but loopback is touched) must end with the same masks as each other, bit-identical to a single
process whose gradients equal DDP's exactly (g0/2 + g1/2), and with the target sparsity exactly.
Each rank histograms only its share of the targets (targets[rank::world]) and the histograms are
all-reduced through sparse_ops.pruning.pruner.distributed_reduce(); the workers count those calls.

The ranks run in tests/_ddp_worker.py (spawned, so they import it by name)."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _ddp_worker as W

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TIMEOUT_S = 120  # the whole spawn; the store and collectives time out after 60 s each on their own


def spawn(cases: list[dict], tmp_path) -> dict:
    """Run `cases` on WORLD spawned DDP ranks; {case name: [rank 0 result, rank 1 result]}.

    A child that raises fails the test with its traceback (ProcessRaisedException); one that hangs
    is killed at TIMEOUT_S and fails it too."""
    out_dir = tmp_path / "ranks"
    out_dir.mkdir()
    init_method = (tmp_path / "store").resolve().as_uri()  # file:///…: a fresh rendezvous per test
    ctx = mp.start_processes(W.worker, args=(W.WORLD, init_method, str(out_dir), cases), nprocs=W.WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers still running after {TIMEOUT_S} s (deadlock in a collective?)")
    finally:
        for p in ctx.processes:  # only ours; no-op for those that already exited
            if p.is_alive():
                p.terminate()
                p.join(5)
    return {W.case_name(c): [torch.load(out_dir / f"{W.case_name(c)}-rank{r}.pt", weights_only=False)
                             for r in range(W.WORLD)] for c in cases}


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    bad = [name for name in a if not torch.equal(a[name], b[name])]
    assert not bad, f"{what} differ for {bad}"


@pytest.mark.parametrize("method", ["movement", "mgpp"])
def test_ddp_masks_match_each_other_and_a_single_process(method, tmp_path):
    case = dict(method=method, granularity="element", scope="global")
    ranks = spawn([case], tmp_path)[W.case_name(case)]
    ref = W.run_reference(case)
    torch.save({"ranks": ranks, "reference": ref}, tmp_path / f"{W.case_name(case)}.pt")

    # the same data, split and averaged as DDP does: per-half losses agree bit for bit
    assert [r["losses"] for r in ranks] == [[pair[r] for pair in ref["losses"]] for r in range(W.WORLD)]
    for r, got in enumerate(ranks):
        assert got["step"] == ref["step"] == W.STEPS
        assert_same(got["masks"], ranks[0]["masks"], f"masks of rank {r} and rank 0")
        assert_same(got["masks"], ref["masks"], f"masks of rank {r} and the single process")
        assert_same(got["scores"], ref["scores"], f"scores of rank {r} and the single process")
        assert_same(got["weights"], ref["weights"], f"weights of rank {r} and the single process")
        # the schedule ended at end_step (9 < 12 steps): exactly round(s_f · n) keys pruned
        assert got["pruned"] == got["want_pruned"] == ref["pruned"]
        assert got["want_pruned"] == round(W.SCHEDULE["sparsity"] * got["total_keys"])
    if method == "movement":
        assert any(bool(s.ne(0).any()) for s in ref["scores"].values())
    else:
        assert not ref["scores"]

    # the work was really split: each rank histogrammed its own share of the keys (global scope,
    # 12 targets, so targets[rank::2] is 6 matrices each) and all-reduced every histogram
    shares = [r["reduce_calls"]["numel_shares"] for r in ranks]
    assert shares[0] and len(shares[0]) == len(shares[1])
    for s0, s1 in zip(*shares):
        assert 0 < s0 < ranks[0]["total_keys"] and 0 < s1 < ranks[0]["total_keys"]
        assert s0 + s1 == ranks[0]["total_keys"]
    assert ranks[0]["reduce_calls"]["histograms"] == ranks[1]["reduce_calls"]["histograms"] > 0
