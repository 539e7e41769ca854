"""Sparse k-nearest-neighbour pairs: Genie's pair maths restricted to a neighbour graph
(approximate mode ``useSparseKNN True``, ``kNeighbors k``, ``knnSelection``).

Each residue ``i`` keeps the pairs with its ``k`` neighbours ``N(i) = index[i, :]`` (itself
included), so the pair representation is ``[B, N, k, C]`` instead of ``[B, N, N, C]``. The
modules and parameters are the dense model's (:class:`~flash_genie.model.features.PairFeatureNet`,
:class:`~flash_genie.model.pair_stack.PairTransformLayer` with its genie-tk triangle modules and
:class:`~flash_genie.model.pair_stack.PairTransition`,
:class:`~flash_genie.model.ipa.InvariantPointAttention`): a dense checkpoint loads unchanged, and
with ``k >= N`` every function here computes the dense model on real residues (neighbour order
is a permutation; sums and softmaxes do not depend on it). With ``k < N``, for an edge
``(i, j)``, ``j = index[i, n]``, and ``m`` over ``N(i)``:

* pair features: Genie's formula at the edges;
* triangle multiplication, outgoing ``x_ij = Σ_m a_im ⊙ b_jm`` (terms whose edge ``(j, m)``
  is absent dropped), incoming ``x_ij = Σ_m a_mi ⊙ b_mj`` (terms needing an absent ``(m, i)``
  or ``(m, j)`` dropped); LayerNorms, gates, mask, ``linear_z`` as OpenFold, per edge;
* triangle attention, starting node: keys and values ``(i, m)``, bias from ``(j, m)``; ending
  node: keys and values ``(m, j)``, bias from ``(m, i)``; a key whose edges are absent is
  masked (OpenFold's finite bias);
* pair transition per edge; dropout masks are the dense layer's (same shapes, same random
  numbers) gathered at the edges;
* IPA: residue ``i`` attends over ``N(i)`` with the pair bias and pair values of its edges.

Costs, for ``B`` chains of ``N`` residues, ``k`` neighbours, ``C`` pair channels, ``Ch`` the
tri-mul width, ``H`` heads of width ``D``, chunks of ``chunk`` rows:

* :func:`build_graph`: ``O(N²)`` time for the selection (distances, then a ``topk``), in row
  blocks of ``O(chunk·N)`` memory, never ``[N, N]``; the lookup tables
  (:class:`NeighbourGraph`) ``O(N·k²)`` int32 and ``O(N·k²·log k)`` time (sort + searchsorted).
* pair features ``O(N·k·C)``; pair transition ``O(N·k·C²)``.
* triangle multiplication ``O(N·k²·Ch)`` time; memory ``O(N·k·C)`` plus the gathered
  ``[chunk, k, k, Ch]`` block (``[N, k, k, Ch]`` without ``chunk_size``).
* triangle attention ``O(N·k²·H·D)`` time; logits ``[chunk, H, k, k]`` (ending node also the
  gathered keys and values ``[chunk, k, k, H·D]``).
* IPA ``O(N·k·H·(D + Pq + Pv + C))`` time and memory.

Everything is linear in ``N``. Chunks use :func:`~flash_genie.model.chunking.chunked` (exact,
recomputed in backward); a chunk's backward produces a full-size gradient of the gathered
(shared) tensor, ``O(N·k·C)`` work per chunk, so very small chunks cost time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from flash_genie.model.chunking import chunked, resolve_chunk, spans
from flash_genie.model.features import PairFeatureNet
from flash_genie.model.ipa import InvariantPointAttention
from flash_genie.model.pair_stack import PairTransformLayer
from flash_genie.model.primitives import SharedDropout
from flash_genie.model.rigid import Rigid
from genie_tk.reference import fp16_enabled, mask_bias

__all__ = [
    "SELECTIONS",
    "NeighbourGraph",
    "SparsePair",
    "build_graph",
    "gather_pairs",
    "scatter_pairs",
    "sparse_ipa",
    "sparse_pair_features",
    "sparse_pair_layer",
    "sparse_triangle_attention",
    "sparse_triangle_multiplication",
]

SELECTIONS = ("coordinates", "sequence", "hybrid")

# Elements of one temporary block while the graph is built (rows per block follow from it).
_BLOCK = 1 << 22


@dataclass(frozen=True)
class NeighbourGraph:
    """The neighbour graph of a batch, with the lookup tables the triangle operations need.

    Edges are numbered ``e = (b·N + i)·k + n`` for edge ``(i, index[b, i, n])`` of chain ``b``:
    row ``e`` of ``values.reshape(-1, C)`` for pair values ``[B, N, k, C]``. The number
    :attr:`n_edges` ``= B·N·k`` stands for an absent edge (it addresses a zero row appended to
    the values before a gather).

    Attributes:
        index: ``[B, N, k]`` int64, neighbour ``j`` of residue ``i`` in slot ``n``; every real
            residue is its own neighbour; unused slots (and padded rows) hold ``i``.
        valid: ``[B, N, k]`` bool, edge ``(i, index[i, n])`` exists (both residues real, slot used).
        triangle: ``[B, N, k, k]`` int32 (int64 beyond 2³¹ edges): at ``[i, a, c]`` the edge
            ``(index[i, a], index[i, c])``, or :attr:`n_edges`. With ``j = index[i, n]`` and
            ``m = index[i, p]``: ``triangle[i, n, p]`` is ``(j, m)``, ``triangle[i, p, n]`` is ``(m, j)``.
        reverse: ``[B, N, k]``, same dtype: at ``[i, p]`` the edge ``(index[i, p], i)``, or
            :attr:`n_edges`.
    """

    index: torch.Tensor
    valid: torch.Tensor
    triangle: torch.Tensor
    reverse: torch.Tensor

    @property
    def k(self) -> int:
        return self.index.shape[-1]

    @property
    def n_edges(self) -> int:
        return self.index.numel()

    @classmethod
    def from_index(
        cls, index: torch.Tensor, valid: torch.Tensor, chunk_size: int | None = None
    ) -> NeighbourGraph:
        """The graph of neighbour lists ``index`` ``[B, N, k]`` (ints in ``[0, N)``) with ``valid``
        ``[B, N, k]`` (bool); no residue may appear twice among the valid slots of a row. The tables are
        built by rows in blocks of ``chunk_size`` (default: about 4M table entries per block)."""
        if index.dim() != 3 or valid.shape != index.shape or valid.dtype != torch.bool:
            raise ValueError(
                f"index must be [B, N, k] and valid a bool tensor of the same shape, got "
                f"{tuple(index.shape)} and {tuple(valid.shape)} {valid.dtype}"
            )
        batch, n_res, k = index.shape
        if bool(((index < 0) | (index >= n_res)).any()):
            raise ValueError(f"index must hold residue indices in [0, {n_res}), got values outside")
        with torch.no_grad():
            index = index.long()
            n_edges = batch * n_res * k
            dtype = torch.int32 if n_edges < 2**31 - 1 else torch.int64
            # Each row's valid neighbours in ascending order (absent ones: N, at the end) and
            # their slots, for a binary search.
            sorted_rows, slots = torch.where(valid, index, n_res).sort(dim=-1)
            triangle = index.new_empty((batch, n_res, k, k), dtype=dtype)
            reverse = index.new_empty((batch, n_res, k), dtype=dtype)
            offset = (torch.arange(batch, device=index.device) * n_res).view(batch, 1, 1, 1)
            step = chunk_size or max(1, _BLOCK // max(1, batch * k * k))
            for r0, r1 in spans(n_res, step):
                idx, ok = index[:, r0:r1], valid[:, r0:r1]  # [B, R, k]
                rows = _gather_rows(sorted_rows, idx)  # [B, R, k, k]
                row_slots = _gather_rows(slots, idx)
                # [b, r, a, c]: slot of index[r, c] in the list of index[r, a].
                slot, found = _search(rows, row_slots, idx.unsqueeze(-2).expand(-1, -1, k, -1))
                found &= ok.unsqueeze(-1) & ok.unsqueeze(-2)
                edge = (offset + idx.unsqueeze(-1)) * k + slot
                triangle[:, r0:r1] = torch.where(found, edge, n_edges)
                own = torch.arange(r0, r1, device=index.device).view(1, -1, 1, 1)
                slot, found = _search(rows, row_slots, own.expand(batch, -1, k, 1))  # [B, R, k, 1]
                found &= ok.unsqueeze(-1)
                edge = (offset + idx.unsqueeze(-1)) * k + slot
                reverse[:, r0:r1] = torch.where(found, edge, n_edges).squeeze(-1)
        return cls(index, valid, triangle, reverse)


class SparsePair(NamedTuple):
    """Pair values on a neighbour graph: ``values`` ``[B, N, k, C]`` (value of edge
    ``(i, graph.index[i, n])`` at ``[i, n]``, zero where ``graph.valid`` is false)."""

    values: torch.Tensor
    graph: NeighbourGraph


def _search(rows: torch.Tensor, row_slots: torch.Tensor, queries: torch.Tensor):
    """Slots of ``queries`` ``[..., Q]`` in the ascending ``rows`` ``[..., k]`` whose original
    slots are ``row_slots``: ``(slot, found)``, ``slot`` 0 where not found."""
    pos = torch.searchsorted(rows, queries.contiguous()).clamp_(max=rows.shape[-1] - 1)
    found = rows.gather(-1, pos) == queries
    return torch.where(found, row_slots.gather(-1, pos), 0), found


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, ...]]``: ``t`` ``[B, N, *rest]``, ``index`` ``[B, *idx]`` -> ``[B, *idx, *rest]``."""
    batch, n_res = t.shape[:2]
    offset = (torch.arange(batch, device=t.device) * n_res).view(batch, *([1] * (index.dim() - 1)))
    flat = t.reshape(batch * n_res, *t.shape[2:]).index_select(0, (index + offset).reshape(-1))
    return flat.view(*index.shape, *t.shape[2:])


def _edge_table(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[B, N, k, *rest]`` -> ``[B·N·k + 1, *rest]``: one row per edge and a zero
    row at :attr:`NeighbourGraph.n_edges` for the absent ones."""
    flat = values.reshape(-1, *values.shape[3:])
    return torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])


def _take(table: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Rows ``edges`` ``[*E]`` of an :func:`_edge_table` -> ``[*E, *rest]`` (zeros where absent)."""
    return table.index_select(0, edges.reshape(-1)).view(*edges.shape, *table.shape[1:])


# --------------------------------------------------------------------------- graph


def build_graph(
    x: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    selection: str = "hybrid",
    *,
    chunk_size: int | None = None,
) -> NeighbourGraph:
    """The ``k``-neighbour graph of noisy Cα coordinates (no gradient flows through it).

    Args:
        x: ``[B, N, 3]`` Cα coordinates.
        mask: ``[B, N]`` 1 (or True) for real residues, 0 for padding.
        k: neighbours per residue, itself included (``>= 1``); ``k >= N`` keeps every real
            residue (the graph then has ``N`` slots per row).
        selection: ``coordinates`` (the ``k`` nearest by Cα distance), ``sequence`` (nearest by
            ``|i - j|``) or ``hybrid`` (``k // 2`` by sequence, the rest by distance among those
            not chosen yet).
        chunk_size: rows per block of the ``[B, chunk, N]`` distance computation (default:
            about 4M entries per block).

    Ties are broken by the lower residue index; padded residues are never neighbours and
    their rows have no valid slot; valid slots come first, in ascending residue order.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"x must have shape [B, N, 3], got {tuple(x.shape)}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"mask must have shape [B, N] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
    batch, n_res = mask.shape
    k = min(k, n_res)
    device = x.device
    with torch.no_grad():
        work = torch.promote_types(x.dtype, torch.float32)
        x = x.detach().to(work)
        real = mask.detach() != 0
        index = torch.empty(batch, n_res, k, dtype=torch.long, device=device)
        valid = torch.empty(batch, n_res, k, dtype=torch.bool, device=device)
        cols = torch.arange(n_res, device=device)
        slots = torch.arange(1, k + 1, device=device, dtype=torch.int32)
        n_seq = {"sequence": k, "coordinates": 0, "hybrid": k // 2}[selection]
        excluded = ~real.unsqueeze(1)  # [B, 1, N]: padded residues are never neighbours
        step = chunk_size or max(1, _BLOCK // max(1, batch * n_res))
        for r0, r1 in spans(n_res, step):
            rows = cols[r0:r1]
            chosen = torch.zeros(batch, r1 - r0, n_res, dtype=torch.bool, device=device)
            if n_seq:
                # 2|i - j| + [j > i]: distinct keys that order by |i - j|, then the lower index.
                offset = rows[:, None] - cols[None, :]
                separation = (2 * offset.abs() + (offset < 0)).to(work)
                chosen = _smallest(torch.where(excluded, math.inf, separation), n_seq)
            if n_seq < k:
                # Squared distances as a sum over the three coordinates of differences (no
                # |x|² + |y|² - 2x·y cancellation far from the origin).
                dist = sum((x[:, r0:r1, None, c] - x[:, None, :, c]) ** 2 for c in range(3))
                dist.masked_fill_(rows[:, None] == cols[None, :], -1.0)  # self first
                dist.masked_fill_(excluded | chosen, math.inf)
                chosen |= _smallest(dist, k - n_seq)
            # Slot s holds the (s+1)-th chosen residue: the first column where the count reaches s+1.
            counts = chosen.cumsum(-1, dtype=torch.int32)
            picked = torch.searchsorted(counts, slots.expand(batch, r1 - r0, k).contiguous())
            ok = (picked < n_res) & real[:, r0:r1, None]
            index[:, r0:r1] = torch.where(ok, picked, rows[None, :, None])
            valid[:, r0:r1] = ok
        return NeighbourGraph.from_index(index, valid, chunk_size)


def _smallest(key: torch.Tensor, k: int) -> torch.Tensor:
    """Mask ``[..., N]`` of the ``k`` smallest finite entries of ``key`` per row (fewer if the
    row has fewer), ties broken by the lower column."""
    kth = key.topk(k, dim=-1, largest=False).values.amax(-1, keepdim=True)
    below = key < kth
    tie = (key == kth) & torch.isfinite(key)
    room = k - below.sum(-1, keepdim=True)
    if not bool((tie.sum(-1, keepdim=True) > room).any()):
        return below | tie
    return below | (tie & (tie.cumsum(-1) <= room))


def gather_pairs(p: torch.Tensor, graph: NeighbourGraph) -> torch.Tensor:
    """Dense pairs ``p`` ``[B, N, N, C]`` at the graph's edges: ``[B, N, k, C]``, zero where
    ``graph.valid`` is false."""
    n_res = graph.index.shape[1]
    rows = torch.arange(n_res, device=p.device).view(1, n_res, 1)
    values = _gather_rows(p.flatten(1, 2), rows * n_res + graph.index)  # p[b, i, index[b, i, n]]
    return values * graph.valid.unsqueeze(-1).to(p.dtype)


def scatter_pairs(pair: SparsePair) -> torch.Tensor:
    """The dense ``[B, N, N, C]`` tensor of a sparse pair: edge values at their pairs, zeros
    elsewhere. ``O(N²·C)`` memory: for tests and inspection on small ``N``."""
    values, graph = pair
    batch, n_res, _ = graph.index.shape
    dense = values.new_zeros(batch, n_res, n_res, values.shape[-1])
    b = torch.arange(batch, device=values.device).view(batch, 1, 1).expand_as(graph.index)
    i = torch.arange(n_res, device=values.device).view(1, n_res, 1).expand_as(graph.index)
    masked = values * graph.valid.unsqueeze(-1).to(values.dtype)
    # Unused slots repeat the row's own index; accumulating their zeros leaves the sum exact.
    return dense.index_put((b, i, graph.index), masked, accumulate=True)


# --------------------------------------------------------------------------- pair features


def sparse_pair_features(
    net: PairFeatureNet, s: torch.Tensor, x: torch.Tensor, graph: NeighbourGraph
) -> torch.Tensor:
    """:class:`~flash_genie.model.features.PairFeatureNet` at the edges: single features ``s``
    ``[B, N, c_s]``, Cα ``x`` ``[B, N, 3]`` -> ``[B, N, k, c_p]``, zero where ``graph.valid`` is false.

    ``p_ij = Lin_i(s_i) + Lin_j(s_j) + Lin_relpos(onehot(clip(i - j) + K)) + Lin_template(d_ij)``
    in the dense net's order of operations."""
    index = graph.index
    p = net.linear_s_p_i(s).unsqueeze(2) + _gather_rows(net.linear_s_p_j(s), index)
    rows = torch.arange(s.shape[1], device=s.device).view(1, -1, 1)
    bins = (rows - index).clamp(-net.relpos_k, net.relpos_k) + net.relpos_k
    p = p + (net.linear_relpos.weight.t()[bins] + net.linear_relpos.bias)
    dist = torch.sqrt(1e-10 + torch.sum((x.unsqueeze(2) - _gather_rows(x, index)) ** 2, dim=-1))
    p = p + net.linear_template(dist.unsqueeze(-1).to(p.dtype))
    return p * graph.valid.unsqueeze(-1).to(p.dtype)


# --------------------------------------------------------------------------- pair stack


def _contract(fn, rows, shared, chunk_size: int | None) -> torch.Tensor:
    """``fn(*rows, *shared)``, in row chunks (recomputed in backward) when ``chunk_size`` is set."""
    if chunk_size is None:
        return fn(*rows, *shared)
    return chunked(fn, rows, shared, chunk_size=chunk_size)


def _outgoing(a: torch.Tensor, triangle: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x[i, n] = Σ_p a[i, p] ⊙ b(index[i, n], index[i, p])``: ``a`` ``[B, R, k, Ch]``,
    ``triangle`` rows ``[B, R, k, k]``, ``b`` an edge table."""
    # A product and a sum over p: einsum would make a permuted copy of the [k, k, Ch] block.
    return (a.unsqueeze(2) * _take(b, triangle)).sum(3)


def _incoming(
    triangle: torch.Tensor, reverse: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``x[i, n] = Σ_p a(index[i, p], i) ⊙ b(index[i, p], index[i, n])``."""
    return (_take(a, reverse).unsqueeze(2) * _take(b, triangle.transpose(-1, -2))).sum(3)


def sparse_triangle_multiplication(
    module, z: torch.Tensor, graph: NeighbourGraph, chunk_size: int | None = None
) -> torch.Tensor:
    """A genie-tk ``TriangleMultiplication{Outgoing,Incoming}`` (or fused-projection) module on
    the graph: ``z`` ``[B, N, k, C]`` -> update ``[B, N, k, C]``.

    outgoing ``x_ij = Σ_{m ∈ N(i)} a_im ⊙ b_jm`` over the present ``(j, m)``; incoming
    ``x_ij = Σ_{m ∈ N(i)} a_mi ⊙ b_mj`` over the present ``(m, i)`` and ``(m, j)``; the rest as
    OpenFold (``genie_tk.reference.triangle_multiplicative_update``) per edge, the mask being
    ``graph.valid``. ``chunk_size`` (rows or ``"auto"``) bounds the rows whose ``[k, k, Ch]``
    gathered block exists.
    """
    p_w, p_b, g_w, g_b = module._input_projections()  # a and b stacked
    mask = graph.valid.unsqueeze(-1).to(z.dtype)
    zn = module.layer_norm_in(z)
    a, b = (F.linear(zn, p_w, p_b) * torch.sigmoid(F.linear(zn, g_w, g_b)) * mask).chunk(2, dim=-1)
    if fp16_enabled(z) and bool(a.std() != 0) and bool(b.std() != 0):
        # OpenFold's float16 path (LayerNorm-out is scale invariant).
        a, b = (a / a.std()).float(), (b / b.std()).float()
    chunk_size = resolve_chunk(chunk_size, a.shape[0] * graph.k * graph.k * a.shape[-1])
    if module._outgoing:
        x = _contract(_outgoing, (a, graph.triangle), (_edge_table(b),), chunk_size)
    else:
        x = _contract(
            _incoming, (graph.triangle, graph.reverse), (_edge_table(a), _edge_table(b)), chunk_size
        )
    x = module.linear_z(module.layer_norm_out(x.to(zn.dtype)))
    return x * torch.sigmoid(module.linear_g(zn))


def _attend(
    logits: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor, inf: float
) -> torch.Tensor:
    """Softmax weights of ``(logits + mask bias) + triangle bias`` over the last axis, OpenFold's
    order: ``logits``, ``bias`` ``[B, R, H, k, k]``, ``keep`` ``[B, R, k, k]``."""
    logits = logits + mask_bias(keep, inf, logits.dtype).unsqueeze(2)
    return torch.softmax(logits + bias, dim=-1)


def _starting_node(q, k, v, triangle, bias, inf: float) -> torch.Tensor:
    """Query ``(i, j)``, keys ``(i, m)``, bias ``(j, m)``: ``q, k, v`` ``[B, R, k, H, D]``.
    Key ``m`` is kept where ``(j, m)`` is present (which implies ``(i, j)`` and ``(i, m)``)."""
    keep = triangle < bias.shape[0] - 1
    logits = torch.einsum("binhd,biphd->bihnp", q, k)
    weights = _attend(logits, keep, _take(bias, triangle).permute(0, 1, 4, 2, 3), inf)
    return torch.einsum("bihnp,biphd->binhd", weights, v)


def _ending_node(q, triangle, reverse, k, v, bias, inf: float) -> torch.Tensor:
    """Query ``(i, j)``, keys ``(m, j)``, bias ``(m, i)``: ``q`` ``[B, R, k, H, D]``."""
    absent = bias.shape[0] - 1
    key_edges = triangle.transpose(-1, -2)  # [B, R, n, p]: edge (m_p, j_n)
    keep = (key_edges < absent) & (reverse < absent).unsqueeze(-2)
    logits = torch.einsum("binhd,binphd->bihnp", q, _take(k, key_edges))
    weights = _attend(logits, keep, _take(bias, reverse).permute(0, 1, 3, 2).unsqueeze(-2), inf)
    return torch.einsum("bihnp,binphd->binhd", weights, _take(v, key_edges))


def sparse_triangle_attention(
    module, z: torch.Tensor, graph: NeighbourGraph, chunk_size: int | None = None
) -> torch.Tensor:
    """A genie-tk ``TriangleAttention`` module (starting or ending node, its ``starting``
    attribute) on the graph: ``z`` ``[B, N, k, C]`` -> update ``[B, N, k, C]``.

    Starting node: query ``(i, j)``, keys and values ``(i, m)``, triangle bias ``(j, m)``;
    ending node: keys and values ``(m, j)``, bias ``(m, i)``; ``m ∈ N(i)``, a key masked when
    one of its edges is absent. Heads, gate and ``linear_o`` as the module;
    ``chunk_size`` (rows or ``"auto"``) bounds the rows whose ``[H, k, k]`` logits (and, ending
    node, ``[k, k, H·D]`` gathered keys and values) exist at once.
    """
    mha, heads = module.mha, module.no_heads
    zn = module.layer_norm(z)
    bias = _edge_table(F.linear(zn, module.linear.weight))  # [E + 1, H]

    def project(linear):
        return F.linear(zn, linear.weight).unflatten(-1, (heads, -1))  # [B, N, k, H, D]

    q, k, v = project(mha.linear_q), project(mha.linear_k), project(mha.linear_v)
    q = q / math.sqrt(q.shape[-1])
    inf = module.inf
    chunk_size = resolve_chunk(chunk_size, z.shape[0] * graph.k * graph.k * heads * (2 * q.shape[-1] + 1))
    if module.starting:
        fn = lambda q, k, v, tri, bias: _starting_node(q, k, v, tri, bias, inf)  # noqa: E731
        o = _contract(fn, (q, k, v, graph.triangle), (bias,), chunk_size)
    else:
        fn = lambda q, tri, rev, k, v, bias: _ending_node(q, tri, rev, k, v, bias, inf)  # noqa: E731
        o = _contract(
            fn,
            (q, graph.triangle, graph.reverse),
            (_edge_table(k), _edge_table(v), bias),
            chunk_size,
        )
    o = o.flatten(-2) * torch.sigmoid(mha.linear_g(zn))
    return mha.linear_o(o)


def _dropout(module: SharedDropout, update: torch.Tensor, graph: NeighbourGraph) -> torch.Tensor:
    """``module`` (a dense layer's :class:`SharedDropout`) on edge values ``[B, N, k, C]``: the
    dense mask, drawn with the same shape (hence the same random numbers), at the edges."""
    if not module.training or module.rate == 0.0:
        return update
    batch, n_res, _, channels = update.shape
    if module.shared_dim == -3:  # row-wise: one mask per column j
        keep = F.dropout(update.new_ones(batch, 1, n_res, channels), module.rate, training=True)
        return update * _gather_rows(keep[:, 0], graph.index)
    if module.shared_dim == -2:  # column-wise: one mask per row i
        return update * F.dropout(
            update.new_ones(batch, n_res, 1, channels), module.rate, training=True
        )
    raise ValueError(f"shared_dim must be -3 or -2 for pair dropout, got {module.shared_dim}")


def sparse_pair_layer(
    layer: PairTransformLayer,
    pair: SparsePair,
    chunk_size: int | str | None = "auto",
    transition_chunk_size: int | None = None,
) -> SparsePair:
    """:class:`~flash_genie.model.pair_stack.PairTransformLayer` on the graph: tri-mul outgoing
    and incoming, [tri-att starting and ending node], transition, each added residually after
    the layer's dropout, then the edge mask. ``pair.values`` ``[B, N, k, C]``.

    ``chunk_size`` (rows, ``"auto"`` or ``None``: ``sparseChunkSize``) bounds the rows of every
    ``k²``-sized intermediate, ``transition_chunk_size`` (``pairTransitionChunkSize``) those of
    the transition's hidden layer (exact; recomputed in backward).
    """
    z, graph = pair
    if z.dim() != 4 or tuple(z.shape[:3]) != tuple(graph.index.shape):
        raise ValueError(
            f"pair.values must be [B, N, k, C] with [B, N, k] = {tuple(graph.index.shape)}, got {tuple(z.shape)}"
        )
    if getattr(layer, "row_att", None) is not None:
        raise ValueError(
            "axial attention acts on dense pairs; the sparse pair stack supports triangle attention only"
        )
    steps = []  # (operation, module, dropout) in the dense layer's order
    if layer.tri_mul_out is not None:
        steps.append((sparse_triangle_multiplication, layer.tri_mul_out, layer.dropout_row))
        steps.append((sparse_triangle_multiplication, layer.tri_mul_in, layer.dropout_row))
    if layer.tri_att_start is not None:
        steps.append((sparse_triangle_attention, layer.tri_att_start, layer.dropout_row))
        steps.append((sparse_triangle_attention, layer.tri_att_end, layer.dropout_col))
    for operation, module, dropout in steps:
        z = z + _dropout(dropout, operation(module, z, graph, chunk_size), graph)
    z = z + layer.pair_transition(z, graph.valid, transition_chunk_size)
    return SparsePair(z * graph.valid.unsqueeze(-1).to(z.dtype), graph)


# --------------------------------------------------------------------------- IPA


def _ipa_attend(
    q, q_pts, bias, z, keep, index, k, v, k_pts, v_pts, point_weight, *, scale: float, inf: float
) -> torch.Tensor:
    """Attention of query rows ``R`` over their neighbours: ``[o | o_pt | o_pair]``
    ``[B, R, H·C + H·Pv·3 + H·c_z]`` (value points in the global frame), as
    ``InvariantPointAttention._attend`` with keys ``index`` ``[B, R, k]``."""
    logits = torch.einsum("bihc,binhc->binh", q, _gather_rows(k, index)) * scale  # [B, R, k, H]
    logits = logits + math.sqrt(1.0 / 3) * bias
    k_pts = _gather_rows(k_pts.flatten(-2), index)  # [B, R, k, H, Pq*3]
    diff = q_pts.flatten(-2).unsqueeze(2) - k_pts
    sq_dist = torch.einsum("...k,...k->...", diff, diff)
    logits = logits + -0.5 * sq_dist * point_weight
    logits = logits + (inf * (keep.to(logits.dtype) - 1)).unsqueeze(-1)
    attn = torch.softmax(logits, dim=2, dtype=torch.promote_types(logits.dtype, torch.float32))
    o = torch.einsum("binh,binhc->bihc", attn, _gather_rows(v, index)).flatten(-2)
    o_pt = torch.einsum("binh,binhpx->bihpx", attn, _gather_rows(v_pts, index)).flatten(-3)
    o_pair = torch.einsum("binh,binc->bihc", attn, z).flatten(-2)
    return torch.cat([o, o_pt, o_pair], dim=-1)


def sparse_ipa(
    ipa: InvariantPointAttention,
    s: torch.Tensor,
    pair: SparsePair,
    frames: Rigid,
    mask: torch.Tensor,
) -> torch.Tensor:
    """:class:`~flash_genie.model.ipa.InvariantPointAttention` with each residue attending over
    its neighbours: ``s`` ``[B, N, c_s]``, ``pair.values`` ``[B, N, k, c_z]``, frames ``[B, N]``,
    ``mask`` ``[B, N]`` -> update of ``s``, ``[B, N, c_s]``.

    Logits (scalar, pair bias of the edge, point term, mask) over keys ``j ∈ N(i)``; values,
    value points and the pair values of the edges; same parameters and output layout as the
    dense module. ``ipa.chunk_size`` evaluates blocks of query rows, recomputed in backward.
    """
    h, c, pq, pv = ipa.no_heads, ipa.c_hidden, ipa.no_qk_points, ipa.no_v_points
    z, graph = pair
    q = ipa.linear_q(s).unflatten(-1, (h, c))
    k, v = ipa.linear_kv(s).unflatten(-1, (h, 2 * c)).split(c, dim=-1)
    q_pts = ipa._points(ipa.linear_q_points(s), frames, pq)  # [B, N, H, Pq, 3]
    k_pts, v_pts = ipa._points(ipa.linear_kv_points(s), frames, pq + pv).split([pq, pv], dim=-2)
    real = mask != 0
    # m_i·m_j at the edges, as the dense mask.
    keep = graph.valid & real.unsqueeze(-1) & _gather_rows(real, graph.index)
    point_weight = F.softplus(ipa.head_weights) * math.sqrt(1.0 / (3 * (pq * 9.0 / 2)))
    rows = (q, q_pts, ipa.linear_b(z), z, keep, graph.index)
    shared = (k, v, k_pts, v_pts, point_weight)

    def attend(*args):
        return _ipa_attend(*args, scale=math.sqrt(1.0 / (3 * c)), inf=ipa.inf)

    chunk = resolve_chunk(ipa.chunk_size, s.shape[0] * graph.k * h * (3 * pq + 5))
    attended = _contract(attend, rows, shared, chunk)
    o, o_pt, o_pair = attended.split([h * c, h * pv * 3, h * z.shape[-1]], dim=-1)
    o_pt = frames.invert_apply(o_pt.unflatten(-1, (h * pv, 3)))  # [B, N, H*Pv, 3]
    o_pt_norm = torch.sqrt(torch.sum(o_pt**2, dim=-1) + ipa.eps)
    return ipa.linear_out(torch.cat([o, *o_pt.unbind(-1), o_pt_norm, o_pair], dim=-1))
