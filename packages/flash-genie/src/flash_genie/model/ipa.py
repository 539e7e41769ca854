"""Invariant point attention (AlphaFold 2 Algorithm 22), in Genie's OpenFold-v1 form."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flash_genie.model.chunking import chunked, resolve_chunk
from flash_genie.model.primitives import Linear
from flash_genie.model.rigid import Rigid


class InvariantPointAttention(nn.Module):
    """IPA over single ``s`` ``[B, N, c_s]`` and pair ``z`` ``[B, N, N, c_z]`` features.

    Logits per head ``h`` are ``sqrt(1/3C)·q_i·k_j + sqrt(1/3)·b_ij
    - ½·softplus(w_h)·sqrt(2/(9·Pq))·Σ_p |T_i q_ip - T_j k_jp|² + inf·(m_i m_j - 1)``;
    the output concatenates, head-major, the scalar values ``[H·C]``, the value
    points in the local frame as x, y, z blocks ``[3 × H·Pv]``, their norms
    ``[H·Pv]`` and the attended pair features ``[H·c_z]``.

    The mask enters as a finite bias (``inf = 1e5``) like the original: a padded
    query row then attends uniformly, and at real rows padded keys get exactly
    zero weight in float32/float64.

    ``chunk_size`` (default ``None``: all rows at once) computes the attention in
    blocks of query rows, recomputed in backward, so that only ``chunk · N`` rows
    of logits, point differences and attended pair features exist at a time: extra
    memory O(chunk·N·(H·(2 + 3·Pq) + c_z)) instead of O(N²·…). Same numbers.
    ``"auto"`` picks the rows per call so that one block's point differences, logits and
    softmax (``B·chunk·N·H·(3·Pq + 5)`` values) stay near 2²² values
    (:func:`~flash_genie.model.chunking.resolve_chunk`): the block's memory is then the
    same at every ``N`` and what grows is per residue (time grows as N²).

    The pair enters only through :meth:`pair_terms` (its bias and its attended values):
    the factorized and low-rank + sparse modes override that hook and reuse the rest.
    """

    def __init__(
        self,
        c_s: int,
        c_z: int,
        c_hidden: int,
        no_heads: int,
        no_qk_points: int,
        no_v_points: int,
        inf: float = 1e5,
        eps: float = 1e-8,
    ):
        super().__init__()
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.no_qk_points = no_qk_points
        self.no_v_points = no_v_points
        self.inf = inf
        self.eps = eps
        hc = no_heads * c_hidden
        self.linear_q = Linear(c_s, hc)
        self.linear_kv = Linear(c_s, 2 * hc)
        self.linear_q_points = Linear(c_s, no_heads * no_qk_points * 3)
        self.linear_kv_points = Linear(c_s, no_heads * (no_qk_points + no_v_points) * 3)
        self.linear_b = Linear(c_z, no_heads)
        # softplus(0.5413...) = 1: the point term starts at unit weight.
        self.head_weights = nn.Parameter(torch.full((no_heads,), 0.541324854612918))
        self.linear_out = Linear(no_heads * (c_z + c_hidden + 4 * no_v_points), c_s, init="final")
        self.chunk_size: int | str | None = None

    def _points(self, flat: torch.Tensor, frames: Rigid, n_points: int) -> torch.Tensor:
        """``[B, N, 3·H·P]`` (x block, y block, z block) -> global points ``[B, N, H, P, 3]``."""
        local = flat.unflatten(-1, (3, -1)).transpose(-1, -2)  # [B, N, H*P, 3]
        return frames.apply(local).unflatten(-2, (self.no_heads, n_points))

    def forward(
        self,
        s: torch.Tensor,
        z: torch.Tensor,
        frames: Rigid,
        mask: torch.Tensor,
        keys: tuple[torch.Tensor, Rigid, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``s`` ``[B, N, c_s]``, ``z`` ``[B, N, N, c_z]``, frames ``[B, N]``, ``mask`` ``[B, N]``
        -> update of ``s``, ``[B, N, c_s]``. ``z`` may also be :class:`PairTerms` (the hooks of
        another pair representation), used as given.

        ``keys = (s_k, frames_k, mask_k)`` of all ``N`` residues makes ``s``, ``frames``,
        ``mask`` and the rows of ``z`` those of the queries only (``I`` of them: sequence
        parallelism); the result is then ``[B, I, c_s]``.
        """
        h, c, pq, pv = self.no_heads, self.c_hidden, self.no_qk_points, self.no_v_points
        s_k, frames_k, mask_k = (s, frames, mask) if keys is None else keys
        q = self.linear_q(s).unflatten(-1, (h, c))  # [B, N, H, C]
        k, v = self.linear_kv(s_k).unflatten(-1, (h, 2 * c)).split(c, dim=-1)
        q_pts = self._points(self.linear_q_points(s), frames, pq)  # [B, N, H, Pq, 3]
        kv_pts = self._points(self.linear_kv_points(s_k), frames_k, pq + pv)
        k_pts, v_pts = kv_pts.split([pq, pv], dim=-2)
        terms = z if isinstance(z, PairTerms) else self.pair_terms(z)
        n_pair_rows = len(terms.rows)

        def attend(q, q_pts, mask, *rest):
            pair_rows, (k, v, k_pts, v_pts, mask_k), pair_keys = (
                rest[:n_pair_rows], rest[n_pair_rows : n_pair_rows + 5], rest[n_pair_rows + 5 :])
            return self._attend(terms, q, q_pts, mask, pair_rows, k, v, k_pts, v_pts, mask_k, pair_keys)

        rows, shared = (q, q_pts, mask, *terms.rows), (k, v, k_pts, v_pts, mask_k, *terms.keys)
        chunk = resolve_chunk(self.chunk_size, q.shape[0] * k.shape[1] * h * (3 * pq + 5))
        if chunk is None:
            attended = attend(*rows, *shared)
        else:
            params = (self.linear_b.weight, self.linear_b.bias, self.head_weights)
            attended = chunked(attend, rows, shared, params, chunk_size=chunk)
        o, o_pt, o_pair = attended.split([h * c, h * pv * 3, h * self.linear_b.in_features], dim=-1)
        o_pt = frames.invert_apply(o_pt.unflatten(-1, (h * pv, 3)))  # [B, I, H*Pv, 3]
        o_pt_norm = torch.sqrt(torch.sum(o_pt**2, dim=-1) + self.eps)
        return self.linear_out(torch.cat([o, *o_pt.unbind(-1), o_pt_norm, o_pair], dim=-1))

    def pair_terms(self, z: torch.Tensor) -> PairTerms:
        """The pair hooks of the dense pair ``z`` ``[B, N, N, c_z]``: its rows go with the query rows;
        bias ``linear_b(z_ij)``, pair values ``Σ_j a_ij z_ij``. Subclasses return other
        :class:`PairTerms` for other pair representations (factorized, low-rank + sparse)."""
        return PairTerms((z,), (), _dense_bias, _dense_values)

    def _attend(self, terms, q, q_pts, mask, pair_rows, k, v, k_pts, v_pts, mask_k, pair_keys) -> torch.Tensor:
        """Attention of the query rows ``I`` over the keys ``J``: ``[o | o_pt | o_pair]``
        ``[B, I, H·C + H·Pv·3 + H·c_z]``, the value points still in the global frame; the pair
        enters through ``terms`` (``pair_rows``: its tensors' rows ``I``, ``pair_keys``: whole)."""
        c, pq = self.c_hidden, self.no_qk_points
        # [B, H, I, J]
        logits = torch.einsum("bihc,bjhc->bhij", q, k) * math.sqrt(1.0 / (3 * c))
        logits = logits + math.sqrt(1.0 / 3) * terms.bias(self, pair_rows, pair_keys)
        # Σ_p |q_ip - k_jp|² as one reduction over the Pq·3 coordinates (a reduction
        # over a trailing axis of 3 is slow on CPU); differences, not the expanded
        # |q|² + |k|² - 2q·k, which cancels badly for coordinates far from the origin.
        diff = q_pts.flatten(-2).unsqueeze(2) - k_pts.flatten(-2).unsqueeze(1)  # [B, I, J, H, Pq*3]
        sq_dist = torch.einsum("...k,...k->...", diff, diff)  # [B, I, J, H]
        point_weight = F.softplus(self.head_weights) * math.sqrt(1.0 / (3 * (pq * 9.0 / 2)))
        pt_logits = -0.5 * sq_dist * point_weight
        logits = logits + pt_logits.permute(0, 3, 1, 2)
        pair_mask = mask.unsqueeze(-1) * mask_k.unsqueeze(-2)
        logits = logits + (self.inf * (pair_mask.to(logits.dtype) - 1)).unsqueeze(1)
        # Softmax in at least float32 (bf16 logits under autocast lose the ranking).
        attn = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))

        o = torch.einsum("bhij,bjhc->bihc", attn, v).flatten(-2)  # [B, I, H*C]
        o_pt = torch.einsum("bhij,bjhpx->bihpx", attn, v_pts).flatten(-3)  # [B, I, H*Pv*3]
        o_pair = terms.values(self, attn, pair_rows, pair_keys)  # [B, I, H*c_z]
        return torch.cat([o, o_pt, o_pair.to(o.dtype)], dim=-1)


class PairTerms(NamedTuple):
    """How a pair representation enters IPA (:meth:`InvariantPointAttention.pair_terms`).

    ``rows``: tensors whose dim 1 is the query residue (chunked with the query rows);
    ``keys``: tensors every row block sees whole; ``bias(ipa, rows, keys)`` -> the pair bias
    ``[B, H, I, J]`` (``linear_b`` with its bias); ``values(ipa, attn, rows, keys)`` -> the
    attended pair features ``Σ_j a_ij^h z_ij`` ``[B, I, H·c_z]`` for weights ``attn`` ``[B, H, I, J]``.
    """

    rows: tuple
    keys: tuple
    bias: Callable
    values: Callable


def _dense_bias(ipa, rows, keys):
    return ipa.linear_b(rows[0]).permute(0, 3, 1, 2)


def _dense_values(ipa, attn, rows, keys):
    return torch.einsum("bhij,bijc->bihc", attn, rows[0]).flatten(-2)
