"""benchmarks/bench_accuracy.py's plan and summaries: several learning rates, each cell reported at the
rate with the best dev accuracy (every method tuned the same way), the tuning table, the targets."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
import bench_accuracy as B  # noqa: E402


def parse(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_accuracy.py", "--device", "cpu", *argv])
    return B.parse_args()


def row(method, lr, dev, test, sparsity=0.9, distill="dense", seed=0):
    return {"method": method, "granularity": "element", "block_size": None,
            "sparsity_target": 0.0 if method == "dense" else sparsity, "seed": seed, "steps": 1000,
            "train_subset": None, "lr": lr, "batch_size": 32, "max_length": 64,
            "distill": None if method == "dense" else distill, "accuracy_dev": dev, "accuracy_test": test,
            "sparsity": 0.0 if method == "dense" else sparsity, "test_examples": 1363}


def test_plan_runs_every_lr_with_its_own_dense_teacher(monkeypatch):
    args = parse(monkeypatch, "--lr", "5e-5,2e-4", "--settings", "element:0.9", "--methods", "dense,mgpp",
                 "--distill", "on")
    plan = B.planned_runs(args)
    assert [(p["method"], p["lr"]) for p in plan] == [("dense", 5e-5), ("dense", 2e-4), ("mgpp", 5e-5),
                                                      ("mgpp", 2e-4)]
    assert B.dense_dir(args, 0, 5e-5) != B.dense_dir(args, 0, 2e-4)
    assert parse(monkeypatch).lr == [2e-4]  # the default


def test_the_other_settings_run_at_the_lr_chosen_on_the_tuning_setting(monkeypatch):
    args = parse(monkeypatch, "--lr", "5e-5,2e-4", "--settings", "element:0.9,element:0.97",
                 "--methods", "dense,mgpp,magnitude")
    before = B.planned_runs(args, [])
    assert {(p["method"], p["sparsity_target"], p["distill"]) for p in before} == {
        ("dense", 0.0, None), ("mgpp", 0.9, "dense"), ("magnitude", 0.9, "dense")}  # tuning only, at both lrs
    rows = [row("dense", 5e-5, 0.80, 0.84), row("dense", 2e-4, 0.83, 0.85),
            row("mgpp", 5e-5, 0.76, 0.78), row("mgpp", 2e-4, 0.79, 0.81),
            row("magnitude", 5e-5, 0.77, 0.79)]  # magnitude's 2e-4 run not done: its lr is not chosen yet
    assert B.chosen_lrs(args, rows) == {"dense": 2e-4, "mgpp": 2e-4}
    plan = B.planned_runs(args, rows)
    rest = {(p["method"], p["sparsity_target"], p["distill"], p["lr"]) for p in plan} - {
        (p["method"], p["sparsity_target"], p["distill"], p["lr"]) for p in before}
    assert rest == {("mgpp", 0.97, "dense", 2e-4), ("mgpp", 0.9, None, 2e-4), ("mgpp", 0.97, None, 2e-4)}


def test_each_cell_takes_the_lr_with_the_best_dev_accuracy():
    rows = [row("dense", 5e-5, 0.80, 0.84), row("dense", 2e-4, 0.83, 0.85),
            row("mgpp", 5e-5, 0.78, 0.90), row("mgpp", 2e-4, 0.76, 0.70),  # dev decides, not test
            row("magnitude", 2e-4, 0.70, 0.72)]
    agg = B.aggregate(rows)
    assert agg[("dense", False, "element", 0.0)]["lr"] == 2e-4
    assert agg[("mgpp", True, "element", 0.9)]["lr"] == 5e-5
    assert agg[("mgpp", True, "element", 0.9)]["mean"] == pytest.approx(0.90)
    assert agg[("magnitude", True, "element", 0.9)]["lr"] == 2e-4  # the only one run
    table = B.tuning_table(rows)
    assert "| mgpp, distilled | 90% | **78.0 / 90.0** | 76.0 / 70.0 |" in table
    assert "| magnitude, distilled | 90% | – | **70.0 / 72.0** |" in table


def test_markdown_names_the_chosen_lr_and_checks_the_targets(monkeypatch):
    args = parse(monkeypatch, "--lr", "5e-5,2e-4", "--settings", "element:0.9")
    rows = [row("dense", 2e-4, 0.83, 0.85), row("mgpp", 2e-4, 0.80, 0.84), row("magnitude", 2e-4, 0.78, 0.80),
            row("mgpp", 5e-5, 0.75, 0.78)]
    text = B.markdown(rows, args, {"device": "cpu", "date": "2026-12-01"})
    assert "chosen per cell by dev accuracy among 5e-5, 2e-4" in text
    assert "| mgpp, distilled | 84.0 (lr 2e-4) |" in text
    assert "MGPP − dense = -1.0 points, seeds [0] (target ≥ −2): met" in text
    assert "MGPP − magnitude = +4.0 points, seeds [0] (target > 0): met" in text
    assert "Learning rate, chosen per cell by dev accuracy" in text


def test_other_seeds_run_only_at_the_lr_chosen_on_the_tuning_seeds(monkeypatch):
    args = parse(monkeypatch, "--lr", "5e-5,2e-4", "--seeds", "0,1", "--tune-seeds", "0",
                 "--settings", "element:0.9,element:0.97", "--methods", "dense,mgpp", "--distill", "on")
    before = B.planned_runs(args, [])
    assert {p["seed"] for p in before} == {0}  # nothing for seed 1 until seed 0 has chosen
    rows = [row("dense", 5e-5, 0.80, 0.84), row("dense", 2e-4, 0.83, 0.85),
            row("mgpp", 5e-5, 0.76, 0.78), row("mgpp", 2e-4, 0.79, 0.81)]
    seed1 = {(p["method"], p["sparsity_target"], p["lr"]) for p in B.planned_runs(args, rows) if p["seed"] == 1}
    assert seed1 == {("dense", 0.0, 2e-4), ("mgpp", 0.9, 2e-4), ("mgpp", 0.97, 2e-4)}
    with pytest.raises(SystemExit):
        parse(monkeypatch, "--seeds", "0,1", "--tune-seeds", "2")


def test_the_lr_is_chosen_on_the_tuning_seeds_and_reported_over_all(monkeypatch):
    args = parse(monkeypatch, "--lr", "5e-5,2e-4", "--seeds", "0,1", "--tune-seeds", "0", "--settings",
                 "element:0.9")
    rows = [row("dense", 2e-4, 0.83, 0.85), row("dense", 2e-4, 0.81, 0.83, seed=1),
            row("mgpp", 5e-5, 0.75, 0.70), row("mgpp", 2e-4, 0.78, 0.80),
            row("mgpp", 2e-4, 0.70, 0.76, seed=1)]  # seed 1's low dev must not move the choice
    agg = B.aggregate(rows, args.tune_seeds)
    assert agg[("mgpp", True, "element", 0.9)]["lr"] == 2e-4
    assert agg[("mgpp", True, "element", 0.9)]["mean"] == pytest.approx(0.78) and agg[
        ("mgpp", True, "element", 0.9)]["n"] == 2
    text = B.markdown(rows, args, {"device": "cpu", "date": "2026-12-01"})
    assert "among 5e-5, 2e-4 (in parentheses) on seeds [0]" in text
    assert "chosen per cell by dev accuracy on seeds [0]" in text
    assert "| mgpp, distilled | 78.0 ± 2.8 (lr 2e-4) |" in text


def test_targets_compare_cells_seed_for_seed():
    rows = [row("dense", 2e-4, 0.83, 0.85), row("dense", 2e-4, 0.83, 0.95, seed=1),  # seed 1: MGPP not run yet
            row("mgpp", 2e-4, 0.80, 0.84)]
    lines = B.targets(B.aggregate(rows))
    assert "90% (distilled): MGPP − dense = -1.0 points, seeds [0] (target ≥ −2): met" in lines  # not 84 − 90
