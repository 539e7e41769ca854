"""Extension loading, backend availability and per-call backend selection.

The compiled extension ``genie_tk._C`` is imported here and only here. Backends:

* ``tk``: ThunderKittens kernels from ``genie_tk._C`` (CUDA, sm_90a);
* ``torch``: memory-efficient pure PyTorch (chunked, recomputing in backward);
* ``reference``: the plain oracle in :mod:`genie_tk.reference`.

``backend=None`` reads ``GENIE_TK_BACKEND`` (default ``auto``). ``auto`` takes
``tk`` where the op's kernel is verified (none is yet: the kernels have never run
on a GPU) and the inputs are eligible, and otherwise falls back to ``torch`` with a
single :class:`BackendFallbackWarning` per reason (silently for CPU tensors on an
install without the extension, where ``torch`` is the only choice); naming a backend that cannot
run the call raises with the reason.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("tk", "torch", "reference")
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
class TkKernel:
    """A tk implementation of one public op.

    ``check(*tensors, **shape_args)`` returns why the kernel cannot take a call
    ("" if it can); ``run`` takes the op's validated arguments (see
    :mod:`genie_tk.ops`). ``verified`` is set in the commit that records the
    kernel passing its GPU tests: ``auto`` only picks verified kernels, an
    unverified one runs only when asked for by name.
    """

    check: Callable[..., str]
    run: Callable[..., torch.Tensor]
    verified: bool


# Filled by the kernel modules (tk_*.py) when the extension provides them.
TK_KERNELS: dict[str, TkKernel] = {}


def register_tk(op: str, kernel: TkKernel) -> None:
    """Make ``kernel`` the tk backend of ``op``."""
    TK_KERNELS[op] = kernel

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


def _tk_op_info(kernel: TkKernel) -> dict[str, object]:
    if kernel.verified:
        note = "verified on a GPU: auto picks it for eligible inputs"
    else:
        note = "registered unverified: it has never run on a GPU, auto never picks it, backend='tk' runs it"
    return {"verified": kernel.verified, "note": note}


def backends() -> dict[str, dict[str, object]]:
    """What each backend can do here: ``{name: {"available": bool, "reason": str, ...}}``.

    ``tk`` also lists the ``ops`` this build has kernels for, each with its
    ``verified`` flag and a ``note``, and a ``note`` naming the unverified ones.
    """
    tk_reason = _tk_unavailable_reason()
    info: dict[str, object] = {"available": not tk_reason, "reason": tk_reason}
    if HAS_EXTENSION:
        info["build"] = dict(_C.info())
    if TK_KERNELS:
        info["ops"] = {op: _tk_op_info(k) for op, k in sorted(TK_KERNELS.items())}
        unverified = [op for op, k in sorted(TK_KERNELS.items()) if not k.verified]
        if unverified:
            info["note"] = ("registered unverified (never run on a GPU; auto never picks them, backend='tk' "
                            "runs them): " + ", ".join(unverified))
    return {
        "tk": info,
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
        raise ValueError(f"{source}={name!r} is not a genie_tk backend; expected one of auto, tk, torch, reference")
    return name


def _tk_reason(op: str, auto: bool, *tensors: torch.Tensor | None, **shape_args) -> str:
    """Why the tk backend cannot take this call ("" if it can)."""
    reason = _tk_unavailable_reason()
    if reason:
        return reason
    kernel = TK_KERNELS.get(op)
    if kernel is None:
        return f"no tk kernel for {op} in this build"
    if auto and not kernel.verified:
        return f"the tk kernel for {op} has not been verified on a GPU yet (backend='tk' runs it)"
    for t in tensors:
        if t is not None and not t.is_cuda:
            return f"inputs are on {t.device}, the tk kernels need CUDA tensors"
    return kernel.check(*tensors, **shape_args)


def select(op: str, backend: str | None, *tensors: torch.Tensor | None, **shape_args) -> str:
    """Pick the backend for one call of ``op`` and record it."""
    name = _requested(backend)
    if name == "tk" or name == "auto":
        reason = _tk_reason(op, name == "auto", *tensors, **shape_args)
        if not reason:
            name = "tk"
        elif name == "tk":
            raise RuntimeError(f"genie_tk: backend='tk' cannot run {op}: {reason}")
        else:
            name = "torch"
            # A CPU-only install running CPU tensors is the expected case, not a fallback.
            expected = not HAS_EXTENSION and not any(t is not None and t.is_cuda for t in tensors)
            if not expected and (op, reason) not in _WARNED:
                _WARNED.add((op, reason))
                warnings.warn(
                    f"genie_tk.{op}: using the torch backend because {reason}",
                    BackendFallbackWarning,
                    stacklevel=3,
                )
    _LAST[op] = name
    return name
