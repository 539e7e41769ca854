"""flash-genie's approximate modes for very long chains: what they are and how the denoiser
runs them. Unlike the memory options (:mod:`flash_genie.model.options`), each of these
changes the computation; all are off by default (the plain model is Genie's).

Pair representation (config keys ``zFactorRank``, ``useSparseKNN``):

* ``dense``: Genie's ``[B, N, N, C]`` pair tensor.
* ``factorized`` (``zFactorRank r``): ``z_ij = Σ_k left_ik ⊙ right_jk`` with factors
  ``[B, N, r, C]`` (:mod:`flash_genie.model.factorized`), never materialised.
* ``sparse`` (``useSparseKNN True``, ``kNeighbors k``, ``knnSelection``): the pairs of each
  residue with its ``k`` neighbours, ``[B, N, k, C]`` (:mod:`flash_genie.model.sparse`);
  Genie's own modules evaluated on the neighbour graph.
* ``factorized+sparse`` (both keys): the pair is the sum of a rank-``r`` part, defined for
  every pair, and a sparse part on the neighbour graph: ``z_ij = Σ_k left_ik ⊙ right_jk
  + s_ij·[j ∈ N(i)]``. Each layer updates the factors with the factorized layer and the pairs
  of the graph with the sparse layer, the latter seeing the whole pair (low-rank part plus
  sparse part) on its edges; IPA attends over all residues with the bias and pair values of
  that sum, which is IPA on the materialised pair (:func:`hybrid_ipa`), in ``O(N·(r + k)·C)``
  memory and ``O(N²·H)`` time.

``useAxialAttention`` replaces triangle attention by row and column attention
(:mod:`flash_genie.model.axial`, dense pairs only). ``useModelCompression`` with
``compressionStrategy universal | pair | structure`` shares one set of weights across the
pair-transform layers, the structure layers, or both (universal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flash_genie.config import Config
from flash_genie.model.factorized import (
    FactorPair,
    check_factor_pair,
    factor_bias,
    factor_pair_terms,
    factor_values,
)
from flash_genie.model.ipa import InvariantPointAttention, PairTerms
from flash_genie.model.sparse import (
    SparsePair,
    build_graph,
    sparse_ipa,
    sparse_pair_features,
    sparse_pair_layer,
)

COMPRESSION = ("universal", "pair", "structure")
SELECTIONS = ("hybrid", "coordinates", "sequence")


@dataclass(frozen=True)
class Approximations:
    """The approximate modes of a denoiser; the defaults are the plain (exact) model."""

    z_factor_rank: int = 0
    sparse_knn: bool = False
    k_neighbors: int = 32
    knn_selection: str = "hybrid"
    axial_attention: bool = False
    compression: str | None = None  # None or one of COMPRESSION

    def __post_init__(self):
        if self.z_factor_rank < 0:
            raise ValueError(f"z_factor_rank must be >= 0, got {self.z_factor_rank}")
        if self.k_neighbors < 1:
            raise ValueError(f"k_neighbors must be >= 1, got {self.k_neighbors}")
        if self.knn_selection not in SELECTIONS:
            raise ValueError(f"knn_selection must be one of {SELECTIONS}, got {self.knn_selection!r}")
        if self.compression is not None and self.compression not in COMPRESSION:
            raise ValueError(f"compression must be None or one of {COMPRESSION}, got {self.compression!r}")
        if self.axial_attention and self.pair_mode != "dense":
            raise ValueError("axial attention acts on the dense pair tensor, not on factorized or sparse pairs")

    @classmethod
    def from_config(cls, config: Config) -> Approximations:
        a = config.approx
        return cls(z_factor_rank=a["z_factor_rank"], sparse_knn=a["sparse_knn"], k_neighbors=a["k_neighbors"],
                   knn_selection=a["knn_selection"], axial_attention=a["axial_attention"],
                   compression=a["compression_strategy"] if a["compression"] else None)

    @property
    def pair_mode(self) -> str:
        """``dense``, ``factorized``, ``sparse`` or ``factorized+sparse``."""
        modes = [name for name, on in (("factorized", self.z_factor_rank), ("sparse", self.sparse_knn)) if on]
        return "+".join(modes) or "dense"

    @property
    def exact(self) -> bool:
        return self == Approximations()

    @property
    def share_pair(self) -> bool:
        return self.compression in ("universal", "pair")

    @property
    def share_structure(self) -> bool:
        return self.compression in ("universal", "structure")

    def describe(self) -> str:
        parts = [self.pair_mode]
        if self.z_factor_rank:
            parts.append(f"rank {self.z_factor_rank}")
        if self.sparse_knn:
            parts.append(f"k={self.k_neighbors} ({self.knn_selection})")
        if self.axial_attention:
            parts.append("axial attention")
        if self.compression:
            parts.append(f"{self.compression} layer sharing")
        return ", ".join(parts)


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter count of ``model`` (a :class:`~flash_genie.model.Denoiser`), the count it
    would have without layer sharing, and the bytes of its ``state_dict`` tensors (what a
    checkpoint stores besides the optimizer state)."""
    parameters = sum(p.numel() for p in model.parameters())
    unshared = parameters
    for net in (model.pair_transform_net, model.structure_net, getattr(model, "factor_transform_net", None)):
        if net is not None and len(net.net):
            per_layer = sum(p.numel() for p in net.net[0].parameters())
            unshared += (net.n_layer - len(net.net)) * per_layer
    # A shared module's tensors are the same objects (saved once), so count each object once.
    state_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"parameters": parameters, "parameters_without_sharing": unshared, "state_dict_bytes": state_bytes}


class FactorStack(nn.Module):
    """``n_layer`` factorized pair layers (``net.{i}.*``); ``shared`` keeps one and repeats it."""

    def __init__(self, n_layer: int, make_layer, shared: bool = False):
        super().__init__()
        self.n_layer = n_layer
        self.net = nn.ModuleList(make_layer() for _ in range(min(1, n_layer) if shared else n_layer))

    def calls(self) -> list[nn.Module]:
        return [self.net[i % len(self.net)] for i in range(self.n_layer)] if len(self.net) else []


class HybridPair(NamedTuple):
    """The ``factorized+sparse`` pair: ``factors.materialize() + scatter(sparse)``."""

    factors: object  # FactorPair
    sparse: object  # SparsePair


def factors_at_edges(factors, index: torch.Tensor) -> torch.Tensor:
    """The low-rank pair ``Σ_k left_ik ⊙ right_jk`` at the edges ``(i, index[i, n])``:
    ``[B, N, k, C]`` from factors ``[B, N, r, C]`` and ``index`` ``[B, N, k]``."""
    left, right = factors.left, factors.right
    b, n, r, c = right.shape
    k = index.shape[-1]
    gathered = torch.gather(right.flatten(-2), 1, index.reshape(b, n * k, 1).expand(-1, -1, r * c))
    return torch.einsum("birc,bikrc->bikc", left, gathered.view(b, n, k, r, c))


def approximate_pair_stack(model, s: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, checkpoint_layers: int = 0):
    """Pair features and pair stack of a non-dense denoiser (``model.approx.pair_mode``):
    single features ``s`` ``[B, N, c_s]``, noisy Cα ``x`` ``[B, N, 3]``, ``mask`` ``[B, N]`` ->
    a ``FactorPair``, ``SparsePair`` or :class:`HybridPair` for the structure net. The first
    ``checkpoint_layers`` layer calls are recomputed in backward."""
    approx = model.approx
    factors = sparse = None
    if approx.z_factor_rank:
        factors = model.factor_feature_net(s, x, mask)
    if approx.sparse_knn:
        graph = build_graph(x.detach(), mask, approx.k_neighbors, approx.knn_selection)
        sparse = SparsePair(sparse_pair_features(model.pair_feature_net, s, x, graph), graph)
    factor_calls = model.factor_transform_net.calls() if model.factor_transform_net is not None else []
    sparse_calls = model.pair_transform_net.calls() if sparse is not None and model.pair_transform_net else []
    chunks = (model.memory.sparse_chunk_size, model.memory.pair_transition_chunk_size)
    for index in range(max(len(factor_calls), len(sparse_calls))):
        layers = (factor_calls[index] if factor_calls else None, sparse_calls[index] if sparse_calls else None)
        if index < checkpoint_layers and torch.is_grad_enabled():
            factors, sparse = checkpoint(_layer_step, *layers, factors, sparse, mask, chunks, use_reentrant=False)
        else:
            factors, sparse = _layer_step(*layers, factors, sparse, mask, chunks)
    if factors is not None and sparse is not None:
        return HybridPair(factors, sparse)
    return factors if factors is not None else sparse


def _layer_step(factor_layer, sparse_layer, factors, sparse, mask, chunks=("auto", None)):
    """One pair layer of an approximate mode. In ``factorized+sparse`` the sparse layer acts on
    the whole pair at its edges (low-rank part + sparse part) and the sparse part keeps what
    the low-rank part, updated by the factorized layer, does not hold."""
    if sparse is not None and sparse_layer is not None:
        graph = sparse.graph
        edges = graph.valid.unsqueeze(-1)
        values = sparse.values
        if factors is not None:
            values = values + factors_at_edges(factors, graph.index) * edges
        values = sparse_pair_layer(sparse_layer, SparsePair(values, graph), *chunks).values
        if factors is not None and factor_layer is not None:
            factors = factor_layer(factors, mask)
        if factors is not None:
            values = values - factors_at_edges(factors, graph.index) * edges
        return factors, SparsePair(values, graph)
    if factors is not None and factor_layer is not None:
        factors = factor_layer(factors, mask)
    return factors, sparse


def hybrid_ipa(ipa, s: torch.Tensor, pair: HybridPair, frames, mask: torch.Tensor) -> torch.Tensor:
    """IPA (``ipa``'s parameters) over the ``factorized+sparse`` pair: every residue attends
    to every residue, with the pair bias and the attended pair values of
    ``z = factors + sparse`` computed without materialising ``z`` (:func:`hybrid_pair_terms`).

    Equal to :class:`~flash_genie.model.ipa.InvariantPointAttention` on the materialised pair;
    memory ``O(N·(H·r + k)·C)`` plus ``O(chunk·N·H·(3·Pq + 5))`` logits and point differences
    per block of ``ipa.chunk_size`` query rows (all rows at once without it)."""
    return InvariantPointAttention.forward(ipa, s, hybrid_pair_terms(pair), frames, mask)


def hybrid_pair_terms(pair: HybridPair) -> PairTerms:
    """IPA's pair hooks for ``z = factors + sparse`` (rows: left factors, edge values, neighbour
    index and edge flags of the query rows; keys: the right factors):

    * bias ``Σ_c W_hc z_ij[c] = Σ_{k,c} (W_hc left_ik[c]) right_jk[c] + [j ∈ N(i)] Σ_c W_hc s_ij[c]``;
    * pair values ``Σ_j a_ij z_ij = Σ_k left_ik ⊙ Σ_j a_ij right_jk + Σ_{n} a_{i,index[i,n]} s_in``.
    """
    values, graph = pair.sparse.values, pair.sparse.graph  # [B, N, k, C]
    edges = graph.valid.to(values.dtype)
    rows = (pair.factors.left, values * edges.unsqueeze(-1), graph.index, edges)
    return PairTerms(rows, (pair.factors.right,), _hybrid_bias, _hybrid_values)


def _hybrid_bias(ipa, rows, keys):
    left, edge_values, index, _ = rows
    bias = factor_bias(ipa, (left,), keys)  # [B, H, I, J]
    edge_bias = torch.einsum("bikc,hc->bhik", edge_values, ipa.linear_b.weight.to(edge_values.dtype))
    where = index.unsqueeze(1).expand(-1, ipa.no_heads, -1, -1)  # [B, H, I, k]
    return bias.scatter_add(-1, where, edge_bias.to(bias.dtype))


def _hybrid_values(ipa, attn, rows, keys):
    left, edge_values, index, edges = rows
    o_pair = factor_values(ipa, attn, (left,), keys).unflatten(-1, (ipa.no_heads, -1))  # [B, I, H, C]
    where = index.unsqueeze(1).expand(-1, ipa.no_heads, -1, -1)
    a_edges = attn.gather(-1, where) * edges.unsqueeze(1)  # [B, H, I, k]
    o_pair = o_pair + torch.einsum("bhik,bikc->bihc", a_edges.to(edge_values.dtype), edge_values)
    return o_pair.flatten(-2)


class PairIPA(InvariantPointAttention):
    """IPA whose ``forward`` takes any pair representation (same parameters as
    :class:`~flash_genie.model.ipa.InvariantPointAttention`): the dense tensor, a ``FactorPair``,
    a :class:`HybridPair` (through IPA's pair hooks) or a ``SparsePair`` (attention over the
    neighbours, :func:`~flash_genie.model.sparse.sparse_ipa`)."""

    def forward(self, s, z, frames, mask, keys=None):
        if keys is not None and not isinstance(z, torch.Tensor):
            raise ValueError("keys (sequence parallelism) need the dense pair tensor")
        if isinstance(z, SparsePair):
            return sparse_ipa(self, s, z, frames, mask)
        if isinstance(z, FactorPair):
            check_factor_pair("z", z, mask, self.linear_b.in_features)
        return super().forward(s, z, frames, mask, keys)

    def pair_terms(self, z):
        if isinstance(z, HybridPair):
            return hybrid_pair_terms(z)
        if isinstance(z, FactorPair):
            return factor_pair_terms(z)
        return super().pair_terms(z)
