"""Extension loading, backend availability and per-call backend selection.

The compiled extension ``genie_tk._C`` is imported here and only here. Backends:

* ``tk``: ThunderKittens kernels from ``genie_tk._C`` (CUDA, sm_90a);
* ``triton``: Triton kernels (:mod:`genie_tk.triton`; CUDA from sm_80, or CPU tensors
  under Triton's interpreter, ``TRITON_INTERPRET=1``);
* ``torch``: memory-efficient pure PyTorch (chunked, recomputing in backward);
* ``reference``: the plain oracle in :mod:`genie_tk.reference`.

``backend=None`` reads ``GENIE_TK_BACKEND`` (default ``auto``). ``auto`` takes
``tk``, then ``triton``, where the inputs are eligible and the kernel has been verified
on a GPU, and otherwise falls back to ``torch`` with a single
:class:`BackendFallbackWarning` per reason (silently for CPU tensors on an install
without the extension, where ``torch`` is the only choice); naming a backend that cannot
run the call raises with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("tk", "triton", "torch", "reference")
KERNEL_BACKENDS = ("tk", "triton")  # the order in which ``auto`` tries them
ENV_VAR = "GENIE_TK_BACKEND"

try:  # the extension is optional: a CPU-only wheel has none
    _C = importlib.import_module("genie_tk._C")
    HAS_EXTENSION = True
    _IMPORT_ERROR = ""
except ModuleNotFoundError:  # pragma: no cover - depends on the build
    _C = None
    HAS_EXTENSION = False
    _IMPORT_ERROR = "this install has no CUDA kernels (built without nvcc/ThunderKittens or GENIE_TK_CUDA=OFF)"
except ImportError as exc:  # pragma: no cover - a broken build
    _C = None
    HAS_EXTENSION = False
    _IMPORT_ERROR = f"genie_tk._C failed to import: {exc}"



@dataclass(frozen=True)
class Kernel:
    """A kernel implementation (tk or triton) of one public op.

    ``check(*tensors, **shape_args)`` returns why the kernel cannot take a call
    ("" if it can); ``run`` takes the op's validated arguments (see
    :mod:`genie_tk.ops`). ``verified`` is set in the commit that records the
    kernel passing its GPU tests: ``auto`` only picks verified kernels, an
    unverified one runs only when asked for by name.
    """

    check: Callable[..., str]
    run: Callable[..., torch.Tensor]
    verified: bool


# Filled by the kernel modules: tk_*.py when the extension provides them, genie_tk.triton
# when triton is installed.
TK_KERNELS: dict[str, Kernel] = {}
TRITON_KERNELS: dict[str, Kernel] = {}
KERNELS = {"tk": TK_KERNELS, "triton": TRITON_KERNELS}


def register_tk(op: str, kernel: Kernel) -> None:
    """Make ``kernel`` the tk backend of ``op``."""
    TK_KERNELS[op] = kernel


def register_triton(op: str, kernel: Kernel) -> None:
    """Make ``kernel`` the triton backend of ``op``."""
    TRITON_KERNELS[op] = kernel


def kernel(backend: str, op: str) -> Kernel:
    """The registered ``backend`` (``tk`` or ``triton``) kernel of ``op``."""
    return KERNELS[backend][op]

_WARNED: set[tuple[str, str]] = set()
_LAST: dict[str, str] = {}


class BackendFallbackWarning(UserWarning):
    """The fast backend could not take a call and a slower exact one ran instead."""


def _tk_unavailable_reason() -> str:
    """Why the tk backend cannot run at all in this process ("" if it can)."""
    if not HAS_EXTENSION:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    driver = _C.driver_status()
    if driver:
        return driver
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"the kernels are built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    return ""


HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton's interpreter runs the triton kernels (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_unavailable_reason() -> str:
    """Why the triton backend cannot run at all in this process ("" if it can)."""
    if not HAS_TRITON:
        return "triton is not installed (pip install 'genie-tk[triton]')"
    if triton_interpreted():
        return ""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (TRITON_INTERPRET=1 runs the triton kernels on CPU tensors)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the triton kernels need an Ampere (sm_80) or newer GPU; this GPU is sm_{major}{minor}"
    return ""


def _ops_info(kernels: dict[str, Kernel]) -> dict[str, dict[str, bool]]:
    return {op: {"verified": k.verified} for op, k in sorted(kernels.items())}


def backends() -> dict[str, dict[str, object]]:
    """What each backend can do here: ``{name: {"available": bool, "reason": str, ...}}``."""
    tk_reason = _tk_unavailable_reason()
    info: dict[str, object] = {"available": not tk_reason, "reason": tk_reason}
    if HAS_EXTENSION:
        info["build"] = dict(_C.info())
        info["ops"] = _ops_info(TK_KERNELS)
    triton_reason = _triton_unavailable_reason()
    triton_info: dict[str, object] = {"available": not triton_reason, "reason": triton_reason}
    if HAS_TRITON:
        triton_info["interpreter"] = triton_interpreted()
        triton_info["ops"] = _ops_info(TRITON_KERNELS)
    return {
        "tk": info,
        "triton": triton_info,
        "torch": {"available": True, "reason": ""},
        "reference": {"available": True, "reason": ""},
    }


def last_backend(op: str) -> str | None:
    """The backend that ran the latest call of ``op`` in this process (``None`` before any)."""
    return _LAST.get(op)


def _requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in ("auto", *BACKENDS):
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={name!r} is not a genie_tk backend; expected one of auto, {', '.join(BACKENDS)}")
    return name


def _kernel_reason(backend: str, op: str, auto: bool, *tensors: torch.Tensor | None, **shape_args) -> str:
    """Why the ``backend`` (tk or triton) kernel cannot take this call ("" if it can)."""
    reason = _tk_unavailable_reason() if backend == "tk" else _triton_unavailable_reason()
    if reason:
        return reason
    registered = KERNELS[backend].get(op)
    if registered is None:
        return f"no {backend} kernel for {op} in this build"
    if auto and not registered.verified:
        return f"the {backend} kernel for {op} has not been verified on a GPU yet (backend='{backend}' runs it)"
    interpreted = backend == "triton" and triton_interpreted()
    for t in tensors:
        if t is None:
            continue
        if interpreted and t.is_cuda:
            return "TRITON_INTERPRET=1 runs the triton kernels on CPU tensors only"
        if not interpreted and not t.is_cuda:
            hint = " (or TRITON_INTERPRET=1)" if backend == "triton" else ""
            return f"inputs are on {t.device}, the {backend} kernels need CUDA tensors{hint}"
    return registered.check(*tensors, **shape_args)


def select(op: str, backend: str | None, *tensors: torch.Tensor | None, **shape_args) -> str:
    """Pick the backend for one call of ``op`` and record it."""
    name = _requested(backend)
    if name in KERNEL_BACKENDS:
        reason = _kernel_reason(name, op, False, *tensors, **shape_args)
        if reason:
            raise RuntimeError(f"genie_tk: backend='{name}' cannot run {op}: {reason}")
    elif name == "auto":
        reasons = []
        for candidate in KERNEL_BACKENDS:
            reason = _kernel_reason(candidate, op, True, *tensors, **shape_args)
            if not reason:
                name = candidate
                break
            reasons.append(f"{candidate}: {reason}")
        else:
            name = "torch"
            # A CPU-only install running CPU tensors is the expected case, not a fallback.
            expected = not HAS_EXTENSION and not any(t is not None and t.is_cuda for t in tensors)
            reason = "; ".join(reasons)
            if not expected and (op, reason) not in _WARNED:
                _WARNED.add((op, reason))
                warnings.warn(
                    f"genie_tk.{op}: using the torch backend because {reason}",
                    BackendFallbackWarning,
                    stacklevel=3,
                )
    _LAST[op] = name
    return name
