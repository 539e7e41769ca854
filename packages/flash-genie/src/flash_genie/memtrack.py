"""Peak tensor memory of a computation on the CPU, counted at the allocator's level.

PyTorch's CPU allocator keeps no statistics (``torch.cuda.max_memory_allocated`` has no CPU
counterpart), and the process's resident set also counts what the C library keeps after a
``free`` and pages first touched by code. :class:`TensorMemoryTracker` counts tensor
storages instead: a ``TorchDispatchMode`` sees every ATen call (forward, autograd's backward
and custom autograd functions alike), adds the bytes of each output storage it has not
seen before (views and in-place results share their input's storage and add nothing) and
subtracts them when the storage is freed (a ``weakref.finalize`` on the storage). Storages
that existed before the mode was entered (weights, inputs) are not counted.

What it does not see: scratch memory a kernel allocates and frees inside one call (BLAS
packing buffers, oneDNN workspaces), and allocator overhead. On the CPU those are small
next to activations; ``benchmarks/model_memory.py`` reports the fresh-process resident-set
growth beside this count.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryTracker"]


class TensorMemoryTracker(TorchDispatchMode):
    """``with TensorMemoryTracker() as t: ...``; then ``t.peak`` (bytes), ``t.live``.

    ``mark()`` returns the current live bytes (e.g. after a forward, to see what is kept
    for backward). Single-threaded use only.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def mark(self) -> int:
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = _key(t)
                if key in self._sizes or key in inputs or storage.nbytes() == 0:
                    continue
                size = storage.nbytes()
                self._sizes[key] = size
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
