"""Exact k-th smallest value: torch.ops.sparse_ops.kthvalue (radix select) vs torch.kthvalue.

Two questions (k = the 90%-sparsity threshold, k = round(0.9·n), 1-based):
  single  one flat tensor of 84.9M elements (as many as the BERT-base encoder's linear weights; the
          98K of the tiny set with --quick),
          per dtype: torch.kthvalue(x, k) (eager), torch.compile of it (if it compiles; compile time
          reported as compile_s), torch.ops.sparse_ops.kthvalue(x, k)
  multi   the BERT-base list of 72 matrices (the tiny set with --quick): torch.kthvalue(torch.cat(flattened
          list), k) (eager and compiled) vs torch.ops.sparse_ops.kthvalue_multi(list, k), which never
          concatenates
bytes_moved = one read of the input (n · itemsize), the minimum any selection needs; radix select
reads it once per 8-bit digit, torch.kthvalue (quickselect on CPU) several times, eager multi
also writes and reads the concatenated copy. check: the result is bit-identical to eager's.
"""

from __future__ import annotations

import traceback

import torch

import _common as C
import sparse_ops  # noqa: F401  (registers torch.ops.sparse_ops)
from sparse_ops.ops import cpu_backend

SPARSITY = 0.9


def variants_single(k: int):
    def eager(x):
        return torch.kthvalue(x, k).values

    return [("eager", "aten", eager), ("compile", "inductor", torch.compile(eager)),
            ("sparse_ops", None, lambda x: torch.ops.sparse_ops.kthvalue(x, k))]


def variants_multi(k: int):
    def eager(xs):
        return torch.kthvalue(torch.cat([x.flatten() for x in xs]), k).values

    return [("eager", "aten", eager), ("compile", "inductor", torch.compile(eager)),
            ("sparse_ops", None, lambda xs: torch.ops.sparse_ops.kthvalue_multi(xs, k))]


def bench(args, env, copy_gbps, set_name, inputs, numel, dtype, variants, method) -> list[dict]:
    """Time each variant on `inputs` (a tensor or a list); the first call is checked against eager's."""
    sparse_backend = "triton" if args.device == "cuda" else cpu_backend("radix_histogram")
    rows, expected = [], None
    for variant, backend, fn in variants:
        print(f"  {set_name} {str(dtype)[6:]} {method} {variant} ...", flush=True)
        timing, compile_s, check, note = None, None, "", ""
        try:
            torch._dynamo.reset()
            out = []
            first_s = C.timed_first_call(lambda: out.append(fn(inputs)), args.device)
            compile_s = first_s if variant == "compile" else None
            if expected is None:
                expected = out[0]
            else:
                bits = torch.int16 if dtype.itemsize == 2 else torch.int32
                same = torch.equal(out[0].view(bits), expected.view(bits))
                check = "bit-identical to eager" if same else f"DIFFERS: {float(out[0])} vs {float(expected)}"
            timing = C.time_fn(lambda: fn(inputs), args.device, warmup=args.warmup - 1, repeats=args.repeats)
        except Exception as exc:  # e.g. torch.compile cannot compile it: recorded, the others still run
            traceback.print_exc()
            note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append(C.make_row(env, bench="kthvalue", set_name=set_name, numel=numel, dtype=dtype, method=method,
                               variant=variant, backend=backend or sparse_backend, timing=timing,
                               bytes_moved=numel * dtype.itemsize, copy_gbps=copy_gbps, compile_s=compile_s,
                               check=check, note=note))
    return rows


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,float16,bfloat16", help="dtypes of the single-tensor question")
    p.add_argument("--multi-dtypes", default="float32", help="dtypes of the multi-tensor question ('' skips it)")
    args = C.resolve_args(p.parse_args())
    env = C.environment(args.device)
    copy_gbps = C.copy_bandwidth_gbps(args)
    print(f"device: {env['device']}; copy bandwidth {copy_gbps:.1f} GB/s; {args.repeats} repeats, {args.warmup} warmup")
    notes = C.cpu_notes(("radix_histogram",)) if args.device == "cpu" else []

    torch.manual_seed(0)
    set_name = "tiny" if args.quick else "bert-base"
    shapes = C.SETS[set_name]
    numel = sum(r * c for r, c in shapes)
    k = int(round(SPARSITY * numel))
    flat = torch.randn(numel, device=args.device)
    rows = []
    for name in filter(None, args.dtypes.split(",")):
        dtype = getattr(torch, name)
        rows += bench(args, env, copy_gbps, f"{numel / 1e6:.3g}M", flat.to(dtype), numel, dtype,
                      variants_single(k), "single")
    for name in filter(None, args.multi_dtypes.split(",")):
        dtype = getattr(torch, name)
        xs = [t.view(shape) for t, shape in zip(flat.to(dtype).split([r * c for r, c in shapes]), shapes)]
        rows += bench(args, env, copy_gbps, set_name, xs, numel, dtype, variants_multi(k), "multi")

    C.finish(rows, args, env, copy_gbps, notes, "kthvalue", f"kthvalue, k=0.9·n, {env['device']}", k=k)

if __name__ == "__main__":
    main()
