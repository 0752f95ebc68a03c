"""Compile every Triton kernel of kernels/ for sm_80 and sm_90 without a GPU, and report registers,
spills and shared memory (scripts/check_triton.sh runs it under the installed Triton and under
Triton 3.6.0, the GPU image's).

    python scripts/check_triton.py [--quick] [--out DIR] [--jobs N]

What it compiles (triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))), with the
launchers' own constants:
  * bsr_linear tiled path: every configuration its autotuner keeps on each target (`_tiled_fits` at
    the largest token bucket, which keeps the most) for 16×16, 32×32 and 64×64 blocks, fp32 and bf16;
  * bsr_linear skinny path (≤ 16 tokens): every configuration it keeps for those blocks and dtypes,
    at 16 tokens (1 token too for multiply-add configurations), SPLIT 2 (SPLIT only changes the
    final store: SPLIT 1 is compiled for the first configuration of each block);
  * the split-K reduction, fused_prune_step (element, 32×32 block and 2:4 kernels for magnitude,
    MGPP, movement with Adam and soft movement, fp32 and bf16), the radix histogram (32- and 16-bit
    keys, levels 0 and 1, signed and absolute) and mgp_prior_grad (fp32, fp16, bf16).
--quick compiles one case per kernel. Registers and spills come from `ptxas -v` (the ptxas shipped
with Triton) on the generated PTX; shared memory from the compiled metadata.

Fails (exit 1) on any compile error, shared memory above 227 KB on sm_90 or 163 KB on sm_80, or
spills in a configuration the autotuner may keep. Writes <out>/triton_<version>.md and .json, <out> by
default benchmarks/results/triton_compile/<date>_check_triton/ (UTC date; see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; the launchers pass it

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sparse_ops.kernels import bsr_linear, fused_prune_step, kthvalue, mgp_prior_grad  # noqa: E402

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)
BLOCKS = (16, 32, 64)
TYPES = {"fp32": 4, "fp16": 2, "bf16": 2}


class Case:
    """One kernel specialisation: argument types, constexprs and launch options."""

    def __init__(self, kernel: str, fn, types: dict, constexprs: dict, label: str, num_warps=4, num_stages=3,
                 tunable=False, fp_fusion=True, archs=ARCHS):
        self.kernel, self.fn, self.types, self.constexprs, self.label = kernel, fn, types, constexprs, label
        self.num_warps, self.num_stages, self.tunable, self.fp_fusion = num_warps, num_stages, tunable, fp_fusion
        self.archs = archs

    def signature(self) -> dict:
        return {a: "constexpr" if a in self.constexprs else self.types[a] for a in self.fn.arg_names}


def _bsr_types(dt: str, extra: dict) -> dict:
    return {"x_ptr": f"*{dt}", "crow_ptr": "*i32", "col_ptr": "*i32", "val_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
            "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", **extra}


def bsr_cases() -> list[Case]:
    cases = []
    for dt in ("fp32", "bf16"):
        for b in BLOCKS:
            bp = max(16, triton.next_power_of_2(b))
            common = {"BR": b, "BC": b, "BC_P": bp, "HAS_BIAS": True,
                      "PRECISION": "ieee" if dt == "fp32" else "tf32", "UPCAST": False}
            for c in bsr_linear._tiled_configs():
                archs = tuple(a for a in ARCHS if bsr_linear._tiled_fits(c, 4096, bp, bp, TYPES[dt], a))
                if not archs:
                    continue
                ce = {**common, "BR_P": bp, **c.kwargs}
                types = _bsr_types(dt, {"y_ptr": f"*{dt}", "stride_ym": "i32", "num_block_rows": "i32",
                                        "m_bucket": "i32"})
                cases.append(Case("_bsr_linear_kernel", bsr_linear._bsr_linear_kernel, types, ce,
                                  f"{dt} {b}x{b} BLOCK_M={c.kwargs['BLOCK_M']} U={c.kwargs['U']} "
                                  f"w{c.num_warps} s{c.num_stages}", c.num_warps, c.num_stages, tunable=True,
                                  archs=archs))
            first = True
            for c in bsr_linear._skinny_configs():
                for mb in ((16,) if c.kwargs["USE_DOT"] else (16, 1)):
                    if not bsr_linear._skinny_fits(c, mb, b, bp):
                        continue
                    for split in ((1, 2) if first else (2,)):
                        ce = {**common, "MB": mb, "SPLIT": split, **c.kwargs}
                        types = _bsr_types(dt, {"out_ptr": f"*{dt}" if split == 1 else "*fp32", "stride_om": "i32",
                                                "stride_os": "i32"})
                        cases.append(Case("_bsr_linear_skinny_kernel", bsr_linear._bsr_linear_skinny_kernel, types,
                                          ce, f"{dt} {b}x{b} MB={mb} SPLIT={split} SUB_N={c.kwargs['SUB_N']} "
                                          f"U={c.kwargs['U']} dot={int(c.kwargs['USE_DOT'])} w{c.num_warps} "
                                          f"s{c.num_stages}", c.num_warps, c.num_stages, tunable=True))
                    first = False
    for split in (2, bsr_linear.MAX_SPLIT):
        cases.append(Case("_bsr_linear_reduce_kernel", bsr_linear._bsr_linear_reduce_kernel,
                          {"ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "numel": "i32", "N": "i32"},
                          {"SPLIT": split, "HAS_BIAS": True, "BLOCK": bsr_linear.REDUCE_BLOCK}, f"bf16 SPLIT={split}"))
    return cases


METHOD_FLAGS = {  # what the pruner passes per method (sparse_ops/pruning/*.py)
    "magnitude": dict(KEY_FROM_SCORES=False, STRICT=False, HAS_SCORES=False, UPDATE_SCORES=False, ADAM=False,
                      SIGMOID_L1=False, ADD_PRIOR=False, MASK_GRAD=True, MASK_WEIGHT=True, REUSE_MASK=False,
                      EMIT_HIST=False),
    "mgpp": dict(KEY_FROM_SCORES=False, STRICT=False, HAS_SCORES=False, UPDATE_SCORES=False, ADAM=False,
                 SIGMOID_L1=False, ADD_PRIOR=True, MASK_GRAD=True, MASK_WEIGHT=True, REUSE_MASK=False, EMIT_HIST=True),
    "movement": dict(KEY_FROM_SCORES=True, STRICT=False, HAS_SCORES=True, UPDATE_SCORES=True, ADAM=True,
                     SIGMOID_L1=False, ADD_PRIOR=False, MASK_GRAD=True, MASK_WEIGHT=False, REUSE_MASK=False,
                     EMIT_HIST=True),
    "soft_movement": dict(KEY_FROM_SCORES=True, STRICT=True, HAS_SCORES=True, UPDATE_SCORES=True, ADAM=True,
                          SIGMOID_L1=True, ADD_PRIOR=False, MASK_GRAD=True, MASK_WEIGHT=False, REUSE_MASK=True,
                          EMIT_HIST=False),
}


def prune_cases() -> list[Case]:
    fps = fused_prune_step
    scalars = ["prior_scale", "c1", "c2", "inv0", "inv1", "score_lr", "sigmoid_l1", "one_minus_beta1", "beta2",
               "one_minus_beta2", "neg_step_size", "bias2_sqrt", "eps"]
    cases = []
    for method, flags in METHOD_FLAGS.items():
        for dt in ("fp32", "bf16"):
            sdt = "fp32" if flags["HAS_SCORES"] else dt
            ptrs = {"w_ptr": f"*{dt}", "g_ptr": f"*{dt}", "s_ptr": f"*{sdt}", "m_ptr": "*i1", "hist_ptr": "*i64",
                    "ea_ptr": f"*{sdt}", "eas_ptr": f"*{sdt}"}
            floats = {s: "fp32" for s in scalars + ["threshold"]}
            key_bits = 32 if sdt == "fp32" else 16
            key_type = {"KEY_BITS": key_bits, "INF_BITS": kthvalue.INF_BITS[
                {"fp32": torch.float32, "bf16": torch.bfloat16}[sdt]]}
            strict = {"STRICT": flags["STRICT"]}
            rest = {k: v for k, v in flags.items() if k != "STRICT"}
            cases.append(Case("_fused_prune_step_kernel", fps._fused_prune_step_kernel,
                              {**ptrs, **floats, "n": "i64", "tie_cut": "i64", "index_offset": "i64"},
                              {**rest, **strict, **key_type, "SLOTS": kthvalue.SLOTS, "BLOCK": fps.ELEMENT_BLOCK},
                              f"{method} {dt} element", fp_fusion=False))
            cases.append(Case("_fused_prune_step_block_kernel", fps._fused_prune_step_block_kernel,
                              {**ptrs, **floats, **{k: "i64" for k in ("rows", "cols", "block_rows", "block_cols",
                                                                     "blocks_per_row", "tie_cut", "index_offset")}},
                              {**rest, **strict, "SLOTS": kthvalue.SLOTS, "TILE_R": 32, "TILE_C": 32},
                              f"{method} {dt} block 32x32", fp_fusion=False))
            cases.append(Case("_fused_prune_step_24_kernel", fps._fused_prune_step_24_kernel,
                              {**ptrs, **{s: "fp32" for s in scalars}, "groups": "i64"},
                              {**rest, **key_type, "SLOTS": kthvalue.SLOTS, "GROUPS": fps.GROUPS_24},
                              f"{method} {dt} 2:4", fp_fusion=False))
    for bits, inf in ((32, 0x7F800000), (16, 0x7F80)):
        for level in (0, 1):
            for absolute in (False, True):
                cases.append(Case("_radix_histogram_kernel", kthvalue._radix_histogram_kernel,
                                  {"ptr_table": "*i64", "sizes": "*i64", "chunk_tensor": "*i64", "chunk_start": "*i64",
                                   "state_ptr": "*i64", "hist_ptr": "*i64"},
                                  {"LEVEL": level, "KEY_BITS": bits, "INF_BITS": inf, "ABSOLUTE": absolute,
                                   "CHUNK": kthvalue.CHUNK, "BLOCK": kthvalue.BLOCK, "SLOTS": kthvalue.SLOTS},
                                  f"{bits}-bit level {level}{' abs' if absolute else ''}"))
    for dt in TYPES:
        cases.append(Case("_mgp_prior_grad_kernel", mgp_prior_grad._mgp_prior_grad_kernel,
                          {"w_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i64", "c1": "fp32", "c2": "fp32",
                           "inv0": "fp32", "inv1": "fp32", "scale": "fp32"},
                          {"BLOCK": mgp_prior_grad.BLOCK}, dt, fp_fusion=False))
    return cases


def all_cases(quick: bool) -> list[Case]:
    """Every case, in a fixed order (workers rebuild the list and pick by index); quick: the first per kernel."""
    cases = bsr_cases() + prune_cases()
    if quick:
        first: dict[str, Case] = {}
        for c in cases:
            first.setdefault(c.kernel, c)
        cases = list(first.values())
    return cases


def ptxas_path(arch: int) -> str:
    """The ptxas this Triton itself assembles `arch` with (3.9 ships a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except ImportError:  # older Triton: one bundled ptxas
        from triton import knobs
        return knobs.nvidia.ptxas.path


def compile_one(case: Case, arch: int) -> dict:
    row = {"kernel": case.kernel, "config": case.label, "arch": f"sm_{arch}", "triton": triton.__version__,
           "tunable": case.tunable}
    started = time.perf_counter()
    try:
        k = triton.compile(ASTSource(case.fn, case.signature(), case.constexprs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": case.num_warps, "num_stages": case.num_stages,
                                    "enable_fp_fusion": case.fp_fusion})
    except Exception as exc:  # noqa: BLE001 - any compile failure is a finding, reported with its message
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        return row
    row["shared"] = int(k.metadata.shared)
    ptx = k.asm["ptx"]
    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    info = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    row.update(registers=int(regs.group(1)) if regs else None,
               spill_stores=int(spills.group(1)) if spills else None,
               spill_loads=int(spills.group(2)) if spills else None,
               ok=out.returncode == 0, seconds=round(time.perf_counter() - started, 2))
    if out.returncode != 0:
        row["error"] = "ptxas: " + info.strip().splitlines()[-1][:300]
    return row


def failures(row: dict) -> list[str]:
    why = []
    if not row["ok"]:
        why.append(row.get("error", "compile error"))
        return why
    arch = int(row["arch"][3:])
    if row["shared"] > SMEM_LIMIT[arch]:
        why.append(f"shared memory {row['shared']} B > {SMEM_LIMIT[arch]} B")
    if row["tunable"] and (row["spill_stores"] or row["spill_loads"]):
        why.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads) in a tunable configuration")
    return why


def markdown(rows: list[dict]) -> str:
    lines = [f"Triton {triton.__version__} compile check (`python scripts/check_triton.py`), no GPU: "
             f"triton.compile for sm_90 and sm_80; registers and spills from ptxas -v, shared memory from the "
             "compiled metadata.", "",
             "| kernel | configuration | target | registers | spills (st/ld B) | shared KB | result |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bad = failures(r)
        spill = "" if not r["ok"] else f"{r['spill_stores']}/{r['spill_loads']}"
        shared = "" if not r["ok"] else f"{r['shared'] / 1024:.1f}"
        lines.append(f"| {r['kernel']} | {r['config']} | {r['arch']} | {r.get('registers', '')} | {spill} | "
                     f"{shared} | {'FAIL: ' + '; '.join(bad) if bad else 'ok'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one case per kernel")
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "triton_compile",
                                                 f"{today}_check_triton"))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    cases = all_cases(args.quick)
    work = [(i, c, arch) for i, c in enumerate(cases) for arch in c.archs]
    print(f"Triton {triton.__version__}: compiling {len(work)} kernel specialisations ({len(cases)} cases, "
          f"targets {['sm_%d' % a for a in ARCHS]}), {args.jobs} jobs", flush=True)
    started = time.perf_counter()
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_compile_indexed, [(i, arch, args.quick) for i, _, arch in work]))
    else:
        rows = [compile_one(c, arch) for _, c, arch in work]
    bad = [(r, failures(r)) for r in rows if failures(r)]
    os.makedirs(args.out, exist_ok=True)
    name = os.path.join(args.out, f"triton_{triton.__version__}" + ("_quick" if args.quick else ""))
    with open(name + ".json", "w") as f:
        json.dump({"triton": triton.__version__, "quick": args.quick, "rows": rows}, f, indent=1)
    with open(name + ".md", "w") as f:
        f.write(markdown(rows))
    worst = max((r for r in rows if r["ok"]), key=lambda r: r["registers"] or 0, default=None)
    print(f"{len(rows) - len(bad)} of {len(rows)} passed in {time.perf_counter() - started:.0f} s; "
          + (f"most registers: {worst['registers']} ({worst['kernel']} {worst['config']} {worst['arch']}); "
             if worst else "") + f"wrote {name}.md/.json")
    for r, why in bad:
        print(f"FAIL {r['kernel']} [{r['config']}] {r['arch']}: {'; '.join(why)}")
    return 1 if bad else 0


def _compile_indexed(item):
    """Worker entry: rebuild the case list (functions do not pickle) and compile case i."""
    i, arch, quick = item
    return compile_one(all_cases(quick)[i], arch)


if __name__ == "__main__":
    raise SystemExit(main())
