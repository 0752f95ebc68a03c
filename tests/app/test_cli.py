"""The sparse-ops command line: one-line errors, prune -> eval -> export -> bench, and the `run` pipeline,
on a tiny random BERT and a tiny synthetic CSV."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from _tiny import make_csv, make_model_dir, one_thread  # noqa: F401  (autouse fixture)

import sparse_ops
from sparse_ops.app import cli, data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = make_model_dir(str(root / "model"))
    csv_path = make_csv(str(root / "data.csv"), 160)
    return root, model_dir, csv_path


def _data_args(tiny):
    _, model_dir, csv_path = tiny
    return ["--model", model_dir, "--data-csv", csv_path, "--text-column", "review", "--label-column", "sentiment",
            "--group-column", "movie"]


def _one_line_error(capsys, argv, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sparse-ops: error: "), err
    assert re.search(match, err), err


@pytest.mark.parametrize("argv, match", [
    (["frob"], "invalid choice: 'frob'"),
    (["prune", "--sparsity", "1.5"], r"--sparsity: sparsity must lie in \[0, 1\)"),
    (["prune", "--method", "random"], "--method: invalid choice"),
    (["prune", "--block-size", "0x32"], "--block-size: expected two positive sizes"),
    (["prune", "--steps", "-3"], "--steps: expected a positive integer"),
    (["run", "--shapes", "1x"], "--shapes: expected BATCHxSEQ"),
    (["eval", "/nonexistent/checkpoint"], "no such directory"),
    (["prune", "--model", "/nonexistent/model"], "model path must be a local Hugging Face model directory"),
])
def test_bad_arguments_give_one_line_and_status_2(capsys, argv, match):
    _one_line_error(capsys, argv, match)


def test_bad_values_found_later_give_one_line_too(capsys, tiny, tmp_path):
    args = _data_args(tiny)
    _one_line_error(capsys, ["prune", *args[:2], "--data-csv", str(tmp_path / "missing.csv")], "CSV path")
    _one_line_error(capsys, ["prune", *args[:-4], "--text-column", "nope"], r"no column\(s\) \['nope', 'label'\]")
    _one_line_error(capsys, ["prune", *args, "--steps", "5", "--method", "mgpp"], "steps must be >= 10")
    _one_line_error(capsys, ["run", *args, "--method", "dense"], "must be a pruning method")
    _one_line_error(capsys, ["run", *args, "--shapes", "1x4096"], "exceeds the model's max_position_embeddings")


def test_python_dash_m_routes_to_the_same_command_line():
    proc = subprocess.run([sys.executable, "-m", "sparse_ops", "prune", "--granularity", "2:4"], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sparse-ops")]
    assert len(lines) == 1 and "--granularity: invalid choice" in lines[0] and "Traceback" not in proc.stderr


def test_prune_eval_export_bench_round_trip(capsys, tiny):
    root, model_dir, _ = tiny
    out = str(root / "pruned")
    assert cli.main(["prune", *_data_args(tiny), "--method", "magnitude", "--sparsity", "0.75", "--steps", "20",
                     "--batch-size", "8", "--lr", "3e-3", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "sparse_ops_run.json")) as f:
        run = json.load(f)
    assert f"test accuracy {run['accuracy']['test']:.4f}" in printed
    assert run["sparsity"] == pytest.approx(0.75, abs=1e-4)

    assert cli.main(["eval", out]) == 0  # the data source recorded in the run is used again
    assert f"test accuracy {run['accuracy']['test']:.4f}" in capsys.readouterr().out
    assert cli.main(["eval", out, "--split", "dev"]) == 0
    assert f"dev accuracy {run['accuracy']['dev']:.4f}" in capsys.readouterr().out

    assert cli.main(["export", out, "--format", "csr", "--tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "sparse_ops export" in printed and "12 of 14 exported" in printed
    exported_file = os.path.join(out, cli.EXPORTED_FILE)
    pruned = data.load_model(out, num_labels=None).eval()
    skeleton = data.load_model(model_dir, num_labels=2).eval()  # same architecture, other weights
    sparse_ops.load_exported(skeleton, exported_file)
    x = {"input_ids": torch.randint(5, 30, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.int64)}
    with torch.no_grad():
        torch.testing.assert_close(skeleton(**x).logits, pruned(**x).logits, rtol=1e-5, atol=1e-5)

    assert cli.main(["bench", out, "--shapes", "1x8,2x16", "--repeats", "2", "--format", "csr",
                     "--tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"latency, batch 1 x 8 tokens: +dense", printed) and "latency, batch 2 x 16 tokens:" in printed
    with open(os.path.join(out, "bench.json")) as f:
        bench = json.load(f)
    assert {(r["model"], r["batch"], r["seq"]) for r in bench["rows"]} == {
        (m, b, s) for m in ("dense", "exported") for b, s in ((1, 8), (2, 16))}
    assert os.path.getsize(os.path.join(out, "bench.png")) > 0


def test_run_prints_the_four_numbers_and_writes_a_png(capsys, tiny):
    root, _, _ = tiny
    out = str(root / "run")
    assert cli.main(["run", *_data_args(tiny), "--steps", "20", "--batch-size", "8", "--lr", "3e-3",
                     "--sparsity", "0.75", "--shapes", "1x8", "--repeats", "2", "--tokens", "8", "--out", out,
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "run.json")) as f:
        summary = json.load(f)
    assert re.search(rf"dense accuracy \(test, 16 examples\): +{summary['dense']['accuracy']['test']:.4f}", printed)
    assert f"{summary['pruned']['accuracy']['test']:.4f}" in printed
    assert re.search(r"sparsity reached: +75\.00% of the encoder linear weights", printed)
    assert re.search(r"latency, batch 1 x 8 tokens: +dense [\d.]+ ms, exported [\d.]+ ms \([\d.]+x (faster|slower)\)",
                     printed)
    # the exported model classifies exactly like the pruned one
    assert summary["exported_accuracy"]["test"] == summary["pruned"]["accuracy"]["test"]
    assert os.path.getsize(os.path.join(out, "run.png")) > 0
    assert os.path.isfile(os.path.join(out, "pruned", cli.EXPORTED_FILE))


def test_a_missing_app_dependency_says_how_to_install_it(monkeypatch):
    from sparse_ops.app import app_dependency

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    with pytest.raises(ImportError, match=r'tqdm.auto is missing: .*pip install "sparse_ops\[app\]"'):
        app_dependency("tqdm.auto")
    assert app_dependency("json").dumps([1]) == "[1]"
