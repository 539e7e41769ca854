"""Errors against the fp64 oracle, ``genie_tk.reference``.

The reference runs once per (op, N, dtype) on the same inputs as the methods
(input set 0, upcast from the benchmark dtype to float64, on the same device)
and gives the output and the gradients of ``sum(out * cotangent)`` with respect to
every differentiable input. Triangle attention is evaluated in chunks of rows
``i`` (row ``i`` is a batch axis of the core; only the bias is shared, and its
gradient is summed over the chunks), so its memory stays O(N²) and the fp64
check reaches the large N that a single ``[B, I, H, J, K]`` fp64 tensor would not.
Where even that does not fit, the error check is skipped and says why.

Per tensor: ``max_abs`` = max |method - reference| and ``rel_fro`` =
‖method - reference‖_F / ‖reference‖_F; a non-finite result is ``null`` with
``finite: false``.
"""

from __future__ import annotations

import math

import torch

import genie_tk
from genie_tk import reference
from genie_tk.testing import rel

from .cases import ATTENTION, REF_CHUNK_ELEMENTS, Op, Tensors, tri_mul_weights


def _grad_of(out: torch.Tensor, inputs: list[torch.Tensor], cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, cot)


def _attention_reference(t: Tensors, cot: torch.Tensor, want_grads: bool):
    """Chunked fp64 triangle attention: ``(out, {name: grad})``."""
    b, n_i, h, n_j, _ = t["q"].shape
    step = max(1, REF_CHUNK_ELEMENTS // max(1, b * h * n_j * n_j))
    bias = t["bias"].detach().requires_grad_(want_grads)
    out = torch.empty_like(t["q"])
    grads = {k: torch.empty_like(t[k]) for k in ("q", "k", "v")} if want_grads else {}
    dbias = torch.zeros_like(bias)
    for i0 in range(0, n_i, step):
        rows = slice(i0, min(i0 + step, n_i))
        q, k, v = (t[name][:, rows].detach().requires_grad_(want_grads) for name in ("q", "k", "v"))
        with torch.set_grad_enabled(want_grads):
            o = reference.triangle_attention(q, k, v, bias, t["mask"][:, rows])
        out[:, rows] = o.detach()
        if want_grads:
            dq, dk, dv, db = _grad_of(o, [q, k, v, bias], cot[:, rows])
            grads["q"][:, rows], grads["k"][:, rows], grads["v"][:, rows] = dq, dk, dv
            dbias += db
    if want_grads:
        grads["bias"] = dbias
    return out, grads


def _tri_mul_reference(op: Op, t: Tensors, cot: torch.Tensor, want_grads: bool):
    leaves = {k: v.detach().requires_grad_(want_grads and k in op.diff) for k, v in t.items()}
    weights = tri_mul_weights(leaves)
    with torch.set_grad_enabled(want_grads):
        out = genie_tk.triangle_multiplicative_update(
            leaves["z"], leaves["mask"], op.call_args["direction"], backend="reference", **weights)
    if not want_grads:
        return out, {}
    grads = _grad_of(out, [leaves[k] for k in op.diff], cot)
    return out.detach(), dict(zip(op.diff, grads))


def fp64_reference(op: Op, t: Tensors, cot: torch.Tensor, want_grads: bool):
    """``(out, {name: grad})`` in float64 from the benchmark inputs ``t``."""
    t64 = {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()}
    cot64 = cot.double()
    if op.family == ATTENTION:
        return _attention_reference(t64, cot64, want_grads)
    return _tri_mul_reference(op, t64, cot64, want_grads)


def compare(value: torch.Tensor, ref: torch.Tensor) -> dict:
    """``{"max_abs", "rel_fro", "finite"}`` of ``value`` against ``ref``, in float64
    on ``value``'s device (the reference may be parked in host memory)."""
    value, ref = value.detach().double(), ref.to(value.device, non_blocking=True)
    diff = value - ref
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel_fro = rel(value, ref)
    finite = math.isfinite(max_abs) and math.isfinite(rel_fro)
    return {"max_abs": max_abs if finite else None, "rel_fro": rel_fro if finite else None, "finite": finite}


def compare_all(out: torch.Tensor, grads: dict[str, torch.Tensor], ref_out: torch.Tensor,
                ref_grads: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Errors of the output (``out``) and of each gradient (``grad_<input>``)."""
    errors = {"out": compare(out, ref_out)}
    errors.update({f"grad_{k}": compare(grads[k], ref_grads[k]) for k in grads})
    return errors
