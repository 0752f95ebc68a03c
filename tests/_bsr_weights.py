"""Random block-sparse weights for the bsr_linear tests (shared by the Triton and CPU test files)."""

from __future__ import annotations

import torch

from sparse_ops.sparse.formats import dense_to_bsr


def random_bsr_weight(out_features, in_features, block, density, dtype, device, generator, empty_rows=(1,)):
    """A dense weight whose blocks are non-zero with probability `density` (block rows in `empty_rows`
    all zero), and its BSR triple with NaN written into the padding of every stored block."""
    br, bc = block
    nbr, nbc = -(-out_features // br), -(-in_features // bc)
    keep = torch.rand(nbr, nbc, generator=generator) < density
    for r in empty_rows:
        if r < nbr:
            keep[r] = False
    element_keep = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:out_features, :in_features]
    weight = (torch.randn(out_features, in_features, generator=generator) * element_keep).to(dtype)
    crow, col, values = dense_to_bsr(weight, block)
    block_row = torch.repeat_interleave(torch.arange(nbr), (crow[1:] - crow[:-1]).long())
    rows = block_row[:, None] * br + torch.arange(br)  # (nnz, br) weight row of each block row
    cols = col.long()[:, None] * bc + torch.arange(bc)  # (nnz, bc)
    padding = (rows >= out_features)[:, :, None] | (cols >= in_features)[:, None, :]
    values = values.masked_fill(padding, float("nan"))
    return weight.to(device), crow.to(device), col.to(device), values.to(device)
