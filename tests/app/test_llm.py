"""One-shot pruning from the command line (`sparse-ops oneshot`, `sparse-ops perplexity`) and the LLM
data helpers, on a tiny random Llama with a word-level tokenizer and a tiny Wikipedia-like file."""

import json
import os
import re

import pytest
import torch
import transformers
from _tiny import NEUTRAL, NEGATIVE, POSITIVE, SPECIAL, one_thread  # noqa: F401  (autouse fixture)

import sparse_ops
from sparse_ops.app import cli, llm
from sparse_ops.pruning.targets import find_targets, weight_out_in

WORDS = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lm"))
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    gen = torch.Generator().manual_seed(0)
    words = [NEUTRAL[int(i)] for i in torch.randint(0, len(NEUTRAL), (600,), generator=gen)]
    path.write_text(" ".join(words), encoding="utf-8")
    return str(path)


def test_oneshot_command_prunes_saves_a_plain_checkpoint_and_reports(lm_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "pruned")
    assert cli.main(["oneshot", "--model", lm_dir, "--method", "sparsegpt", "--granularity", "2:4",
                     "--calibration-text", text_file, "--samples", "4", "--seq-len", "16", "--no-progress",
                     "--out", out]) == 0
    assert "sparsity reached 0.5000" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint
    for name, module in find_targets(model):
        kept = (weight_out_in(module) != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
        assert bool((kept == 2).all()), name
    report = json.load(open(os.path.join(out, "oneshot_report.json")))["report"]
    assert report["method"] == "sparsegpt" and len(report["layers"]) == 14
    assert sparse_ops.export(model, format="csr").sparse_ops_report is not None  # exports like any pruned model


def test_perplexity_command_matches_the_library(lm_dir, text_file, capsys):
    assert cli.main(["perplexity", "--model", lm_dir, "--text", text_file, "--seq-len", "32", "--windows", "3",
                     "--no-progress"]) == 0
    printed = float(re.search(r"perplexity ([\d.]+)", capsys.readouterr().out)[1])
    model, tokenizer = llm.load_causal_lm(lm_dir)
    ids = llm.token_stream(tokenizer, [open(text_file).read()])[:96]
    assert printed == pytest.approx(sparse_ops.perplexity(model, ids, 32, progress=False), abs=1e-3)


@pytest.mark.parametrize("argv,match", [
    (["--method", "obs"], "method"),
    (["--granularity", "4:2"], "granularity"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--calibration-text", "/nonexistent.txt"], "text file"),
])
def test_oneshot_command_bad_arguments_are_one_line_errors(lm_dir, text_file, tmp_path, capsys, argv, match):
    base = ["oneshot", "--model", lm_dir, "--calibration-text", text_file, "--samples", "2", "--seq-len", "8",
            "--no-progress", "--out", str(tmp_path / "o")]
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sparse-ops: error: ") and re.search(match, err), err
    assert not os.path.exists(tmp_path / "o")


def test_wikipedia_split_is_by_title_hash_and_disjoint(tmp_path):
    articles = {f"Title {i}": {"title": f"Title {i}", "extract": f"text of article {i}"} for i in range(200)}
    articles["Empty"] = {"title": "Empty", "extract": ""}
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps(articles))
    split = llm.wikipedia_split(str(path))
    assert not set(split["calibration"]) & set(split["test"])
    assert len(split["calibration"]) + len(split["test"]) == 200  # the empty one is dropped
    assert 5 <= len(split["test"]) <= 40  # about one in TEST_BUCKETS
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(dict(reversed(list(articles.items())))))
    assert llm.wikipedia_split(str(reordered)) == split  # independent of the file's order


def test_calibration_windows_are_seeded_slices_of_the_stream():
    stream = torch.arange(1000)
    a = llm.calibration_windows(stream, 5, 64, seed=3)
    assert a.shape == (5, 64) and torch.equal(a, llm.calibration_windows(stream, 5, 64, seed=3))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous slices
    with pytest.raises(ValueError, match="seq_len"):
        llm.calibration_windows(stream[:10], 1, 64)
