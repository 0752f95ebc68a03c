"""sparse_ops.app.data: the Rotten Tomatoes split by movie, users' CSV files, tokenised batches, the model."""

import bz2
import csv
import gzip
import os

import pytest
import torch
from _tiny import make_csv, make_model_dir, sentences

from sparse_ops.app import data


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model_dir(str(tmp_path_factory.mktemp("tiny_model")))


def _raw_rotten_tomatoes():
    """(text, category, movie) of every fresh/rotten row, read independently of sparse_ops.app.data."""
    with bz2.open(data.rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as f:
        return [(r["text"], r["category"], r["movie_name"]) for r in csv.DictReader(f) if r["category"] != "plot"]


def test_rotten_tomatoes_split_by_movie_is_disjoint_complete_and_deterministic():
    raw = _raw_rotten_tomatoes()
    a, b = data.rotten_tomatoes(seed=0), data.rotten_tomatoes(seed=0)
    movies = [set(a.split(s).groups) for s in ("train", "dev", "test")]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert sum(map(len, movies)) == len({m for _, _, m in raw})
    n_movies = sum(map(len, movies))  # 80/10/10 of the movies
    assert len(movies[1]) == len(movies[2]) == round(0.1 * n_movies)
    for s in ("train", "dev", "test"):
        assert a.split(s) == b.split(s)
    # every labelled snippet lands in exactly one split, with its own label (fresh = 1, rotten = 0)
    got = sorted((t, a.label_names[y], m) for s in ("train", "dev", "test")
                 for t, y, m in zip(a.split(s).texts, a.split(s).labels, a.split(s).groups))
    assert got == sorted(raw)
    assert a.label_names == ["rotten", "fresh"]
    other = data.rotten_tomatoes(seed=1)
    assert set(other.test.groups) != set(a.test.groups)


def test_split_examples_by_group_and_by_row():
    texts = [f"t{i}" for i in range(100)]
    groups = [f"g{i % 20}" for i in range(100)]
    ex = data.Examples(texts, [i % 2 for i in range(100)], groups)
    train, dev, test = data.split_examples(ex, seed=3)
    assert [len(set(p.groups)) for p in (train, dev, test)] == [16, 2, 2]
    assert len(train) + len(dev) + len(test) == 100
    assert not set(train.groups) & (set(dev.groups) | set(test.groups))
    by_row = data.split_examples(data.Examples(texts, [0] * 100), seed=3)
    assert [len(p) for p in by_row] == [80, 10, 10]
    assert sorted(t for p in by_row for t in p.texts) == sorted(texts)
    with pytest.raises(ValueError, match="fractions"):
        data.split_examples(ex, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="at least 3"):
        data.split_examples(data.Examples(["a", "b"], [0, 1]))


def test_load_csv_maps_sorted_labels_and_reads_compressed(tmp_path):
    rows = sentences(60, seed=1)
    path = make_csv(str(tmp_path / "r.csv"), 60, seed=1)
    splits = data.load_csv(path, "review", "sentiment", group_column="movie")
    assert splits.label_names == ["neg", "pos"]
    got = sorted((t, splits.label_names[y]) for s in ("train", "dev", "test")
                 for t, y in zip(splits.split(s).texts, splits.split(s).labels))
    assert got == sorted((t, lab) for t, lab, _ in rows)
    # integer labels sort numerically: 2 < 10
    numeric = tmp_path / "n.csv.gz"
    with gzip.open(numeric, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([(f"text {i}", ["10", "2", "1"][i % 3]) for i in range(30)])
    splits = data.load_csv(str(numeric))
    assert splits.label_names == ["1", "2", "10"]
    assert all(splits.label_names[y] == ["10", "2", "1"][int(t.split()[1]) % 3]
               for s in ("train", "dev", "test") for t, y in zip(splits.split(s).texts, splits.split(s).labels))


def test_load_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CSV path"):
        data.load_csv(str(tmp_path / "missing.csv"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load_csv(str(empty))
    path = make_csv(str(tmp_path / "r.csv"), 20)
    with pytest.raises(ValueError, match=r"no column\(s\) \['label'\].*review"):
        data.load_csv(path, "review", "label")
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        data.load_csv(str(header_only))
    one_label = tmp_path / "one.csv"
    one_label.write_text("text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(ValueError, match="at least 2 distinct"):
        data.load_csv(str(one_label))
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\na,x\n,y\n")
    with pytest.raises(ValueError, match="line 3: empty 'text'"):
        data.load_csv(str(blank))


def test_batches_pad_dynamically_and_order_is_seeded(tiny_dir):
    tok = data.load_tokenizer(tiny_dir)
    texts = ["good", "the film is good", "bad bad bad bad bad bad bad bad bad bad bad bad"]
    b = data.Batches(data.Examples(texts, [1, 1, 0]), tok, max_length=8)
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert [len(ids) for ids in b.input_ids] == [min(n, 8) for n in lengths]
    x = b.batch([0, 1])
    assert x["input_ids"].shape == (2, lengths[1])
    assert x["attention_mask"].sum(1).tolist() == lengths[:2]
    assert (x["input_ids"][0, lengths[0]:] == tok.pad_token_id).all()
    assert torch.equal(x["input_ids"][1], torch.tensor(tok(texts[1])["input_ids"]))
    assert x["labels"].tolist() == [1, 1]

    many = data.Batches(data.Examples([f"good {i}" for i in range(10)], list(range(10))), tok)
    first = [bt["labels"].tolist() for bt in many.train_batches(5, 4, seed=0)]
    assert first == [bt["labels"].tolist() for bt in many.train_batches(5, 4, seed=0)]
    assert sorted(first[0] + first[1]) == list(range(10)) == sorted(first[2] + first[3])  # one epoch each
    assert first != [bt["labels"].tolist() for bt in many.train_batches(5, 4, seed=1)]
    assert sorted(y for bt in many.eval_batches(3) for y in bt["labels"].tolist()) == list(range(10))
    with pytest.raises(ValueError, match="max_length"):
        data.Batches(data.Examples(texts, [1, 1, 0]), tok, max_length=0)


def test_bundled_model_loads_offline_with_a_fresh_head():
    path = data.model_dir()
    assert os.path.isfile(os.path.join(path, "config.json"))
    model = data.load_model(num_labels=3)
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    assert model.classifier.out_features == 3
    tok = data.load_tokenizer()
    out = model(**tok(["a fine film"], return_tensors="pt"))
    assert out.logits.shape == (1, 3)
    with pytest.raises(FileNotFoundError, match="model path"):
        data.load_model("/nonexistent/model")
    with pytest.raises(ValueError, match="num_labels"):
        data.load_model(num_labels=1)


def test_length_grouped_batches_cover_every_example_once_per_epoch(tiny_dir):
    tok = data.load_tokenizer(tiny_dir)
    texts = [" ".join(["good"] * (1 + i % 23)) for i in range(200)]
    b = data.Batches(data.Examples(texts, list(range(200))), tok)
    grouped = list(b.train_batches(10, 40, seed=0, group_by_length=True))
    plain = list(b.train_batches(10, 40, seed=0))
    for half in (grouped[:20], grouped[20:]):  # 20 batches of 10 = one epoch each
        assert sorted(y for bt in half for y in bt["labels"].tolist()) == list(range(200))
    assert [bt["labels"].tolist() for bt in grouped] == [
        bt["labels"].tolist() for bt in b.train_batches(10, 40, seed=0, group_by_length=True)]
    padded = sum(bt["input_ids"].numel() for bt in grouped)
    assert padded < 0.7 * sum(bt["input_ids"].numel() for bt in plain)
    assert padded >= sum(len(b.input_ids[i]) for i in range(200)) * 2  # never less than the real tokens
