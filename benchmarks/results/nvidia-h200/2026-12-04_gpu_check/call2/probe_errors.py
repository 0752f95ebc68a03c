"""Which bad call to a sparse_ops op crashes the process? Runs cases from argv[1] on, one by one."""
import sys, faulthandler
faulthandler.enable()
import torch, sparse_ops  # noqa
torch.manual_seed(0)
dense = torch.randn(10, 12) * (torch.rand(10, 12) < 0.5)
csr = dense.to_sparse_csr()
crow, col, values = (t.cuda() for t in (csr.crow_indices().int(), csr.col_indices().int(), csr.values()))
x = torch.randn(3, 12, device="cuda")
op = torch.ops.sparse_ops.csr_linear_cuda
CASES = [
    ("torch's own C++ error", lambda: torch.ones(2, device="cuda") + torch.ones(3, device="cuda")),
    ("C++ CPU kernel error", lambda: torch.ops.sparse_ops.csr_linear_cpu(x.cpu().double(), crow.cpu(), col.cpu(), values.cpu(), None, 10)),
    ("good call", lambda: op(x, crow, col, values, None, 10)),
    ("x on cpu", lambda: op(x.cpu(), crow, col, values, None, 10)),
    ("x double", lambda: op(x.double(), crow, col, values.double(), None, 10)),
    ("x 3-D", lambda: op(x[None], crow, col, values, None, 10)),
    ("x not contiguous", lambda: op(torch.randn(12, 3, device="cuda").T, crow, col, values, None, 10)),
    ("crow long", lambda: op(x, crow.long(), col, values, None, 10)),
    ("crow size", lambda: op(x, crow, col, values, None, 11)),
    ("col on cpu", lambda: op(x, crow, col.cpu(), values, None, 10)),
    ("values half", lambda: op(x, crow, col, values.half(), None, 10)),
    ("values short", lambda: op(x, crow, col, values[1:], None, 10)),
    ("bias size", lambda: op(x, crow, col, values, torch.zeros(9, device="cuda"), 10)),
]
for i in range(int(sys.argv[1]), len(CASES)):
    name, call = CASES[i]
    print(f"CASE {i} {name}: ", end="", flush=True)
    try:
        call(); torch.cuda.synchronize(); print("returned", flush=True)
    except Exception as e:
        print(f"raised {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
print("DONE", flush=True)
