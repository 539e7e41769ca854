"""The four kernel benchmark ops: deterministic inputs, FLOP and exp counts.

Every op takes named tensors in genie-tk's layout; a method (see :mod:`methods`)
maps them onto its own API with views, and any copy it needs is made (and timed)
inside the call.

* ``tri_att_start``: ``genie_tk.triangle_attention`` core, starting node. q, k, v
  ``[B, I, H, J, D]`` contiguous, bias ``[B, H, J, K]``, mask bool ``[B, I, K]``.
* ``tri_att_end``: the same core fed the ending-node layout: q, k, v, mask and bias
  are transposed views (rows and columns of the pair swapped) of contiguous
  starting-layout tensors, as an ending-node layer that does not copy hands them
  over. Same arithmetic as the starting node; it measures how a method copes
  with the strided layout.
* ``tri_mul_out`` / ``tri_mul_in``: ``genie_tk.triangle_multiplicative_update``
  (AF2 Alg. 11 / 12), the whole update: z ``[B, N, N, c_z]``, mask ``[B, N, N]``
  and its twelve LayerNorm/projection weights, all differentiable but the mask.

Sizes are AF2's: 4 heads of 32 for attention, c_z = c_hidden = 128 for tri-mul.
Masks keep about 90% of the keys at random but always key 0, so no row is fully
masked (peers treat fully masked rows differently by design; that is semantics,
not accuracy, and would pollute the error columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]

ATTENTION = "triangle_attention"
TRI_MUL = "triangle_multiplicative_update"


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    ``family`` is the genie-tk function (and tk kernel name) it exercises;
    ``params`` its fixed sizes; ``build(n, dtype, device, seed)`` returns the
    input tensors; ``diff`` names the differentiable ones; ``flop_fwd`` and
    ``exp_fwd`` count a forward pass and ``bwd_factor`` scales them to backward;
    ``ref_bytes`` estimates the memory of the fp64 reference forward+backward and
    ``naive_bytes(n, params, element_size)`` that of the plain (``reference``
    backend) one in the benchmark dtype; the output has the shape of ``out_like``.
    """

    name: str
    family: str
    params: dict[str, int]
    build: Callable[[int, torch.dtype, torch.device, int], Tensors]
    diff: tuple[str, ...]
    flop_fwd: Callable[[int, dict[str, int]], float]
    exp_fwd: Callable[[int, dict[str, int]], float]
    bwd_factor: float
    exp_bwd_factor: float
    ref_bytes: Callable[[int, dict[str, int]], float]
    naive_bytes: Callable[[int, dict[str, int], int], float]
    out_like: str
    call_args: dict[str, str] = field(default_factory=dict)

    def flop(self, n: int, pass_: str) -> float:
        f = self.flop_fwd(n, self.params)
        return f * (1 + self.bwd_factor) if pass_ == "fwd+bwd" else f

    def exps(self, n: int, pass_: str) -> float:
        e = self.exp_fwd(n, self.params)
        return e * (1 + self.exp_bwd_factor) if pass_ == "fwd+bwd" else e


def _randn(shape, dtype, device, g: torch.Generator, std: float = 1.0) -> torch.Tensor:
    # Drawn in float32 and rounded once, so every dtype sees the same values up to
    # its own rounding and the fp64 reference reads exactly what the method read.
    return (torch.randn(shape, generator=g, device=device) * std).to(dtype)


def _key_mask(b: int, n: int, device, g: torch.Generator) -> torch.Tensor:
    """``[b, n, n]`` bool, True = keep: ~90% random, key 0 always kept."""
    mask = torch.rand((b, n, n), generator=g, device=device) > 0.1
    mask[..., 0] = True
    return mask


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _attention_inputs(ending: bool):
    def build(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensors:
        p = ATTENTION_PARAMS
        g = _generator(device, seed)
        shape = (p["batch"], n, p["heads"], n, p["head_dim"])
        q, k, v = (_randn(shape, dtype, device, g) for _ in range(3))
        bias = _randn((p["batch"], p["heads"], n, n), dtype, device, g)
        mask = _key_mask(p["batch"], n, device, g)
        if ending:  # swap the pair's row and column axes without copying
            q, k, v = (t.transpose(1, 3) for t in (q, k, v))
            bias, mask = bias.transpose(2, 3), mask.transpose(1, 2)
        return {"q": q, "k": k, "v": v, "bias": bias, "mask": mask}

    return build


def _tri_mul_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensors:
    p = TRI_MUL_PARAMS
    b, c, h = p["batch"], p["c_z"], p["c_hidden"]
    g = _generator(device, seed)

    def lin(out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _randn((out_f, in_f), dtype, device, g, 1 / math.sqrt(in_f)), _randn(out_f, dtype, device, g, 0.1)

    def norm(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 + _randn(width, dtype, device, g, 0.1), _randn(width, dtype, device, g, 0.1)

    t: Tensors = {"z": _randn((b, n, n, c), dtype, device, g)}
    t["mask"] = _key_mask(b, n, device, g).to(dtype)
    t["norm_in_weight"], t["norm_in_bias"] = norm(c)
    t["p_in_weight"], t["p_in_bias"] = lin(2 * h, c)
    t["g_in_weight"], t["g_in_bias"] = lin(2 * h, c)
    t["norm_out_weight"], t["norm_out_bias"] = norm(h)
    t["p_out_weight"], t["p_out_bias"] = lin(c, h)
    t["g_out_weight"], t["g_out_bias"] = lin(c, c)
    return t


def tri_mul_weights(t: Tensors) -> Tensors:
    """The twelve weights of a tri-mul case, under genie-tk's (and cuEquivariance's) keywords."""
    return {k: v for k, v in t.items() if k not in ("z", "mask")}


ATTENTION_PARAMS = {"batch": 1, "heads": 4, "head_dim": 32}
TRI_MUL_PARAMS = {"batch": 1, "c_z": 128, "c_hidden": 128}


def attention_flop(n: int, p: dict[str, int]) -> float:
    """Forward: q·kᵀ and p·v, ``2·N·N·D`` each per row and head: ``4·B·N³·H·D``."""
    return 4.0 * p["batch"] * n**3 * p["heads"] * p["head_dim"]


def attention_exp(n: int, p: dict[str, int]) -> float:
    """One exponential per logit, ``B·N³·H``; the backward recomputes them once."""
    return float(p["batch"] * n**3 * p["heads"])


def tri_mul_flop(n: int, p: dict[str, int]) -> float:
    """Forward: the per-channel contraction ``2·N³·c`` plus the five projections
    (p_in, g_in ``[2c, c_z]``; p_out ``[c_z, c]``; g_out ``[c_z, c_z]``):
    ``2·N²·c_z·(5c + c_z)``."""
    c, cz = p["c_hidden"], p["c_z"]
    return p["batch"] * (2.0 * n**3 * c + 2.0 * n**2 * cz * (5 * c + cz))


def tri_mul_exp(n: int, p: dict[str, int]) -> float:
    """Sigmoids of the two gates, ``B·N²·(2c + c_z)``: negligible next to the matmuls."""
    return float(p["batch"] * n**2 * (2 * p["c_hidden"] + p["c_z"]))


def attention_ref_bytes(n: int, p: dict[str, int]) -> float:
    """fp64 q, k, v, o, their gradients and the cotangent (the reference runs in
    row chunks of at most ``REF_CHUNK_ELEMENTS`` logits, about six copies live)."""
    return 8.0 * (12 * p["batch"] * n * n * p["heads"] * p["head_dim"] + 6 * REF_CHUNK_ELEMENTS)


def tri_mul_ref_bytes(n: int, p: dict[str, int]) -> float:
    """Sixteen ``[B, N, N, max(2c, c_z)]`` fp64 activations and gradients (measured
    on the CPU: nine at N=256, fourteen at N=128 where fixed costs weigh more)."""
    return 8.0 * 16 * p["batch"] * n * n * max(2 * p["c_hidden"], p["c_z"])


def attention_naive_bytes(n: int, p: dict[str, int], element_size: int) -> float:
    """About six ``[B, I, H, J, K]`` logits-sized tensors, in at least float32."""
    return 6.0 * p["batch"] * n**3 * p["heads"] * max(element_size, 4)


def tri_mul_naive_bytes(n: int, p: dict[str, int], element_size: int) -> float:
    return tri_mul_ref_bytes(n, p) * element_size / 8


REF_CHUNK_ELEMENTS = 1 << 26  # 512 MiB of fp64 logits per chunk of rows

_ATT_DIFF = ("q", "k", "v", "bias")
_TRI_MUL_DIFF = (
    "z", "norm_in_weight", "norm_in_bias", "p_in_weight", "p_in_bias", "g_in_weight", "g_in_bias",
    "norm_out_weight", "norm_out_bias", "p_out_weight", "p_out_bias", "g_out_weight", "g_out_bias",
)


def _attention_op(name: str, ending: bool) -> Op:
    # Backward = 2.5 x forward (flash-attention's convention: five N³ matmuls
    # instead of two); its exponentials are recomputed once.
    return Op(name, ATTENTION, ATTENTION_PARAMS, _attention_inputs(ending), _ATT_DIFF,
              attention_flop, attention_exp, bwd_factor=2.5, exp_bwd_factor=1.0,
              ref_bytes=attention_ref_bytes, naive_bytes=attention_naive_bytes, out_like="q")


def _tri_mul_op(name: str, direction: str) -> Op:
    # Backward = 2 x forward: each matmul has two gradient matmuls; the sigmoid
    # derivatives reuse the forward values.
    return Op(name, TRI_MUL, TRI_MUL_PARAMS, _tri_mul_inputs, _TRI_MUL_DIFF,
              tri_mul_flop, tri_mul_exp, bwd_factor=2.0, exp_bwd_factor=0.0,
              ref_bytes=tri_mul_ref_bytes, naive_bytes=tri_mul_naive_bytes, out_like="z",
              call_args={"direction": direction})


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        _attention_op("tri_att_start", ending=False),
        _attention_op("tri_att_end", ending=True),
        _tri_mul_op("tri_mul_out", "outgoing"),
        _tri_mul_op("tri_mul_in", "incoming"),
    )
}

PASSES = ("fwd", "fwd+bwd")


def nbytes(tensors) -> int:
    """Bytes of the elements of ``tensors`` (a view counts its own elements)."""
    return sum(t.numel() * t.element_size() for t in tensors)
