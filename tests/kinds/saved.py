"""What an op really keeps for backward, to test the cost model's saved-bytes formulas against."""

from __future__ import annotations

import torch


def saved_bytes(fn, params) -> int:
    """Bytes of the unique storages `fn()` saves for backward, parameters not counted."""
    skip = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and t.numel() > 1:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
