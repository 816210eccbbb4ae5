"""Count operations that force a device-to-host synchronisation, by intercepting aten calls.

On an NPU or GPU these block the host until the device catches up, and inside a captured graph they are not
replayed at all. Counting them on CPU tells whether a hot path would contain one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must read: scalar extraction, data-dependent output shapes.
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique_dim",
    "aten::_unique2",
    "aten::is_nonzero",
    "aten::equal",
    "aten::repeat_interleave",
}


class HostSyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name in ("aten::index", "aten::index_put", "aten::index_put_") and _has_bool_index(args):
            self.counts[f"{name} (boolean mask)"] += 1
        elif name in ("aten::_to_copy", "aten::copy_"):
            devices = {a.device.type for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
            target = (kwargs or {}).get("device")
            if target is not None and torch.device(target).type == "cpu" and devices - {"cpu"}:
                self.counts["device_to_host_copy"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def count_host_syncs(fn: Callable[[], object]) -> Counter[str]:
    with HostSyncCounter() as counter:
        fn()
    return counter.counts
