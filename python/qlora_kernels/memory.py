"""Memory accounting for training: what autograd keeps alive for backward."""

from __future__ import annotations

import torch


def saved_for_backward_bytes(fn) -> tuple[int, object]:
    """Run fn() and count the bytes of the unique storages autograd saves for backward while it runs.

    Returns (nbytes, fn's result). Tensors that share a storage (views, or x saved by two ops) count once,
    so this is the memory that backward keeps alive, the figure to compare between implementations.
    """
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out
