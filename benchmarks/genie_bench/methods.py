"""The methods under test, discovered from what imports here.

* genie-tk's backends (``tk``, ``triton``, ``torch``, ``reference``), as ``genie_tk.backends()``
  reports them: an unavailable one is recorded with its reason;
* the peers: cuEquivariance (``cuequivariance_torch.triangle_attention`` and
  ``triangle_multiplicative_update``) and trifast (``trifast.triangle_attention``).

Each method maps the case's tensors (genie-tk's layout, see :mod:`cases`) onto its
own API with views, and makes any copy it needs inside the timed call. Where a method cannot take a particular call it raises
:class:`Unsupported`, which the runner records as ``unavailable``, not as an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import genie_tk

from .cases import ATTENTION, TRI_MUL, Op, Tensors, tri_mul_weights

Call = Callable[[Op, Tensors], torch.Tensor]


class Unsupported(Exception):
    """The method exists here but cannot run this call (dtype, shape, no kernel)."""


@dataclass
class Method:
    """A benchmarked implementation: ``calls`` maps an op family to its adapter."""

    name: str
    library: str
    version: str | None
    reason: str = ""  # why it cannot run here at all ("" when it can)
    calls: dict[str, Call] = field(default_factory=dict)
    naive: bool = False  # holds whole logits: its memory is the op's ``naive_bytes``

    @property
    def available(self) -> bool:
        return not self.reason

    def describe(self) -> dict:
        return {"library": self.library, "version": self.version,
                "status": "available" if self.available else "unavailable",
                "reason": self.reason, "families": sorted(self.calls)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _genie_attention(backend: str) -> Call:
    def call(op: Op, t: Tensors) -> torch.Tensor:
        return _genie(genie_tk.triangle_attention, t["q"], t["k"], t["v"], t["bias"], t["mask"],
                      backend=backend)

    return call


def _genie_tri_mul(backend: str) -> Call:
    def call(op: Op, t: Tensors) -> torch.Tensor:
        weights = tri_mul_weights(t)
        return _genie(genie_tk.triangle_multiplicative_update, t["z"], t["mask"],
                      op.call_args["direction"], backend=backend, **weights)

    return call


def _genie(fn, *args, **kwargs) -> torch.Tensor:
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # genie-tk's "backend='tk' cannot run <op>: <reason>"
        if "cannot run" in str(exc):
            raise Unsupported(str(exc)) from exc
        raise


def genie_methods() -> list[Method]:
    """genie-tk's backends; the kernel backends (``tk``, ``triton``) list the op families
    they have kernels for. Under Triton's interpreter ``triton`` is recorded as
    unavailable: the interpreter proves the kernels correct, its timings mean nothing."""
    version = getattr(genie_tk, "__version__", None)
    methods = []
    for name, info in genie_tk.backends().items():
        reason = str(info.get("reason", ""))
        if name == "triton" and not reason and info.get("interpreter"):
            reason = "TRITON_INTERPRET=1: the interpreter runs the kernels on the CPU, far too slowly to time"
        m = Method(name, "genie-tk", version, reason, naive=name == "reference")
        kernel = name in ("tk", "triton")
        families = tuple(info.get("ops", ())) if kernel else (ATTENTION, TRI_MUL)
        if ATTENTION in families:
            m.calls[ATTENTION] = _genie_attention(name)
        if TRI_MUL in families:
            m.calls[TRI_MUL] = _genie_tri_mul(name)
        methods.append(m)
    return methods


def _import(module: str):
    """``(module, "")`` or ``(None, reason)``; any failure is a reason, never a crash."""
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # a broken peer install must not stop the suite
        return None, f"import {module} failed: {type(exc).__name__}: {exc}"


def _needs_cuda(device: torch.device, library: str) -> str:
    return "" if device.type == "cuda" else f"{library} runs on CUDA only; the device here is {device.type}"


def cuequivariance_method(device: torch.device) -> Method:
    """cuEquivariance: bias ``[B, 1, H, Q, K]``, mask bool ``[B, N, 1, 1, K]`` (True = keep)."""
    m = Method("cuequivariance", "cuequivariance-torch", _version("cuequivariance-torch"))
    m.reason = _needs_cuda(device, "cuEquivariance")
    cuet, reason = _import("cuequivariance_torch") if not m.reason else (None, m.reason)
    if not reason:  # the kernels live in a separate package that the API imports lazily
        _, reason = _import("cuequivariance_ops_torch")
    m.reason = reason
    if cuet is None or reason:
        return m

    def attention(op: Op, t: Tensors) -> torch.Tensor:
        # Its kernels read dense [B, N, H, Q, D] tensors: the ending-node views are
        # copied here, inside the timed call (a no-op for contiguous inputs).
        q, k, v = (x.contiguous() for x in (t["q"], t["k"], t["v"]))
        bias, mask = t["bias"].unsqueeze(1).contiguous(), t["mask"][:, :, None, None, :].contiguous()
        return cuet.triangle_attention(q, k, v, bias, mask)

    def tri_mul(op: Op, t: Tensors) -> torch.Tensor:
        weights = tri_mul_weights(t)
        return cuet.triangle_multiplicative_update(t["z"], op.call_args["direction"], t["mask"], **weights)

    m.calls = {ATTENTION: attention, TRI_MUL: tri_mul}
    return m


def trifast_method(device: torch.device) -> Method:
    """trifast: head-major ``[B, H, I, J, D]``, bias ``[B, H, J, K]``, mask bool
    ``[B, I, K]`` with True = *masked*; scale fixed at ``1/sqrt(D)``."""
    m = Method("trifast", "trifast", _version("trifast"))
    m.reason = _needs_cuda(device, "trifast (Triton)")
    tf, reason = _import("trifast") if not m.reason else (None, m.reason)
    m.reason = reason
    if tf is None:
        return m

    def attention(op: Op, t: Tensors) -> torch.Tensor:
        q, k, v = (x.transpose(1, 2) for x in (t["q"], t["k"], t["v"]))
        return tf.triangle_attention(q, k, v, t["bias"], ~t["mask"]).transpose(1, 2)

    m.calls = {ATTENTION: attention}
    return m


def discover(device: torch.device, only: tuple[str, ...] | None = None) -> list[Method]:
    """Every method, available or not; ``only`` keeps those named."""
    methods = [*genie_methods(), cuequivariance_method(device), trifast_method(device)]
    return [m for m in methods if only is None or m.name in only]
