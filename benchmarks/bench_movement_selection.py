"""Which weights does movement pruning remove first? (the cause of movement's collapse at short budgets)

Fine-tunes all-MiniLM-L6-v2 dense on Rotten Tomatoes for STEPS steps (AdamW at LR, linear decay over
1000 steps, clipping 1.0, seed 0) while a movement Pruner's scores learn (Adam at 1e-2 on ∂L/∂W'⊙W;
start_step beyond the run, so nothing is pruned). Then, on the same weights, it masks SPARSITY of
every encoder linear (per matrix) three ways and evaluates the dev split:
  movement   the lowest scores (what movement's TopK prunes at that sparsity)
  magnitude  the smallest |w|
  random     uniformly at random
and prints the dev loss and accuracy of each, how many of each matrix's 0.1% largest |w| the mask
removed, and, for movement at 2%, the largest fraction of one row / one column it removed per matrix.

    python benchmarks/bench_movement_selection.py STEPS LR [adam|sgd]

Prints as it goes and writes steps<STEPS>_lr<LR>.json to benchmarks/results/cpu/<date>_bench_movement_selection/.
"""

import json
import math
import os
import sys

import _common as C
import torch

from sparse_ops import Pruner, PruningConfig
from sparse_ops.app import data, finetune

SPARSITIES = (0.02, 0.05, 0.1, 0.2, 0.4)


def main() -> None:
    steps, lr = int(sys.argv[1]), float(sys.argv[2])
    optimizer_name = sys.argv[3] if len(sys.argv) > 3 else "adam"
    torch.manual_seed(0)
    splits = data.rotten_tomatoes(0)
    batches = finetune.tokenize_splits(splits, data.load_tokenizer(None), 64, None, 0)
    model = data.load_model(None, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / 1000))
    config = PruningConfig(method="movement", sparsity=0.9, start_step=10**6, end_step=10**6 + 1,
                           score_optimizer=optimizer_name)
    pruner = Pruner(model, config, optimizer)
    model.train()
    for batch in batches["train"].train_batches(32, steps, 0, True):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        pruner.after_backward()
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()
        schedule.step()
    pruner.finalize()
    weights = {t.name: t.weight.detach().clone() for t in pruner.targets}
    scores = {t.name: t.scores.clone() for t in pruner.targets}

    @torch.no_grad()
    def dev_eval():
        model.eval()
        total, n, correct = 0.0, 0, 0
        for batch in batches["dev"].eval_batches(128):
            out = model(**batch)
            total += float(out.loss) * len(batch["labels"])
            n += len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        return total / n, correct / n

    results = {"dense": dev_eval()}
    print(f"dense {steps} steps: dev loss {results['dense'][0]:.4f} acc {results['dense'][1]:.4f}", flush=True)
    g = torch.Generator().manual_seed(1)
    for sparsity in SPARSITIES:
        for how in ("movement", "magnitude", "random"):
            big_removed = 0
            with torch.no_grad():
                for t in pruner.targets:
                    w = weights[t.name]
                    key = {"movement": scores[t.name], "magnitude": w.abs(),
                           "random": torch.rand(w.shape, generator=g)}[how]
                    k = int(sparsity * w.numel())
                    thr = key.flatten().kthvalue(k).values if k else -math.inf
                    t.weight.copy_(torch.where(key > thr, w, 0.0))
                    big = w.abs() >= w.abs().flatten().kthvalue(int(0.999 * w.numel())).values
                    big_removed += int((big & (t.weight == 0)).sum())
            loss, acc = dev_eval()
            results[f"{how}@{sparsity}"] = (loss, acc)
            print(f"{how:9s} {sparsity:4.0%}: dev loss {loss:.4f} acc {acc:.4f}; top-0.1% |w| removed {big_removed}",
                  flush=True)
    concentration = {}
    for t in pruner.targets:
        s = scores[t.name]
        pruned = s <= s.flatten().kthvalue(int(0.02 * s.numel())).values
        concentration[t.name] = (float(pruned.float().mean(1).max()), float(pruned.float().mean(0).max()))
        print(f"{t.name}: max row pruned {concentration[t.name][0]:.2f}, max col pruned {concentration[t.name][1]:.2f}")
    out = C.default_out("cpu", "bench_movement_selection")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"steps{steps}_lr{lr:g}.json"), "w") as f:
        json.dump({"meta": C.environment("cpu"), "results": results, "row_col_concentration_at_2pct": concentration},
                  f, indent=1)


if __name__ == "__main__":
    main()
