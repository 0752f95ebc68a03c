"""Compressed weight formats for the sparse linear ops: dense → CSR / BSR, and index validation.

Both formats compress the rows of W (out_features × in_features), so a row (or block row) of the
format is one output feature (or one group of them):

  CSR  crow_indices int32 (out+1,), col_indices int32 (nnz,), values (nnz,)
  BSR  crow_indices int32 (ceil(out/br)+1,), col_indices int32 (nnz_blocks,) block columns,
       values (nnz_blocks, br, bc); W is zero-padded to whole blocks, and a block is stored when any of
       its entries is non-zero. The kernels never read x past in_features nor write past out_features,
       so what the padding holds does not matter; `dense_to_bsr` stores zeros there.

Indices are int32: half the bytes of int64, and the kernels stream them with the values. Column
indices are sorted within a row. `check_compressed` validates indices once (at construction and
load); the ops themselves only check metadata, in O(1).

The names of the SparseLinear formats, and what each needs, live here too, so that the layers
(sparse_ops.sparse.linear) and the measured choice among them (sparse_ops.sparse.choice) share them.
"""

from __future__ import annotations

import torch

from ..ops._checks import check_compressed_counts

INDEX_DTYPE = torch.int32
FORMATS = ("bsr", "csr", "2:4", "dense")  # the formats of SparseLinear, one layer class each
AUTO_FORMATS = ("bsr", "csr", "dense")  # what format="auto" times everywhere; choice.auto_formats adds 2:4 on CUDA
ROW_COMPRESSED = ("csr", "2:4")  # stored as CSR (2:4 also as torch's semi-structured tensor on CUDA)
LAYER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what a SparseLinear holds
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def check_format(format, allowed=FORMATS) -> str:
    """format itself when it is one of `allowed`; ValueError naming them otherwise."""
    if format not in allowed:
        raise ValueError(f"format must be one of {list(allowed)}, got {format!r}")
    return format


def check_positive_int(name: str, value) -> int:
    """value itself when it is a positive int (not a bool); ValueError naming `name` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def semi_structured_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's semi-structured 2:4 path (cuSPARSELt / CUTLASS) cannot serve a layer on this device
    and dtype, or None when it can: CUDA, compute capability 8.0 or newer, fp16 or bf16."""
    if device.type != "cuda":
        return f"device {device.type} (the semi-structured kernels are CUDA only)"
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return f"dtype {dtype} (the semi-structured kernels take float16 or bfloat16)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(device)} (needs 8.0+)"
    return None


def _crow_from_counts(counts: torch.Tensor) -> torch.Tensor:
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    if crow[-1].item() > torch.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"the weight has {crow[-1].item()} stored entries; int32 indices hold at most 2**31-1")
    return crow.to(INDEX_DTYPE)


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")


def check_block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
        raise ValueError(f"block_size must be a positive int or a pair of positive ints, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def dense_to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow_indices, col_indices, values) of the non-zero entries of a 2-D weight, values in its dtype."""
    _check_weight(weight)
    nz = weight != 0
    crow = _crow_from_counts(nz.sum(1))
    rows, cols = nz.nonzero(as_tuple=True)  # row-major order: sorted columns within each row
    return crow, cols.to(INDEX_DTYPE), weight[rows, cols].contiguous()


def dense_to_bsr(weight: torch.Tensor, block_size=(32, 32)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow_indices, col_indices, values) of the blocks of a 2-D weight that hold a non-zero entry;
    values has shape (nnz_blocks, br, bc) in the weight's dtype, zero where the padding lies."""
    _check_weight(weight)
    br, bc = check_block_size(block_size)
    rows, cols = weight.shape
    nbr, nbc = -(-rows // br), -(-cols // bc)
    padded = weight.new_zeros(nbr * br, nbc * bc)
    padded[:rows, :cols] = weight
    blocks = padded.view(nbr, br, nbc, bc).transpose(1, 2)  # (nbr, nbc, br, bc)
    stored = (blocks != 0).flatten(2).any(2)
    crow = _crow_from_counts(stored.sum(1))
    block_rows, block_cols = stored.nonzero(as_tuple=True)
    return crow, block_cols.to(INDEX_DTYPE), blocks[block_rows, block_cols].contiguous()


def check_compressed(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, num_rows: int, num_cols: int,
                     name: str = "weight") -> None:
    """Full validation of a CSR/BSR triple with num_rows rows and num_cols columns (blocks, for BSR):
    int32 indices, crow starting at 0, non-decreasing, ending at nnz, columns in range and strictly
    increasing within each row. O(nnz); raise ValueError naming what is wrong."""
    for arg, t in (("crow_indices", crow), ("col_indices", col)):
        if not isinstance(t, torch.Tensor) or t.dtype != INDEX_DTYPE or t.dim() != 1:
            raise ValueError(f"{name}: {arg} must be a 1-D int32 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    check_compressed_counts(crow, col, values, num_rows, context=f"{name}: ")
    nnz = values.shape[0]
    crow64, col64 = crow.long(), col.long()
    if crow64[0].item() != 0 or crow64[-1].item() != nnz:
        raise ValueError(f"{name}: crow_indices must start at 0 and end at nnz={nnz}, "
                         f"got {crow64[0].item()} … {crow64[-1].item()}")
    counts = crow64[1:] - crow64[:-1]
    if (counts < 0).any():
        raise ValueError(f"{name}: crow_indices must be non-decreasing")
    if nnz > 0:
        if col64.min().item() < 0 or col64.max().item() >= num_cols:
            raise ValueError(f"{name}: col_indices must lie in [0, {num_cols}), got "
                             f"[{col64.min().item()}, {col64.max().item()}]")
        row_of = torch.repeat_interleave(torch.arange(num_rows, device=col.device), counts)
        same_row = row_of[1:] == row_of[:-1]
        if (same_row & (col64[1:] <= col64[:-1])).any():
            raise ValueError(f"{name}: col_indices must be strictly increasing within each row")


def check_two_four(crow: torch.Tensor, col: torch.Tensor, num_cols: int, name: str = "weight") -> None:
    """A CSR weight is 2:4 when every group of 4 consecutive columns (4g … 4g+3) of every row holds at
    most 2 stored entries, and num_cols is a multiple of 4. ValueError naming the first offending group."""
    if num_cols % 4:
        raise ValueError(f"{name}: a 2:4 weight needs in_features divisible by 4, got {num_cols}")
    groups = num_cols // 4
    rows = crow.numel() - 1
    counts = crow.long()[1:] - crow.long()[:-1]
    row_of = torch.repeat_interleave(torch.arange(rows, device=col.device), counts)
    per_group = torch.bincount(row_of * groups + col.long() // 4, minlength=rows * groups)
    bad = (per_group > 2).nonzero()
    if bad.numel():
        first = int(bad[0])
        r, g = divmod(first, groups)
        raise ValueError(f"{name} is not 2:4: row {r}, columns {4 * g}…{4 * g + 3} hold {int(per_group[first])} "
                         "non-zeros (at most 2 of every 4 consecutive entries along in_features)")
