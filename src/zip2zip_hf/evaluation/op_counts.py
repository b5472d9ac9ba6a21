"""What a piece of eager PyTorch code costs the launch queue: kernel-like ops and host syncs, counted
at the dispatcher, on any device.

A decoding step of a small model on a GPU is launch-bound: its time is roughly its number of kernel
launches times the cost of one, and every host sync drains the queue. Both are properties of the
code, not of the machine, so they can be counted on a CPU:

    with count_ops() as counts:
        model(input_ids=ids, cache=cache)
    counts.kernels, counts.host_syncs, counts.syncs_by_op

Views and other metadata-only ops are not counted as kernels. A host sync is an op whose result the
host must wait for (``.item()``, ``int(t)``, ``if t:``, ``nonzero``, ``equal``, ...), a tensor read
back to Python (``.tolist()``), or a tensor made from Python data (``torch.tensor([...])``: a
host-to-device copy on an accelerator).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode


__all__ = ["OpCounts", "count_ops"]

aten = torch.ops.aten
# Ops whose output the host waits for: a value read back, or a shape that depends on the data.
_SYNCING = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.is_nonzero,
    aten.equal,
    aten.allclose,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
    aten.unique_dim,
}
# Metadata-only ops that launch nothing (views report it themselves, `OpOverload.is_view`).
_FREE = {
    aten.detach,
    aten.lift_fresh,
    aten._unsafe_view,
    aten.scalar_tensor,  # a Python number made a 0-d host tensor
    aten.empty,
    aten.empty_strided,
    aten.empty_like,
    aten.set_,
}


@dataclass
class OpCounts:
    """Counts of one `count_ops` block."""

    kernels: int = 0
    host_syncs: int = 0
    kernels_by_op: Counter = field(default_factory=Counter)
    syncs_by_op: Counter = field(default_factory=Counter)

    def _sync(self, name: str) -> None:
        self.host_syncs += 1
        self.syncs_by_op[name] += 1


class _Counting(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet is aten.lift_fresh and args[0].dim() > 0:  # 0-d: a scalar fill, no copy
            self.counts._sync("torch.tensor(data)")
        elif packet in _SYNCING:
            self.counts._sync(str(packet))
        if not func.is_view and packet not in _FREE:
            self.counts.kernels += 1
            self.counts.kernels_by_op[str(packet)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounts]:
    """Count the kernel-like ops and host syncs of the eager code run inside (see module docstring)."""
    counts = OpCounts()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):  # reads the data directly, past the dispatcher
        counts._sync("Tensor.tolist")
        return tolist(tensor)

    torch.Tensor.tolist = counted_tolist
    try:
        with _Counting(counts):
            yield counts
    finally:
        torch.Tensor.tolist = tolist
