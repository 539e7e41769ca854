"""Boltz 2's triangle layers on genie-tk.

``from genie_tk.boltz import TriangleMultiplicationOutgoing, TriangleMultiplicationIncoming``
replaces ``from boltz.model.layers.triangular_mult import ...`` and
``from genie_tk.boltz import TriangleAttention, TriangleAttentionStartingNode,
TriangleAttentionEndingNode`` replaces
``from boltz.model.layers.triangular_attention.attention import ...`` (Boltz 2.2.1):
same names, constructor arguments, ``state_dict`` keys and forward arguments,
computed by :func:`genie_tk.triangle_multiplicative_update` and
:func:`genie_tk.triangle_attention_layer` on any genie-tk backend.

* Tri-mul: the cuEquivariance layout ``norm_in``, ``p_in`` ``[2·dim, dim]`` (rows
  ``[0, dim)`` make ``a``), ``g_in``, ``norm_out``, ``p_out``, ``g_out``, no biases;
  ``forward(x, mask, use_kernels=False)``.
* Triangle attention: OpenFold's keys (``layer_norm``, ``linear``, ``mha.linear_*``)
  with no biases on ``mha.linear_o`` and ``mha.linear_g``;
  ``forward(x, mask=None, chunk_size=None, use_kernels=False)``.

``use_kernels`` (Boltz: run cuEquivariance's kernels) is accepted and ignored: the
genie-tk backend is chosen by the ``backend`` attribute (default ``GENIE_TK_BACKEND``).

Precision: Boltz casts ``a`` and ``b`` to float32 before the contraction. For
float32 models (Boltz's weights) that is genie-tk's float32 contraction too. Under
bfloat16 autocast, Boltz's einsum is re-cast by autocast to bfloat16, as genie-tk's
contraction is. A float64 model runs in float64 here (Boltz's own layer fails there:
its float32 contraction meets float64 ``norm_out`` weights).

A whole model: :func:`patch` (before building it) or :func:`replace_modules` (a
built one, keeping its parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partialmethod

import torch
from torch import nn

from genie_tk import _layouts, modules


class _TriangleMultiplication(nn.Module):
    """Boltz 2's tri-mul parameters (cuEquivariance layout) and forward."""

    _outgoing = True

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.backend: str | None = None
        self.norm_in = nn.LayerNorm(dim, eps=1e-5)
        self.p_in = _layouts.linear(dim, 2 * dim, False, "default")
        self.g_in = _layouts.linear(dim, 2 * dim, False, "gating")
        self.norm_out = nn.LayerNorm(dim)
        self.p_out = _layouts.linear(dim, dim, False, "final")
        self.g_out = _layouts.linear(dim, dim, False, "gating")

    def forward(self, x: torch.Tensor, mask: torch.Tensor, use_kernels: bool = False) -> torch.Tensor:
        """``x``: ``[B, N, N, D]``; ``mask``: ``[B, N, N]``; returns ``[B, N, N, D]``.
        ``use_kernels`` is ignored (see the module docstring)."""
        return modules.trimul(
            x, mask, self._outgoing, self.norm_in, (self.p_in.weight, None), (self.g_in.weight, None),
            self.norm_out, self.p_out, self.g_out, None, self.backend,
        )


class TriangleMultiplicationOutgoing(_TriangleMultiplication):
    """``x_ij = Σ_k a_ik b_jk``."""


class TriangleMultiplicationIncoming(_TriangleMultiplication):
    """``x_ij = Σ_k a_ki b_kj``."""

    _outgoing = False


_ATTENTION_SPECS = {
    "linear_q": (False, "glorot"),
    "linear_k": (False, "glorot"),
    "linear_v": (False, "glorot"),
    "linear_o": (False, "final"),
    "linear_g": (False, "gating"),
}


class TriangleAttention(nn.Module):
    """Boltz 2's triangle attention (Alg. 13; Alg. 14 with ``starting=False``).

    Args:
        c_in: pair channels ``C``; c_hidden: width of one head ``D``; no_heads: ``H``.
        starting: ``False`` transposes the input and mask inside the module.
        inf: magnitude of the finite mask bias.
    """

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True, inf: float = 1e9) -> None:
        super().__init__()
        self.c_in, self.c_hidden, self.no_heads = c_in, c_hidden, no_heads
        self.starting, self.inf = starting, inf
        self.backend: str | None = None
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear = _layouts.linear(c_in, no_heads, False, "normal")
        self.mha = _layouts.GatedAttention(c_in, c_hidden, no_heads, _ATTENTION_SPECS)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        use_kernels: bool = False,
    ) -> torch.Tensor:
        """``x``: ``[*, I, J, C]``; ``mask``: ``[*, I, J]`` or ``None``; returns ``[*, I, J, C]``.
        ``chunk_size`` bounds the rows computed at once; ``use_kernels`` is ignored."""
        return modules.attention_layer(self, x, mask, self.linear.weight, chunk_size)


TriangleAttentionStartingNode = TriangleAttention


class TriangleAttentionEndingNode(TriangleAttention):
    """Boltz 2's ending-node triangle attention (``starting=False``)."""

    __init__ = partialmethod(TriangleAttention.__init__, starting=False)


_ATT = "boltz.model.layers.triangular_attention.attention"
_MUL = "boltz.model.layers.triangular_mult"
CLASSES: dict[tuple[str, str], type] = {
    (_ATT, "TriangleAttention"): TriangleAttention,
    (_ATT, "TriangleAttentionEndingNode"): TriangleAttentionEndingNode,
    (_MUL, "TriangleMultiplicationOutgoing"): TriangleMultiplicationOutgoing,
    (_MUL, "TriangleMultiplicationIncoming"): TriangleMultiplicationIncoming,
}
"""Boltz class (module, name) -> its genie-tk replacement."""


def _build(cls: type, old: nn.Module) -> nn.Module:
    if issubclass(cls, TriangleAttention):
        side = {"starting": old.starting} if cls is TriangleAttention else {}
        return cls(old.c_in, old.c_hidden, old.no_heads, inf=old.inf, **side)
    return cls(old.norm_in.normalized_shape[0])


def replace_modules(model: nn.Module) -> nn.Module:
    """Put genie-tk layers in place of every Boltz triangle layer of a built ``model``
    (for example a loaded ``Boltz2`` or one ``PairformerLayer``), keeping its
    parameter objects. Returns ``model``."""
    return _layouts.replace_modules(model, CLASSES, _build)


@contextlib.contextmanager
def patch() -> Iterator[None]:
    """Inside ``with genie_tk.boltz.patch():``, Boltz's triangle layer classes are
    genie-tk's in every ``boltz`` module, so a model built (or loaded from a
    checkpoint) there runs its triangle layers on genie-tk. The originals are
    restored on exit. Needs ``boltz`` importable."""
    with _layouts.patch("boltz", CLASSES):
        yield
