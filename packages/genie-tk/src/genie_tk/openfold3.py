"""OpenFold3's triangle layers on genie-tk.

``from genie_tk.openfold3 import X`` replaces
``from openfold3.core.model.layers.triangular_attention import X`` (``TriangleAttention``
= ``TriangleAttentionStartingNode``, ``TriangleAttentionEndingNode``) or
``from openfold3.core.model.layers.triangular_multiplicative_update import X``
(``TriangleMultiplicationOutgoing/Incoming``, ``FusedTriangleMultiplicationOutgoing/Incoming``):
same class names, constructor arguments (``linear_init_params`` included), ``state_dict``
keys and forward keywords, computed by :func:`genie_tk.triangle_attention_layer` and
:func:`genie_tk.triangle_multiplicative_update` on any genie-tk backend.

OpenFold3 (0.5.0) differs from OpenFold v1 (:mod:`genie_tk.modules`) in that its
linears have no biases by default, its triangle-bias projection is ``linear_z``
(LeCun-initialised), and its attention forward takes ``transpose_bias`` (its
PairFormer calls the ending-node layer as a starting-node layer on the transposed
pair tensor with ``transpose_bias=True``, so the bias of ``(j, k)`` is read from
pair ``(k, j)``).

Kernel switches (``use_deepspeed_evo_attention``, ``use_cueq_triangle_kernels``,
``use_triton_triangle_kernels``, ``use_lma``) are accepted and ignored: each picks
one of OpenFold3's own implementations of the same function, and genie-tk's
backend is chosen by ``backend`` (module attribute, default ``GENIE_TK_BACKEND``).

A whole model: :func:`patch` (before building it) or :func:`replace_modules` (a
built one, keeping its parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from functools import partialmethod
from typing import Any

import torch
from torch import nn

from genie_tk import _layouts, modules

_MHA = ("linear_q", "linear_k", "linear_v", "linear_o", "linear_g")


def _spec(params: Any, name: str) -> tuple[bool, str]:
    """``(bias, init)`` of one linear from an OpenFold3 ``linear_init_params`` entry."""
    entry = params[name]
    extra = set(entry.keys()) - {"bias", "init"}
    if extra:
        raise ValueError(f"linear_init_params.{name} has {sorted(extra)}; genie_tk.openfold3 takes only 'bias' and 'init'")
    return bool(entry.get("bias", True)), str(entry.get("init", "default"))


def _config(**linears: dict) -> dict:
    return {name: dict(spec) for name, spec in linears.items()}


# OpenFold3 0.5.0's defaults (openfold3.core.config.default_linear_init_config), as plain dicts;
# an ml_collections ConfigDict of the same shape is accepted too.
TRI_ATT_INIT = {
    "linear_z": {"bias": False, "init": "default"},
    "mha": _config(
        linear_q={"bias": False, "init": "default"},
        linear_k={"bias": False, "init": "default"},
        linear_v={"bias": False, "init": "default"},
        linear_g={"bias": False, "init": "gating"},
        linear_o={"bias": False, "init": "final"},
    ),
}
TRI_MUL_INIT = _config(
    linear_a_p={"bias": False, "init": "default"},
    linear_a_g={"bias": False, "init": "gating"},
    linear_b_p={"bias": False, "init": "default"},
    linear_b_g={"bias": False, "init": "gating"},
    linear_g={"bias": False, "init": "gating"},
    linear_z={"bias": False, "init": "final"},
)
FUSED_TRI_MUL_INIT = _config(
    linear_ab_p={"bias": False, "init": "default"},
    linear_ab_g={"bias": False, "init": "gating"},
    linear_g={"bias": False, "init": "gating"},
    linear_z={"bias": False, "init": "final"},
)


class TriangleAttention(nn.Module):
    """OpenFold3's triangle attention (AF3 Alg. 14; Alg. 15 with ``starting=False``).

    Args:
        c_in: pair channels ``C``.
        c_hidden: width of one head ``D``.
        no_heads: heads ``H``.
        starting: ``False`` transposes the input and mask inside the module.
        inf: magnitude of the finite mask bias.
        linear_init_params: ``{"linear_z": {bias, init}, "mha": {"linear_q": ..., ...}}``;
            a bias on ``linear_z``, ``linear_q``, ``linear_k`` or ``linear_v`` is refused.
    """

    def __init__(
        self,
        c_in: int,
        c_hidden: int,
        no_heads: int,
        starting: bool = True,
        inf: float = 1e9,
        linear_init_params: Mapping = TRI_ATT_INIT,
    ):
        super().__init__()
        self.c_in, self.c_hidden, self.no_heads = c_in, c_hidden, no_heads
        self.starting, self.inf = starting, inf
        self.backend: str | None = None
        bias, init = _spec(linear_init_params, "linear_z")
        if bias:
            raise ValueError("linear_z with a bias is not supported: genie-tk's triangle-bias projection has none")
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear_z = _layouts.linear(c_in, no_heads, False, init)
        mha = linear_init_params["mha"]
        self.mha = _layouts.GatedAttention(c_in, c_hidden, no_heads, {n: _spec(mha, n) for n in _MHA})

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        transpose_bias: bool = False,
        chunk_size: int | None = None,
        use_deepspeed_evo_attention: bool = False,
        use_cueq_triangle_kernels: bool = False,
        use_triton_triangle_kernels: bool = False,
        use_lma: bool = False,
        inplace_safe: bool = False,
    ) -> torch.Tensor:
        """``x``: ``[*, I, J, C]``; ``mask``: ``[*, I, J]`` or ``None``; returns ``[*, I, J, C]``.

        ``transpose_bias`` as in OpenFold3; ``chunk_size`` bounds the rows computed
        at once; the kernel switches and ``inplace_safe`` are accepted and ignored.
        """
        return modules.attention_layer(self, x, mask, self.linear_z.weight, chunk_size, transpose_bias)


TriangleAttentionStartingNode = TriangleAttention


class TriangleAttentionEndingNode(TriangleAttention):
    """OpenFold3's ending-node triangle attention (``starting=False``)."""

    __init__ = partialmethod(TriangleAttention.__init__, starting=False)


class _TriangleMultiplication(nn.Module):
    """Parameters and forward shared by OpenFold3's plain and fused tri-mul layers."""

    def __init__(self, c_z: int, c_hidden: int, _outgoing: bool, linear_init_params: Mapping):
        super().__init__()
        self.c_z, self.c_hidden, self._outgoing = c_z, c_hidden, _outgoing
        self.backend: str | None = None
        self.linear_g = _layouts.linear(c_z, c_z, *_spec(linear_init_params, "linear_g"))
        self.linear_z = _layouts.linear(c_hidden, c_z, *_spec(linear_init_params, "linear_z"))
        self.layer_norm_in = nn.LayerNorm(c_z)
        self.layer_norm_out = nn.LayerNorm(c_hidden)

    def _input_projections(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        raise NotImplementedError

    def forward(
        self,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        inplace_safe: bool = False,
        use_cueq_triangle_kernels: bool = False,
        use_triton_triangle_kernels: bool = False,
        _add_with_inplace: bool = False,
        _inplace_chunk_size: int | None = 256,
    ) -> torch.Tensor:
        """``z``: ``[*, N, N, C]``; ``mask``: ``[*, N, N]`` or ``None``; returns ``[*, N, N, C]``.

        ``inplace_safe=True`` computes the output in blocks of
        ``_inplace_chunk_size`` rows and, with ``_add_with_inplace=True``, adds it
        into ``z`` in place and returns ``z`` (OpenFold3's inference path; unlike
        it, ``z`` is left untouched when ``_add_with_inplace=False``). As in
        OpenFold3, ``use_cueq_triangle_kernels=True`` overrides ``inplace_safe``
        (the update is returned, nothing is added); ``use_triton_triangle_kernels``
        is ignored.
        """
        inplace_safe = inplace_safe and not use_cueq_triangle_kernels
        p_in, g_in = self._input_projections()
        out = modules.trimul(
            z, mask, self._outgoing, self.layer_norm_in, p_in, g_in, self.layer_norm_out,
            self.linear_z, self.linear_g, _inplace_chunk_size if inplace_safe else None, self.backend,
        )
        if inplace_safe and _add_with_inplace:
            return z.add_(out)
        return out


class TriangleMultiplicativeUpdate(_TriangleMultiplication):
    """OpenFold3's tri-mul (AF3 Alg. 12 with ``_outgoing=True``, Alg. 13 otherwise):
    keys ``linear_{a,b}_{p,g}``, ``linear_g``, ``linear_z``, ``layer_norm_{in,out}``."""

    def __init__(self, c_z: int, c_hidden: int, _outgoing: bool = True, linear_init_params: Mapping = TRI_MUL_INIT):
        super().__init__(c_z, c_hidden, _outgoing, linear_init_params)
        for name in ("linear_a_p", "linear_a_g", "linear_b_p", "linear_b_g"):
            setattr(self, name, _layouts.linear(c_z, c_hidden, *_spec(linear_init_params, name)))

    def _input_projections(self):
        return (_layouts.stacked(self.linear_a_p, self.linear_b_p),
                _layouts.stacked(self.linear_a_g, self.linear_b_g))


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """``x_ij = Σ_k a_ik b_jk``."""

    __init__ = partialmethod(TriangleMultiplicativeUpdate.__init__, _outgoing=True)


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """``x_ij = Σ_k a_ki b_kj``."""

    __init__ = partialmethod(TriangleMultiplicativeUpdate.__init__, _outgoing=False)


class FusedTriangleMultiplicativeUpdate(_TriangleMultiplication):
    """OpenFold3's AF-Multimer tri-mul: keys ``linear_ab_p``, ``linear_ab_g`` (a: rows
    ``[0, Ch)``, b: ``[Ch, 2·Ch)``) instead of the four ``linear_{a,b}_{p,g}``."""

    def __init__(self, c_z: int, c_hidden: int, _outgoing: bool = True,
                 linear_init_params: Mapping = FUSED_TRI_MUL_INIT):
        super().__init__(c_z, c_hidden, _outgoing, linear_init_params)
        self.linear_ab_p = _layouts.linear(c_z, 2 * c_hidden, *_spec(linear_init_params, "linear_ab_p"))
        self.linear_ab_g = _layouts.linear(c_z, 2 * c_hidden, *_spec(linear_init_params, "linear_ab_g"))

    def _input_projections(self):
        p, g = self.linear_ab_p, self.linear_ab_g
        return (p.weight, p.bias), (g.weight, g.bias)


class FusedTriangleMultiplicationOutgoing(FusedTriangleMultiplicativeUpdate):
    """Fused-projection outgoing tri-mul."""

    __init__ = partialmethod(FusedTriangleMultiplicativeUpdate.__init__, _outgoing=True)


class FusedTriangleMultiplicationIncoming(FusedTriangleMultiplicativeUpdate):
    """Fused-projection incoming tri-mul."""

    __init__ = partialmethod(FusedTriangleMultiplicativeUpdate.__init__, _outgoing=False)


_ATT = "openfold3.core.model.layers.triangular_attention"
_MUL = "openfold3.core.model.layers.triangular_multiplicative_update"
CLASSES: dict[tuple[str, str], type] = {
    (_ATT, "TriangleAttention"): TriangleAttention,
    (_ATT, "TriangleAttentionEndingNode"): TriangleAttentionEndingNode,
    (_MUL, "TriangleMultiplicativeUpdate"): TriangleMultiplicativeUpdate,
    (_MUL, "TriangleMultiplicationOutgoing"): TriangleMultiplicationOutgoing,
    (_MUL, "TriangleMultiplicationIncoming"): TriangleMultiplicationIncoming,
    (_MUL, "FusedTriangleMultiplicativeUpdate"): FusedTriangleMultiplicativeUpdate,
    (_MUL, "FusedTriangleMultiplicationOutgoing"): FusedTriangleMultiplicationOutgoing,
    (_MUL, "FusedTriangleMultiplicationIncoming"): FusedTriangleMultiplicationIncoming,
}
"""OpenFold3 class (module, name) -> its genie-tk replacement."""


def _has_bias(linear: nn.Linear) -> dict:
    return {"bias": linear.bias is not None, "init": "default"}


def _build(cls: type, old: nn.Module) -> nn.Module:
    """The genie-tk layer of class ``cls`` with ``old``'s sizes and biases."""
    if issubclass(cls, TriangleAttention):
        init = {"linear_z": _has_bias(old.linear_z), "mha": {n: _has_bias(getattr(old.mha, n)) for n in _MHA}}
        side = {"starting": old.starting} if cls is TriangleAttention else {}
        return cls(old.c_in, old.c_hidden, old.no_heads, inf=old.inf, linear_init_params=init, **side)
    init = {n: _has_bias(m) for n, m in old.named_children() if n.startswith("linear")}
    side = {"_outgoing": old._outgoing} if cls in (TriangleMultiplicativeUpdate, FusedTriangleMultiplicativeUpdate) else {}
    return cls(old.c_z, old.c_hidden, linear_init_params=init, **side)


def replace_modules(model: nn.Module) -> nn.Module:
    """Put genie-tk layers in place of every OpenFold3 triangle layer of a built
    ``model``, keeping its parameter objects (dtype, device, ``requires_grad``;
    an optimizer built on the model still holds them). Returns ``model``.

    The replacements have genie-tk's classes of the same names (each with the
    ``backend`` attribute), computing the same functions.
    """
    return _layouts.replace_modules(model, CLASSES, _build)


@contextlib.contextmanager
def patch() -> Iterator[None]:
    """Inside ``with genie_tk.openfold3.patch():``, OpenFold3's triangle layer classes
    are genie-tk's in every ``openfold3`` module, so a model built there (for
    example ``PairFormerStack(...)``, or a whole OpenFold3 model) runs its triangle
    layers on genie-tk and loads OpenFold3 checkpoints unchanged. The originals
    are restored on exit; modules built inside keep genie-tk layers.
    Needs ``openfold3`` importable.
    """
    with _layouts.patch("openfold3", CLASSES):
        yield
