"""Rank-``r`` factorized pair representation (approximate mode for chains of thousands of residues).

The dense model keeps the pair tensor ``z`` ``[B, N, N, C]``. Here it is kept as two factors and
never materialised:

    z_ij = Σ_k left_ik ⊙ right_jk        (elementwise over the C channels; left, right [B, N, r, C])

(the form of Flash-IPA). Every module below works on the factors, in memory linear in ``N``;
only IPA's attention is O(N²), in time, and in memory O(chunk·N·H·(3·Pq + 5)) with ``chunk_size``
(its logits and point differences; unchunked, the point differences alone are N²·H·3·Pq values).
Costs below count multiply-adds for one chain, with ``H`` IPA heads and ``Ch`` the tri-mul width.

**Pair features** (:class:`FactorizedPairFeatureNet`): ``left = (Linear(s) + Linear_g(φ))·m``,
likewise ``right``, each ``Linear(c_s, r·C)`` with a bias and ``Linear_g(S·M, r·C)`` without;
O(N·(c_s + S·M)·r·C) time, O(N·r·C) memory. With the biases, rank 2 holds Genie's additive term
``Lin_i(s_i) + Lin_j(s_j)`` exactly (``left_i = (Lin_i(s_i), 1)``, ``right_j = (1, Lin_j(s_j))``,
the ones from the biases). ``s`` is a linear map of Genie's sinusoidal residue-index encoding,
and a product of two such features can express relative position,
``cos ω(i-j) = cos ωi·cos ωj + sin ωi·sin ωj`` (rank 2 per frequency), so the clipped one-hot
relative position of the dense net is replaced by what the factors learn of it.

The structure enters through ``φ`` (:func:`nystrom_features`): per residue, ``S·M`` numbers (by
default ``M = 16`` landmarks, ``S = 4`` widths σ = 4, 8, 16, 32 Å: 64) whose inner product
``φ_σ(i)·φ_σ(j)`` is the rank-``M`` Nyström approximation of the Gaussian kernel
``exp(-d_ij²/2σ²)`` of the noisy Cα distances, built from the distances to ``M`` landmark
residues spread evenly along the chain. This stands in for Genie's distance template
``Lin(d_ij)``, which is not low-rank with invariant factors: the squared distance is exactly
rank 5 (``|x_i|² - 2 x_i·x_j + |x_j|²``), but its factors are the coordinates themselves, which
rotate with the chain, and the factor-wise LayerNorms and gates of the pair layers would then
make the model depend on the global orientation. ``φ`` depends only on distances, so the
factors, the pair stack and IPA's logits are invariant and the predicted noise rotates with the
input. What the pair input can hold of the geometry: each channel ``c`` of ``z_ij`` contains a
bilinear form ``φ_i·A_c φ_j`` of rank at most ``r`` (the products of the two geometry maps, plus
cross terms with ``s``); a linear read-out over the ``C`` channels, such as IPA's pair bias or the
triangle updates' projections, holds any bilinear form of rank ``≤ min(S·M, r·C)``, the
Nyström kernels themselves included. It is an approximation twice over: Nyström's (exact for
pairs involving a landmark, coarse for residues far from all landmarks at small σ) and the
learned projection.

**IPA** (:class:`FactorizedIPA`), exact with respect to dense IPA on ``pair.materialize()``
(same module, same weights, same numbers up to rounding):

    pair bias    b_ij^h = Σ_c W_hc z_ij[c] + β_h = Σ_{k,c} (W_hc left_ik[c]) right_jk[c] + β_h
    pair values  o_i^h  = Σ_j a_ij^h z_ij        = Σ_k left_ik ⊙ (Σ_j a_ij^h right_jk)

The bias is a dot product over ``(k, c)`` and the pair values are attention over the right factors
followed by a product with the left ones: O(N²·H·r·C) time beside the dense IPA's other terms,
memory O(N·H·r·C + chunk·N·H·(3·Pq + 5)) instead of the O(N²·C) pair tensor.

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

from typing import NamedTuple

import torch
from torch import nn

from flash_genie.model.ipa import InvariantPointAttention, PairTerms
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


#: Default landmarks and kernel widths (Å) of the factorized pair features' geometry.
LANDMARKS = 16
BANDWIDTHS = (4.0, 8.0, 16.0, 32.0)


def landmark_index(mask: torch.Tensor, n_landmarks: int) -> torch.Tensor:
    """``[B, M]`` residue indices of ``M = n_landmarks`` landmarks spread evenly over each
    chain's real residues: the real residue of rank ``floor((m + ½)·n / M)`` for ``n`` real
    residues (repeats when ``n < M``; index 0 for a chain with none). A function of the mask
    only, so it does not move with the coordinates."""
    real = mask != 0
    counts = real.long().cumsum(-1)  # [B, N]
    n_real = counts[:, -1:]
    m = torch.arange(n_landmarks, device=mask.device)
    rank = ((2 * m + 1) * n_real) // (2 * n_landmarks)  # [B, M] in [0, n)
    index = torch.searchsorted(counts, rank + 1)  # first position whose count reaches rank + 1
    return index.clamp(max=mask.shape[-1] - 1)


def nystrom_features(
    x: torch.Tensor,
    mask: torch.Tensor,
    n_landmarks: int = LANDMARKS,
    bandwidths: tuple[float, ...] = BANDWIDTHS,
    jitter: float = 1e-4,
) -> torch.Tensor:
    """SE(3)-invariant per-residue features ``φ`` ``[B, N, S·M]`` whose inner products are the
    rank-``M`` Nyström approximation of the Gaussian distance kernels
    ``K_σ(i, j) = exp(-|x_i - x_j|² / 2σ²)``, one block of ``M`` per width ``σ`` (``S`` of them):

        ``φ_σ(i)·φ_σ(j) = K_σ(i, L) (K_σ(L, L) + jitter·I)⁻¹ K_σ(L, j)``

    with the landmarks ``L`` of :func:`landmark_index` (``φ_σ(i) = L_σ⁻¹ K_σ(L, i)``, ``L_σ`` the
    Cholesky factor of ``K_σ(L, L) + jitter·I``). Exact (up to the jitter) for the pairs that
    involve a landmark, and for all pairs when every residue is one (``M = N``). Only
    distances enter, so ``φ`` is invariant to rotations and translations of ``x``.
    O(N·M·S) time and memory, plus an ``M × M`` Cholesky per width. Zero at padded residues.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work)
    index = landmark_index(mask, n_landmarks)  # [B, M]
    landmarks = torch.gather(xw, 1, index.unsqueeze(-1).expand(-1, -1, 3))  # [B, M, 3]
    # Squared distances as sums of squared differences (no |a|² + |b|² - 2a·b cancellation).
    d_nm = (xw.unsqueeze(2) - landmarks.unsqueeze(1)).square().sum(-1)  # [B, N, M]
    d_mm = (landmarks.unsqueeze(2) - landmarks.unsqueeze(1)).square().sum(-1)  # [B, M, M]
    widths = torch.tensor(bandwidths, dtype=work, device=x.device).view(-1, 1, 1, 1)  # [S, 1, 1, 1]
    k_nm = torch.exp(-d_nm / (2 * widths**2))  # [S, B, N, M]
    k_mm = torch.exp(-d_mm / (2 * widths**2))  # [S, B, M, M]
    eye = torch.eye(n_landmarks, dtype=work, device=x.device)
    chol = torch.linalg.cholesky(k_mm + jitter * eye)
    phi = torch.linalg.solve_triangular(chol, k_nm.transpose(-1, -2), upper=False)  # [S, B, M, N]
    phi = phi.permute(1, 3, 0, 2).flatten(-2)  # [B, N, S*M]
    return phi * mask.to(work).unsqueeze(-1)


class FactorizedPairFeatureNet(nn.Module):
    """Pair features as factors: ``left = (Linear(s) + Linear_g(φ))·m``, likewise ``right``
    (``c_s -> r·c_p`` with biases, ``S·M -> r·c_p`` without), with ``φ`` the invariant Nyström
    features of the noisy coordinates (:func:`nystrom_features`), so ``z_ij = Σ_k left_ik ⊙ right_jk``
    depends on the structure and is masked by ``m_i m_j``.

    Rank 2 contains Genie's ``Lin_i(s_i) + Lin_j(s_j)`` exactly; relative position is what products
    of the position features in ``s`` express; the geometry term is the module docstring's.
    """

    def __init__(
        self,
        c_s: int,
        c_p: int,
        rank: int,
        n_landmarks: int = LANDMARKS,
        bandwidths: tuple[float, ...] = BANDWIDTHS,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if n_landmarks < 1:
            raise ValueError(f"n_landmarks must be >= 1, got {n_landmarks}")
        if not bandwidths or any(b <= 0 for b in bandwidths):
            raise ValueError(f"bandwidths must be positive widths in Å, got {bandwidths!r}")
        self.rank = rank
        self.c_p = c_p
        self.n_landmarks = n_landmarks
        self.bandwidths = tuple(float(b) for b in bandwidths)
        self.linear_left = nn.Linear(c_s, rank * c_p)
        self.linear_right = nn.Linear(c_s, rank * c_p)
        n_geometry = n_landmarks * len(self.bandwidths)
        self.linear_geometry_left = nn.Linear(n_geometry, rank * c_p, bias=False)
        self.linear_geometry_right = nn.Linear(n_geometry, rank * c_p, bias=False)

    def forward(self, s: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> FactorPair:
        """``s`` ``[B, N, c_s]``, noisy Cα ``x`` ``[B, N, 3]``, ``mask`` ``[B, N]`` -> factors
        ``[B, N, r, c_p]``, zero at padded residues."""
        if s.dim() != 3 or tuple(mask.shape) != tuple(s.shape[:2]):
            raise ValueError(
                f"s must be [B, N, c_s] and mask [B, N], got {tuple(s.shape)} and {tuple(mask.shape)}"
            )
        if tuple(x.shape) != (*s.shape[:2], 3):
            raise ValueError(
                f"x must be [B, N, 3] = {(*s.shape[:2], 3)} Cα coordinates, got {tuple(x.shape)}"
            )
        phi = nystrom_features(x, mask, self.n_landmarks, self.bandwidths).to(s.dtype)
        m = mask.to(self.linear_left.weight.dtype)[..., None, None]
        shape = (self.rank, self.c_p)
        left = (self.linear_left(s) + self.linear_geometry_left(phi)).unflatten(-1, shape) * m
        right = (self.linear_right(s) + self.linear_geometry_right(phi)).unflatten(-1, shape) * m
        return FactorPair(left, right)


class FactorizedIPA(InvariantPointAttention):
    """:class:`~flash_genie.model.ipa.InvariantPointAttention` on a :class:`FactorPair`.

    Same constructor, parameters and ``state_dict`` keys as the dense module, and the same result
    as the dense module on ``z.materialize()`` (module docstring), without the ``[N, N, C]`` pair:
    only the pair hooks differ (:func:`factor_pair_terms`). ``chunk_size`` chunks the query rows
    as in the dense module, so at most ``[B, H, chunk, N]`` logits and ``[B, chunk, H, r, c_z]``
    factor products exist at a time.
    """

    def forward(self, s: torch.Tensor, z: FactorPair, frames: Rigid, mask: torch.Tensor) -> torch.Tensor:
        """``s`` ``[B, N, c_s]``, ``z`` factors ``[B, N, r, c_z]``, frames ``[B, N]``,
        ``mask`` ``[B, N]`` -> update of ``s``, ``[B, N, c_s]``."""
        check_factor_pair("z", z, mask, self.linear_b.in_features)
        return super().forward(s, z, frames, mask)

    def pair_terms(self, z: FactorPair) -> PairTerms:
        return factor_pair_terms(z)


def factor_pair_terms(z: FactorPair) -> PairTerms:
    """IPA's pair hooks for factors ``left`` (rows ``I``) and ``right`` (keys ``J``), ``[B, ·, r, c_z]``:
    bias ``Σ_{k,c} (W_hc left_ik[c]) right_jk[c] + β_h``, values ``Σ_k left_ik ⊙ (Σ_j a_ij right_jk)``."""
    return PairTerms((z.left,), (z.right,), factor_bias, factor_values)


def factor_bias(ipa, rows, keys):
    (left,), (right,) = rows, keys
    weighted_left = (left.unsqueeze(2) * ipa.linear_b.weight[:, None, :]).flatten(-2)  # [B, I, H, r*c_z]
    pair_bias = torch.einsum("bihx,bjx->bhij", weighted_left, right.flatten(-2))
    return pair_bias + ipa.linear_b.bias[:, None, None]


def factor_values(ipa, attn, rows, keys):
    (left,), (right,) = rows, keys
    attended_right = torch.einsum("bhij,bjkc->bihkc", attn.to(right.dtype), right)  # [B, I, H, r, c_z]
    return torch.einsum("bihkc,bikc->bihc", attended_right, left).flatten(-2)  # [B, I, H*c_z]
