"""Peak memory of one call, beyond what was allocated before it.

* CUDA (``cuda-max-memory-allocated``): reset PyTorch's peak statistics, run once,
  ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call.
  Counts everything allocated through PyTorch's caching allocator (outputs,
  saved activations, gradients, scratch). Memory a library takes past that
  allocator (its own ``cudaMalloc``, cuBLAS workspaces created earlier) is not seen.
* CPU on Linux (``linux-vmhwm-reset``): return freed heap memory to the system
  (``gc.collect``, ``malloc_trim(0)``), read the resident set ``VmRSS``, reset the
  kernel's high-water mark (``"5" > /proc/self/clear_refs``), run once, read
  ``VmHWM``. The difference counts every page the call touched anew (PyTorch's
  CPU allocator has no cache, so freed tensors go back to the system); pages it
  reused from the heap's free lists are the only thing missed, and the trim
  beforehand empties those. It runs in-process, so a whole sweep stays cheap,
  and agrees with the fresh-process ``ru_maxrss`` delta of
  ``triangle_attention_cpu_memory.py``: on its committed case (TriangleAttention
  fwd+bwd, N=384) 2964 MiB against 2963 for the reference backend, and 375 to
  449 MiB over two runs against 413 for the torch backend.
* Anywhere else the figure is ``None`` with the reason.

The output of the call is alive when the peak is read, so it is counted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable
from pathlib import Path

import torch

MIB = 1 << 20
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def method(device: torch.device) -> tuple[str, str]:
    """``(method name, reason it cannot run here or "")``."""
    if device.type == "cuda":
        return "cuda-max-memory-allocated", ""
    try:
        _reset_hwm()
        _status_kib("VmHWM")
    except OSError as exc:
        return "linux-vmhwm-reset", f"cannot reset the resident-set high-water mark: {exc}"
    return "linux-vmhwm-reset", ""


def _status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} missing from {_STATUS}")


def _reset_hwm() -> None:
    _CLEAR_REFS.write_text("5")


def _trim_heap() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):  # glibc only
            libc.malloc_trim(0)


def peak_mib(call: Callable[[], object], device: torch.device) -> float:
    """Peak memory of ``call()`` in MiB beyond what was allocated before it
    (``method(device)`` must have reported no reason)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / MIB
    _trim_heap()
    base = _status_kib("VmRSS")
    _reset_hwm()
    out = call()
    peak_kib = _status_kib("VmHWM") - base
    del out
    return peak_kib * 1024 / MIB


def free_bytes(device: torch.device) -> int:
    """Memory that a new allocation can still take: free GPU memory, or the
    kernel's ``MemAvailable`` estimate on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
