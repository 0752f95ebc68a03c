"""Sibling SparseLinear layers that read one input (Q, K and V of an attention block), run as one op.

    group = StackedLinears([attn.query, attn.key, attn.value])   # export does this for you
    q, k, v = attn.query(x), attn.key(x), attn.value(x)           # one kernel call, x packed once

On CPU (the direct-kernel conditions of SparseLinear: no autograd, not compiling, no forced backend),
the first member called with x computes x @ [W_q; W_k; W_v]ᵀ + [b_q; b_k; b_v] with one csr/bsr kernel
call and keeps the result with x; each member then returns its own columns of it, a view (strided:
no copy). The members keep their modules, names and buffers, so the module tree, the state_dict and
save/load are exactly those of unstacked layers; the stacked weight is derived from the members'
buffers and rebuilt whenever one of them is written to, replaced, moved or reloaded.

Sharing is checked, never assumed: the result is reused only for the very tensor it was computed from,
unmodified since (same object, same _version), once per member. When a member of an open round is
called with another input (cross-attention: keys and values read the encoder's states), the group
stops stacking for good and every member computes on its own: the outputs are always each member's
own F.linear. Rounds are per thread. Under torch.inference_mode, whose tensors keep no version
counter, an input written in place between two members' calls is not noticed (attention modules
never do that; see sparse_ops.sparse.linear.tensor_version).
"""

from __future__ import annotations

import threading

import torch

from .linear import SparseLinear, call_fast, tensor_version

_BUFFERS = ("crow_indices", "col_indices", "values", "bias")  # a member's, in _members_state


class StackedLinears:
    """Members: SparseLinear layers with the same in_features, dtype, device and compressed layout
    (`compressed_as`: csr for csr/2:4, or bsr with one block size). Each member joins the group
    (SparseLinear.join_stack(group, index); its `stack` then names the group)."""

    def __init__(self, members):
        members = list(members)
        if len(members) < 2 or not all(isinstance(m, SparseLinear) for m in members):
            raise TypeError("members must be two or more SparseLinear layers, got "
                            f"{[type(m).__name__ for m in members]}")
        if len({id(m) for m in members}) != len(members):
            raise ValueError("members must be distinct layers (one module listed twice)")
        reason = unstackable(members)
        if reason is not None:
            raise ValueError(f"members cannot be stacked: {reason}")
        self.members = members
        self.offsets = [0]
        for m in members:
            self.offsets.append(self.offsets[-1] + m.out_features)
        self.shared = True  # False once a member of an open round was called with another input
        self._local = threading.local()
        self._fast, self._state = None, None
        for index, m in enumerate(members):
            m.join_stack(self, index)

    # pickling / deepcopy: what is derived is rebuilt, the per-thread rounds are not copied
    def __getstate__(self):
        return {**self.__dict__, "_local": None, "_fast": None, "_state": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _members_state(self) -> tuple:
        """(every member's four buffers, their versions): what the stacked weight was built from."""
        tensors = tuple(m._buffers[name] for m in self.members for name in _BUFFERS)
        return tensors, tuple(tensor_version(t) for t in tensors)

    def _members_unchanged(self) -> bool:
        """The members' buffers are the very tensors stacked last, none written to since (checked on
        every round, so by identity and version reads only)."""
        if self._state is None:
            return False
        tensors, versions = self._state
        i = 0
        for m in self.members:
            bufs = m._buffers
            for name in _BUFFERS:
                t = bufs[name]
                if t is not tensors[i] or (versions[i] is not None and t._version != versions[i]):
                    return False
                i += 1
        return True

    def prepare(self) -> StackedLinears:
        """Build the stacked weight now rather than on the first call; returns the group."""
        self._stacked_kernel()
        return self

    def _stacked_kernel(self):
        """(kernel, crow, col, values, bias) of the stacked weight, rebuilt when a member's buffers
        changed; None where the members no longer have a CPU kernel call to stack."""
        if self._members_unchanged():
            return self._fast
        state = self._members_state()
        self._fast = self._build()
        self._state = state  # after _fast: a thread that sees this state sees the weight built for it
        return self._fast

    def _build(self):
        # a sibling written to since its last call is validated first, as its own call would be
        if not all(m.cpu_kernel() is not None for m in self.members):
            return None
        first = self.members[0]
        weight = torch.cat([m.dense_weight() for m in self.members])
        biases = [m.bias for m in self.members]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features, dtype=first.dtype) if b is None else b for m, b in zip(self.members, biases)])
        return SparseLinear.from_weight(weight, bias, first.compressed_as, first.block_size or (32, 32)).cpu_kernel()

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s output for x from the stacked product, or None: the member computes alone."""
        if not self.shared:
            return None
        local = self._local
        pending = getattr(local, "pending", None)
        if pending is not None:
            source, version, y, served = pending
            if source is x and version == tensor_version(x) and index not in served:
                served.add(index)
                if len(served) == len(self.members):
                    local.pending = None
                return self._columns(y, index)
            local.pending = None
            if index not in served:  # a member of the open round reads another input: no sharing here
                self.shared = False
                return None
            # else: a new round began before the last one was complete (e.g. a member left unused)
        fast = self._stacked_kernel()
        if fast is None or x.dtype != fast[3].dtype:
            return None
        y = call_fast(fast, x, self.offsets[-1])
        local.pending = (x, tensor_version(x), y, {index})
        return self._columns(y, index)

    def _columns(self, y: torch.Tensor, index: int) -> torch.Tensor:
        return y[..., self.offsets[index]:self.offsets[index + 1]]


def unstackable(members) -> str | None:
    """Why these SparseLinear layers cannot form a StackedLinears group, or None when they can."""
    first = members[0]
    for m in members:
        if m.compressed_as is None or m.activation != "none":
            return f"each must hold a compressed format and no activation, got {m.format!r} with {m.activation!r}"
        if (m.in_features, m.dtype, m.device) != (first.in_features, first.dtype, first.device):
            return ("they must share in_features, dtype and device, got "
                    f"{[(x.in_features, str(x.dtype), str(x.device)) for x in members]}")
        if m.compressed_as != first.compressed_as or m.block_size != first.block_size:
            return f"they must share one compressed format, got {[(x.format, x.block_size) for x in members]}"
        if m.stack is not None:
            return "one of them already belongs to a StackedLinears group"
    return None
