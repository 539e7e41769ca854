"""Rank-``r`` factorized pair representation (approximate mode for chains of thousands of residues).

The dense model keeps the pair tensor ``z`` ``[B, N, N, C]``. Here it is kept as two factors and
never materialised:

    z_ij = Σ_k left_ik ⊙ right_jk        (elementwise over the C channels; left, right [B, N, r, C])

(the form of Flash-IPA). Every module below works on the factors, in memory linear in ``N``;
only IPA's attention logits are O(N²), in time, and in memory O(chunk·N·H) with ``chunk_size``.
Costs below count multiply-adds for one chain, with ``H`` IPA heads and ``Ch`` the tri-mul width.

**Pair features** (:class:`FactorizedPairFeatureNet`): ``left = Linear(s)·m``,
``right = Linear(s)·m``, each ``Linear(c_s, r·C)`` with a bias; O(N·c_s·r·C) time, O(N·r·C)
memory. With the biases, rank 2 holds Genie's additive term ``Lin_i(s_i) + Lin_j(s_j)`` exactly
(``left_i = (Lin_i(s_i), 1)``, ``right_j = (1, Lin_j(s_j))``, the ones from the biases). ``s`` is a
linear map of Genie's sinusoidal residue-index encoding, and a product of two such features can
express relative position, ``cos ω(i-j) = cos ωi·cos ωj + sin ωi·sin ωj`` (rank 2 per frequency;
the encoding's cos channel ``2t+2`` and sin channel ``2t+1`` share a frequency), so the clipped
one-hot relative position of the dense net is replaced by what the factors learn of it. Genie's
distance template ``Lin(d_ij)`` is not low-rank and is dropped: the geometry reaches IPA through
its point term. The squared distance is exactly rank 5 (``|x_i|² - 2 x_i·x_j + |x_j|²``), but its
factors are the coordinates themselves, which rotate with the chain: the factor-wise LayerNorms
and gates of the pair layers would then make the model depend on the global orientation, so it
is left out too.

**IPA** (:class:`FactorizedIPA`), exact with respect to dense IPA on ``pair.materialize()``
(same module, same weights, same numbers up to rounding):

    pair bias    b_ij^h = Σ_c W_hc z_ij[c] + β_h = Σ_{k,c} (W_hc left_ik[c]) right_jk[c] + β_h
    pair values  o_i^h  = Σ_j a_ij^h z_ij        = Σ_k left_ik ⊙ (Σ_j a_ij^h right_jk)

The bias is a dot product over ``(k, c)`` and the pair values are attention over the right factors
followed by a product with the left ones: O(N²·H·r·C) time beside the dense IPA's other terms,
memory O(N·H·r·C + chunk·N·H) instead of the O(N²·C) pair tensor.

**Pair update** (:class:`FactorizedPairTransformLayer`): triangle multiplicative updates whose
product over the third residue ``m`` is computed *exactly* from Gram statistics. With
``a = (Pa(U), Qa(V))`` and ``b = (Pb(U), Qb(V))``, ``U``, ``V`` the layer-normalised left and right
factors and ``P·``, ``Q·`` gated projections to ``Ch`` channels (masked):

    outgoing  out_ij = Σ_m a_im ⊙ b_jm = Σ_{k,l} Pa(U_i)_k ⊙ G_kl ⊙ Pb(U_j)_l,  G_kl = Σ_m Qa(V_m)_k ⊙ Qb(V_m)_l
    incoming  out_ij = Σ_m a_mi ⊙ b_mj = Σ_{k,l} Qa(V_i)_k ⊙ H_kl ⊙ Qb(V_j)_l,  H_kl = Σ_m Pa(U_m)_k ⊙ Pb(U_m)_l

(:func:`factor_triangle_outgoing`, :func:`factor_triangle_incoming`): a rank-``r²`` factor pair in
O(N·r²·Ch) time and memory, against the dense tri-mul's O(N³·Ch) time and O(N²·Ch) memory (the
projections around it cost O(N·r·C·Ch), the recompression O(N·r³·Ch + N·r·Ch·C)). The
Gram matrices are divided by the number of real residues, so the scale of the product does not
grow with ``N`` (the dense tri-mul normalises its output with a LayerNorm over ``z_ij``'s channels
instead, which has no factor form). What is approximate, and learned around that exact product:

- the factor-wise LayerNorm, gates and projections: the dense layer normalises and gates
  ``z_ij``, which is not a function of ``left_i`` and ``right_j`` separately;
- the recompression of the rank-``r²``, ``Ch``-wide product back to rank ``r`` and width ``C``: a
  learned map of the rank index (``r² -> r``) and a ``Linear(Ch, C)`` on each side;
- the residual is added to the factors, so the new pair is ``(left + Δl)·(right + Δr)``, which
  holds the cross terms ``Δl·right + left·Δr + Δl·Δr`` instead of the dense ``z + out``;
- the transition is Genie's pair transition applied to each factor instead of to ``z_ij``.

Dropout (training only) drops update channels of a residue's factor for all ``r`` rank slots at
once. The output projections start at zero, so a fresh layer is the identity, as in Genie.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flash_genie.model.chunking import chunked
from flash_genie.model.ipa import InvariantPointAttention
from flash_genie.model.pair_stack import PairTransition
from flash_genie.model.primitives import Linear, SharedDropout
from flash_genie.model.rigid import Rigid

__all__ = [
    "FactorPair",
    "FactorizedIPA",
    "FactorizedPairFeatureNet",
    "FactorizedPairTransformLayer",
    "FactorizedTriangleMultiplication",
    "check_factor_pair",
    "factor_triangle_incoming",
    "factor_triangle_outgoing",
]


class FactorPair(NamedTuple):
    """A pair representation ``z_ij = Σ_k left_ik ⊙ right_jk`` kept as its factors.

    ``left``, ``right``: ``[B, N, r, C]``.
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-2]

    def materialize(self) -> torch.Tensor:
        """The dense pair ``[B, N, N, C]`` (O(N²·C) memory: tests and small ``N`` only)."""
        return torch.einsum("bikc,bjkc->bijc", self.left, self.right)

    def transpose(self) -> FactorPair:
        """The factors of ``z_ji``: left and right swapped."""
        return FactorPair(self.right, self.left)


def check_factor_pair(
    name: str, pair: FactorPair, mask: torch.Tensor, channels: int | None = None
) -> None:
    """Raise if ``pair`` is not a :class:`FactorPair` of two ``[B, N, r, C]`` tensors matching
    ``mask`` ``[B, N]`` (and ``C == channels`` when given)."""
    if not isinstance(pair, FactorPair):
        raise TypeError(
            f"{name} must be a FactorPair of [B, N, r, C] factors, got {type(pair).__name__}"
        )
    left, right = pair
    if left.dim() != 4 or left.shape != right.shape:
        raise ValueError(
            f"{name}.left and {name}.right must both be [B, N, r, C], got "
            f"{tuple(left.shape)} and {tuple(right.shape)}"
        )
    if tuple(mask.shape) != tuple(left.shape[:2]):
        raise ValueError(
            f"mask must be [B, N] = {tuple(left.shape[:2])} like {name}, got {tuple(mask.shape)}"
        )
    if channels is not None and left.shape[-1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels (the module's c_p), got {left.shape[-1]}"
        )


def _factor_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` ``[B, N]`` as ``[B, N, 1, 1]`` in ``like``'s dtype (0/1 are exact in any dtype)."""
    return mask.to(like.dtype)[..., None, None]


def factor_triangle_outgoing(a: FactorPair, b: FactorPair, mask: torch.Tensor) -> FactorPair:
    """Outgoing triangle product ``out_ij = Σ_m a'_im ⊙ b'_jm`` of two factor pairs, exactly.

    ``a`` ``[B, N, ra, C]``, ``b`` ``[B, N, rb, C]`` factors, ``mask`` ``[B, N]``; ``a'``, ``b'``
    are ``a``, ``b`` times the pair mask ``m_i m_j`` (AF2 Algorithm 11's masking). Returns the
    factors ``[B, N, ra·rb, C]`` of ``out``, rank index ``(k, l)`` k-major:
    ``left_i(k,l) = a.left_ik ⊙ G_kl``, ``right_j(k,l) = b.left_jl``, with the Gram statistics
    ``G_kl = Σ_m a.right_mk ⊙ b.right_ml`` ``[B, ra, rb, C]``. O(N·ra·rb·C) time and memory.
    """
    a_left, a_right = (t * _factor_mask(mask, t) for t in a)
    b_left, b_right = (t * _factor_mask(mask, t) for t in b)
    gram = torch.einsum("bmkc,bmlc->bklc", a_right, b_right)
    left = (a_left.unsqueeze(3) * gram.unsqueeze(1)).flatten(2, 3)
    right = b_left.unsqueeze(2).expand(-1, -1, a_left.shape[2], -1, -1).flatten(2, 3)
    return FactorPair(left, right)


def factor_triangle_incoming(a: FactorPair, b: FactorPair, mask: torch.Tensor) -> FactorPair:
    """Incoming triangle product ``out_ij = Σ_m a'_mi ⊙ b'_mj`` (AF2 Algorithm 12), exactly.

    The outgoing product of the transposed pairs (``a_mi = aᵀ_im``), so the Gram statistics are
    ``H_kl = Σ_m a.left_mk ⊙ b.left_ml`` and the factors ``a.right_ik ⊙ H_kl`` and
    ``b.right_jl``. Shapes as :func:`factor_triangle_outgoing`.
    """
    return factor_triangle_outgoing(a.transpose(), b.transpose(), mask)


class _FactorSide(nn.Module):
    """The parameters of one side (left or right factors) of :class:`FactorizedTriangleMultiplication`."""

    def __init__(self, c_p: int, rank: int, c_hidden: int):
        super().__init__()
        self.c_hidden = c_hidden
        self.layer_norm = nn.LayerNorm(c_p)
        self.linear_ab_p = Linear(c_p, 2 * c_hidden)
        self.linear_ab_g = Linear(c_p, 2 * c_hidden)
        self.linear_rank = Linear(rank * rank, rank, bias=False)
        self.linear_z = Linear(c_hidden, c_p, init="final")
        self.linear_g = Linear(c_p, c_p)

    def project(self, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``factor`` ``[B, N, r, C]`` -> (normalised factor ``[B, N, r, C]``, the gated
        projections for ``a`` and ``b``, each ``[B, N, r, Ch]``)."""
        u = self.layer_norm(factor)
        ab = self.linear_ab_p(u) * torch.sigmoid(self.linear_ab_g(u))
        a, b = ab.split(self.c_hidden, dim=-1)
        return u, a, b

    def update(self, u: torch.Tensor, product: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Recompress one side of the product, ``[B, N, r², Ch]`` -> gated update ``[B, N, r, C]``."""
        mixed = self.linear_rank(product.transpose(-1, -2)).transpose(-1, -2)
        update = torch.sigmoid(self.linear_g(u)) * self.linear_z(mixed)
        return update * _factor_mask(mask, update)


class FactorizedTriangleMultiplication(nn.Module):
    """Triangle multiplicative update of a :class:`FactorPair`, outgoing or incoming.

    The triangle product of the factorized ``a`` and ``b`` is exact
    (:func:`factor_triangle_outgoing`, :func:`factor_triangle_incoming`), its Gram statistics
    divided by the number of real residues; the normalisation, gates and the recompression to
    rank ``r`` act on each factor (see the module docstring for what that approximates).
    Parameters: ``left.*`` and ``right.*``, each a LayerNorm, ``linear_ab_p``/``linear_ab_g``
    ``C -> 2·Ch``, ``linear_rank`` ``r² -> r``, ``linear_z`` ``Ch -> C`` (zero at init) and the
    output gate ``linear_g``.
    """

    def __init__(self, c_p: int, rank: int, c_hidden: int, outgoing: bool):
        super().__init__()
        self.outgoing = outgoing
        self.left = _FactorSide(c_p, rank, c_hidden)
        self.right = _FactorSide(c_p, rank, c_hidden)

    def forward(self, pair: FactorPair, mask: torch.Tensor) -> FactorPair:
        """``pair`` factors ``[B, N, r, C]``, ``mask`` ``[B, N]`` -> the update's factors
        ``[B, N, r, C]``, zero at padded residues."""
        u_left, a_left, b_left = self.left.project(pair.left)
        u_right, a_right, b_right = self.right.project(pair.right)
        a, b = FactorPair(a_left, a_right), FactorPair(b_left, b_right)
        triangle = factor_triangle_outgoing if self.outgoing else factor_triangle_incoming
        product = triangle(a, b, mask)
        # Counted in the factors' stream dtype: bf16 would round chain lengths above 256.
        n_real = mask.to(pair.left.dtype).sum(dim=-1).clamp(min=1)
        product_left = product.left / n_real[:, None, None, None]
        return FactorPair(
            self.left.update(u_left, product_left, mask),
            self.right.update(u_right, product.right, mask),
        )


class FactorizedPairTransformLayer(nn.Module):
    """One factorized pair layer, in Genie's order, each update added residually to the factors:
    tri-mul outgoing, tri-mul incoming, transition (Genie's pair transition on each factor); then
    the mask. Dropout (training only) on the tri-mul updates, shared over the rank index.

    Memory O(N·r²·Ch) per layer; a fresh layer is the identity.
    """

    def __init__(
        self, c_p: int, rank: int, c_hidden_mul: int, pair_transition_n: int, dropout: float
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.c_p = c_p
        self.tri_mul_out = FactorizedTriangleMultiplication(c_p, rank, c_hidden_mul, outgoing=True)
        self.tri_mul_in = FactorizedTriangleMultiplication(c_p, rank, c_hidden_mul, outgoing=False)
        self.transition_left = PairTransition(c_p, pair_transition_n)
        self.transition_right = PairTransition(c_p, pair_transition_n)
        self.dropout = SharedDropout(dropout, shared_dim=-2)

    def forward(self, pair: FactorPair, mask: torch.Tensor) -> FactorPair:
        """``pair`` factors ``[B, N, r, c_p]``, ``mask`` ``[B, N]`` -> new factors
        ``[B, N, r, c_p]``, zero at padded residues."""
        check_factor_pair("pair", pair, mask, self.c_p)
        for tri_mul in (self.tri_mul_out, self.tri_mul_in):
            update = tri_mul(pair, mask)
            pair = FactorPair(
                pair.left + self.dropout(update.left), pair.right + self.dropout(update.right)
            )
        row_mask = mask.unsqueeze(-1)  # [B, N, 1]: the transition masks [B, N, r, C] by it
        left = pair.left + self.transition_left(pair.left, row_mask)
        right = pair.right + self.transition_right(pair.right, row_mask)
        return FactorPair(left * _factor_mask(mask, left), right * _factor_mask(mask, right))


class FactorizedPairFeatureNet(nn.Module):
    """Pair features as factors: ``left = Linear(s)·m``, ``right = Linear(s)·m`` (``c_s -> r·c_p``,
    with biases), so ``z_ij = Σ_k left_ik ⊙ right_jk`` is masked by ``m_i m_j``.

    Rank 2 contains Genie's ``Lin_i(s_i) + Lin_j(s_j)`` exactly; relative position is what products
    of the position features in ``s`` express; the distance template is dropped (module docstring).
    """

    def __init__(self, c_s: int, c_p: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.c_p = c_p
        self.linear_left = nn.Linear(c_s, rank * c_p)
        self.linear_right = nn.Linear(c_s, rank * c_p)

    def forward(self, s: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> FactorPair:
        """``s`` ``[B, N, c_s]``, noisy Cα ``x`` ``[B, N, 3]``, ``mask`` ``[B, N]`` -> factors
        ``[B, N, r, c_p]``, zero at padded residues.

        ``x`` is checked but not used: the dense net's distance template has no exact low-rank
        form with rotation-invariant factors.
        """
        if s.dim() != 3 or tuple(mask.shape) != tuple(s.shape[:2]):
            raise ValueError(
                f"s must be [B, N, c_s] and mask [B, N], got {tuple(s.shape)} and {tuple(mask.shape)}"
            )
        if tuple(x.shape) != (*s.shape[:2], 3):
            raise ValueError(
                f"x must be [B, N, 3] = {(*s.shape[:2], 3)} Cα coordinates, got {tuple(x.shape)}"
            )
        m = mask.to(self.linear_left.weight.dtype)[..., None, None]
        left = self.linear_left(s).unflatten(-1, (self.rank, self.c_p)) * m
        right = self.linear_right(s).unflatten(-1, (self.rank, self.c_p)) * m
        return FactorPair(left, right)


class FactorizedIPA(InvariantPointAttention):
    """:class:`~flash_genie.model.ipa.InvariantPointAttention` on a :class:`FactorPair`.

    Same constructor, parameters and ``state_dict`` keys as the dense module, and the same result
    as the dense module on ``z.materialize()`` (module docstring), without the ``[N, N, C]`` pair:
    the pair bias is ``Σ_{k,c} (W_hc left_ik[c]) right_jk[c] + β_h`` and the attended pair
    features ``Σ_k left_ik ⊙ (Σ_j a_ij^h right_jk)``. ``chunk_size`` chunks the query rows as in
    the dense module, so at most ``[B, H, chunk, N]`` logits and ``[B, chunk, H, r, c_z]``
    factor products exist at a time.
    """

    def forward(
        self, s: torch.Tensor, z: FactorPair, frames: Rigid, mask: torch.Tensor
    ) -> torch.Tensor:
        """``s`` ``[B, N, c_s]``, ``z`` factors ``[B, N, r, c_z]``, frames ``[B, N]``,
        ``mask`` ``[B, N]`` -> update of ``s``, ``[B, N, c_s]``."""
        check_factor_pair("z", z, mask, self.linear_b.in_features)
        h, c, pq, pv = self.no_heads, self.c_hidden, self.no_qk_points, self.no_v_points
        q = self.linear_q(s).unflatten(-1, (h, c))  # [B, N, H, C]
        k, v = self.linear_kv(s).unflatten(-1, (h, 2 * c)).split(c, dim=-1)
        q_pts = self._points(self.linear_q_points(s), frames, pq)  # [B, N, H, Pq, 3]
        k_pts, v_pts = self._points(self.linear_kv_points(s), frames, pq + pv).split(
            [pq, pv], dim=-2
        )
        rows, shared = (q, q_pts, z.left, mask), (k, v, k_pts, v_pts, mask, z.right)
        if self.chunk_size is None:
            attended = self._attend(*rows, *shared)
        else:
            params = (self.linear_b.weight, self.linear_b.bias, self.head_weights)
            attended = chunked(self._attend, rows, shared, params, chunk_size=self.chunk_size)
        o, o_pt, o_pair = attended.split([h * c, h * pv * 3, h * z.left.shape[-1]], dim=-1)
        o_pt = frames.invert_apply(o_pt.unflatten(-1, (h * pv, 3)))  # [B, N, H*Pv, 3]
        o_pt_norm = torch.sqrt(torch.sum(o_pt**2, dim=-1) + self.eps)
        return self.linear_out(torch.cat([o, *o_pt.unbind(-1), o_pt_norm, o_pair], dim=-1))

    def _attend(self, q, q_pts, left, mask, k, v, k_pts, v_pts, mask_k, right) -> torch.Tensor:
        """Attention of the query rows ``I`` over the keys ``J`` with the pair given by its
        factors (``left`` of the rows ``[B, I, r, c_z]``, ``right`` of the keys ``[B, J, r, c_z]``):
        ``[o | o_pt | o_pair]`` ``[B, I, H·C + H·Pv·3 + H·c_z]``, value points in the global frame."""
        c, pq = self.c_hidden, self.no_qk_points
        # The terms in the dense module's order, so that float64 results agree to rounding.
        logits = torch.einsum("bihc,bjhc->bhij", q, k) * math.sqrt(1.0 / (3 * c))  # [B, H, I, J]
        # [B, I, H, r*c_z]
        weighted_left = (left.unsqueeze(2) * self.linear_b.weight[:, None, :]).flatten(-2)
        pair_bias = torch.einsum("bihx,bjx->bhij", weighted_left, right.flatten(-2))
        logits = logits + math.sqrt(1.0 / 3) * (pair_bias + self.linear_b.bias[:, None, None])
        diff = q_pts.flatten(-2).unsqueeze(2) - k_pts.flatten(-2).unsqueeze(1)  # [B, I, J, H, Pq*3]
        sq_dist = torch.einsum("...k,...k->...", diff, diff)  # [B, I, J, H]
        point_weight = F.softplus(self.head_weights) * math.sqrt(1.0 / (3 * (pq * 9.0 / 2)))
        logits = logits + (-0.5 * sq_dist * point_weight).permute(0, 3, 1, 2)
        pair_mask = mask.unsqueeze(-1) * mask_k.unsqueeze(-2)
        logits = logits + (self.inf * (pair_mask.to(logits.dtype) - 1)).unsqueeze(1)
        attn = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))

        o = torch.einsum("bhij,bjhc->bihc", attn, v).flatten(-2)  # [B, I, H*C]
        o_pt = torch.einsum("bhij,bjhpx->bihpx", attn, v_pts).flatten(-3)  # [B, I, H*Pv*3]
        attended_right = torch.einsum("bhij,bjkc->bihkc", attn, right)  # [B, I, H, r, c_z]
        o_pair = torch.einsum("bihkc,bikc->bihc", attended_right, left).flatten(-2)  # [B, I, H*c_z]
        return torch.cat([o, o_pt, o_pair], dim=-1)
