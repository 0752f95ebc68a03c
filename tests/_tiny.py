"""A tiny random BERT classifier with its own word-level vocabulary, and a tiny synthetic sentiment
CSV, for tests that need a Hugging Face model directory and data but not the real ones."""

from __future__ import annotations

import csv
import os
import random

import pytest

POSITIVE = ["good", "great", "superb", "moving", "funny", "sharp", "warm", "brilliant"]
NEGATIVE = ["bad", "dull", "tedious", "clumsy", "boring", "flat", "awful", "inert"]
NEUTRAL = ["the", "film", "plot", "cast", "story", "is", "and", "a", "very", "but", "score", "movie"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_model_dir(path: str, *, hidden: int = 32, layers: int = 2, intermediate: int = 64, seed: int = 0) -> str:
    """Save a random BertForSequenceClassification (2 labels) and a matching tokenizer under `path`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    os.makedirs(path, exist_ok=True)
    words = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(words), hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=2, intermediate_size=intermediate,
                        max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def sentences(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(text, label 'pos'/'neg', movie) triples: a label's words plus neutral filler; 4 per movie."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label, f"movie_{i // 4}"))
    return rows


def make_csv(path: str, n: int = 200, seed: int = 0, header=("review", "sentiment", "movie")) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(sentences(n, seed))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread (and do not fight other processes for cores); import it
    into a test module to apply it there."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
