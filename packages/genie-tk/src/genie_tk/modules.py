"""OpenFold-compatible triangle modules.

Same class names, constructor arguments, forward keywords, parameter names,
shapes and initialisations as ``openfold.model.triangular_attention`` and
``openfold.model.triangular_multiplicative_update``: an OpenFold ``state_dict``
loads with ``strict=True`` and gives the same outputs and gradients. Swapping
the import is the whole migration.

Each module has one extra attribute, ``backend`` (default ``None``: the
``GENIE_TK_BACKEND`` variable, else ``auto``), passed to the functional API.
"""

from __future__ import annotations

import abc
import math
import numbers
from functools import partialmethod

import torch
from torch import nn

from genie_tk import ops


def _check_sizes(owner: str, **sizes: int) -> None:
    """Every size is a positive integer, else a ``ValueError`` naming it."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


class Linear(nn.Linear):
    """``nn.Linear`` with OpenFold's initialisers.

    ``init``: ``default`` (LeCun truncated normal), ``relu`` (He truncated
    normal), ``glorot`` (Xavier uniform), ``gating`` (W = 0, b = 1), ``normal``
    (Kaiming normal, linear gain) or ``final`` (zeros). Biases start at 0 except
    for ``gating``.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, init: str = "default"):
        super().__init__(in_dim, out_dim, bias=bias)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init = getattr(self, "init", None)
        if init is None:  # called by nn.Linear.__init__ before `init` is set
            return
        with torch.no_grad():
            if init in ("default", "relu"):
                scale = (2.0 if init == "relu" else 1.0) / max(1, self.in_features)
                # 0.8796 is the std of a unit normal truncated to [-2, 2].
                std = math.sqrt(scale) / 0.87962566103423978
                nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
            elif init == "glorot":
                nn.init.xavier_uniform_(self.weight, gain=1)
            elif init == "normal":
                nn.init.kaiming_normal_(self.weight, nonlinearity="linear")
            elif init in ("gating", "final"):
                self.weight.zero_()
            else:
                raise ValueError(f"init must be one of default, relu, glorot, gating, normal, final; got {init!r}")
            if self.bias is not None:
                self.bias.fill_(1.0 if init == "gating" else 0.0)


def attention_layer(
    layer: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    bias_weight: torch.Tensor,
    chunk_size: int | None,
    transpose_bias: bool = False,
) -> torch.Tensor:
    """Forward of a triangle attention ``layer`` (``layer_norm``, ``mha`` of
    :class:`Attention` or :class:`genie_tk._layouts.GatedAttention`, ``starting``, ``inf``, ``backend``) with triangle-bias
    projection ``bias_weight``."""
    mha = layer.mha
    return ops.triangle_attention_layer(
        x,
        mask,
        layer_norm_weight=layer.layer_norm.weight,
        layer_norm_bias=layer.layer_norm.bias,
        bias_weight=bias_weight,
        q_weight=mha.linear_q.weight,
        k_weight=mha.linear_k.weight,
        v_weight=mha.linear_v.weight,
        gate_weight=mha.linear_g.weight,
        gate_bias=mha.linear_g.bias,
        out_weight=mha.linear_o.weight,
        out_bias=mha.linear_o.bias,
        starting=layer.starting,
        transpose_bias=transpose_bias,
        inf=layer.inf,
        eps=layer.layer_norm.eps,
        chunk_size=chunk_size,
        backend=layer.backend,
    )


def trimul(
    z: torch.Tensor,
    mask: torch.Tensor | None,
    outgoing: bool,
    norm_in: nn.LayerNorm,
    p_in: tuple[torch.Tensor, torch.Tensor | None],
    g_in: tuple[torch.Tensor, torch.Tensor | None],
    norm_out: nn.LayerNorm,
    p_out: nn.Linear,
    g_out: nn.Linear,
    chunk_size: int | None,
    backend: str | None,
) -> torch.Tensor:
    """A tri-mul layer's forward from its parts (``p_in``, ``g_in``: stacked ``(weight, bias)``)."""
    return ops.triangle_multiplicative_update(
        z,
        mask,
        "outgoing" if outgoing else "incoming",
        norm_in_weight=norm_in.weight,
        norm_in_bias=norm_in.bias,
        p_in_weight=p_in[0],
        p_in_bias=p_in[1],
        g_in_weight=g_in[0],
        g_in_bias=g_in[1],
        norm_out_weight=norm_out.weight,
        norm_out_bias=norm_out.bias,
        p_out_weight=p_out.weight,
        p_out_bias=p_out.bias,
        g_out_weight=g_out.weight,
        g_out_bias=g_out.bias,
        eps=norm_in.eps,
        chunk_size=chunk_size,
        backend=backend,
    )


class Attention(nn.Module):
    """The gated multi-head attention parameters of OpenFold's ``Attention`` (``mha.*`` keys).

    Only its weights are used: :class:`TriangleAttention` runs the computation
    through :func:`genie_tk.triangle_attention_layer`.
    """

    def __init__(self, c_q: int, c_k: int, c_v: int, c_hidden: int, no_heads: int, gating: bool = True):
        super().__init__()
        if not gating:
            raise ValueError("gating=False is not supported: triangle attention is always gated")
        self.c_q, self.c_k, self.c_v = c_q, c_k, c_v
        self.c_hidden, self.no_heads, self.gating = c_hidden, no_heads, gating
        width = c_hidden * no_heads
        self.linear_q = Linear(c_q, width, bias=False, init="glorot")
        self.linear_k = Linear(c_k, width, bias=False, init="glorot")
        self.linear_v = Linear(c_v, width, bias=False, init="glorot")
        self.linear_o = Linear(width, c_q, init="final")
        self.linear_g = Linear(c_q, width, init="gating")
        self.sigmoid = nn.Sigmoid()


class TriangleAttention(nn.Module):
    """Triangle self-attention around the starting node (Alg. 13) or, with
    ``starting=False``, the ending node (Alg. 14).

    Args:
        c_in: pair channels ``C``.
        c_hidden: width of **one** head ``D``.
        no_heads: heads ``H``.
        starting: ``False`` transposes the input and mask inside the module.
        inf: magnitude of the finite mask bias.
    """

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True, inf: float = 1e9):
        super().__init__()
        _check_sizes(type(self).__name__, c_in=c_in, c_hidden=c_hidden, no_heads=no_heads)
        self.c_in, self.c_hidden, self.no_heads = c_in, c_hidden, no_heads
        self.starting, self.inf = starting, inf
        self.backend: str | None = None
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear = Linear(c_in, no_heads, bias=False, init="normal")
        self.mha = Attention(c_in, c_in, c_in, c_hidden, no_heads)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        use_memory_efficient_kernel: bool = False,
        use_deepspeed_evo_attention: bool = False,
        use_lma: bool = False,
        inplace_safe: bool = False,
    ) -> torch.Tensor:
        """``x``: ``[*, N, N, C]``; ``mask``: ``[*, N, N]`` or ``None``; returns ``[*, N, N, C]``.

        ``chunk_size`` bounds the rows processed at once. The OpenFold kernel
        switches (``use_memory_efficient_kernel``, ``use_deepspeed_evo_attention``,
        ``use_lma``) and ``inplace_safe`` are accepted for compatibility: every
        genie-tk backend computes the same function memory-efficiently.
        """
        return attention_layer(self, x, mask, self.linear.weight, chunk_size)


TriangleAttentionStartingNode = TriangleAttention


class TriangleAttentionEndingNode(TriangleAttention):
    """Triangle attention around the ending node (Alg. 14)."""

    __init__ = partialmethod(TriangleAttention.__init__, starting=False)


class _TriangleMultiplicationBase(nn.Module, abc.ABC):
    """Parameters and forward shared by the plain and fused-projection tri-mul modules."""

    def __init__(self, c_z: int, c_hidden: int, _outgoing: bool):
        super().__init__()
        _check_sizes(type(self).__name__, c_z=c_z, c_hidden=c_hidden)
        self.c_z, self.c_hidden, self._outgoing = c_z, c_hidden, _outgoing
        self.backend: str | None = None
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.linear_z = Linear(c_hidden, c_z, init="final")
        self.layer_norm_in = nn.LayerNorm(c_z)
        self.layer_norm_out = nn.LayerNorm(c_hidden)
        self.sigmoid = nn.Sigmoid()

    @abc.abstractmethod
    def _input_projections(self) -> tuple[torch.Tensor, ...]:
        """``(p_in_weight, p_in_bias, g_in_weight, g_in_bias)`` with a and b stacked."""

    def forward(
        self,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        inplace_safe: bool = False,
        _add_with_inplace: bool = False,
        _inplace_chunk_size: int | None = 256,
    ) -> torch.Tensor:
        """``z``: ``[*, N, N, C]``; ``mask``: ``[*, N, N]`` or ``None``; returns ``[*, N, N, C]``.

        As in OpenFold, ``inplace_safe=True`` is the inference path: the output
        is computed in blocks of ``_inplace_chunk_size`` rows and, with
        ``_add_with_inplace=True``, added into ``z`` in place and ``z`` returned.
        """
        if inplace_safe:
            ops.check_chunk_size(_inplace_chunk_size, "_inplace_chunk_size")
        p_w, p_b, g_w, g_b = self._input_projections()
        out = trimul(z, mask, self._outgoing, self.layer_norm_in, (p_w, p_b), (g_w, g_b), self.layer_norm_out,
                     self.linear_z, self.linear_g, _inplace_chunk_size if inplace_safe else None, self.backend)
        if inplace_safe and _add_with_inplace:
            return z.add_(out)
        return out


class TriangleMultiplicativeUpdate(_TriangleMultiplicationBase):
    """Triangle multiplicative update (Alg. 11 with ``_outgoing=True``, Alg. 12 otherwise)."""

    def __init__(self, c_z: int, c_hidden: int, _outgoing: bool = True):
        super().__init__(c_z, c_hidden, _outgoing)
        self.linear_a_p = Linear(c_z, c_hidden)
        self.linear_a_g = Linear(c_z, c_hidden, init="gating")
        self.linear_b_p = Linear(c_z, c_hidden)
        self.linear_b_g = Linear(c_z, c_hidden, init="gating")

    def _input_projections(self):
        cat = torch.cat
        return (
            cat([self.linear_a_p.weight, self.linear_b_p.weight]),
            cat([self.linear_a_p.bias, self.linear_b_p.bias]),
            cat([self.linear_a_g.weight, self.linear_b_g.weight]),
            cat([self.linear_a_g.bias, self.linear_b_g.bias]),
        )


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Algorithm 11: ``x_ij = Σ_k a_ik b_jk``."""

    __init__ = partialmethod(TriangleMultiplicativeUpdate.__init__, _outgoing=True)


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Algorithm 12: ``x_ij = Σ_k a_ki b_kj``."""

    __init__ = partialmethod(TriangleMultiplicativeUpdate.__init__, _outgoing=False)


class FusedTriangleMultiplicativeUpdate(_TriangleMultiplicationBase):
    """AF-Multimer v2.3 variant: one projection and one gate make both a and b
    (``linear_ab_p``, ``linear_ab_g``: channels ``[0, Ch)`` are a, ``[Ch, 2·Ch)`` are b)."""

    def __init__(self, c_z: int, c_hidden: int, _outgoing: bool = True):
        super().__init__(c_z, c_hidden, _outgoing)
        self.linear_ab_p = Linear(c_z, 2 * c_hidden)
        self.linear_ab_g = Linear(c_z, 2 * c_hidden, init="gating")

    def _input_projections(self):
        p, g = self.linear_ab_p, self.linear_ab_g
        return p.weight, p.bias, g.weight, g.bias


class FusedTriangleMultiplicationOutgoing(FusedTriangleMultiplicativeUpdate):
    """Fused-projection Algorithm 11."""

    __init__ = partialmethod(FusedTriangleMultiplicativeUpdate.__init__, _outgoing=True)


class FusedTriangleMultiplicationIncoming(FusedTriangleMultiplicativeUpdate):
    """Fused-projection Algorithm 12."""

    __init__ = partialmethod(FusedTriangleMultiplicativeUpdate.__init__, _outgoing=False)
