"""Sparse k-NN pairs: the neighbour graph, the dense model's maths on the graph (equal to the
dense model when k >= N, to brute-force loops over the edge set when k < N), memory, dropout,
bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from flash_genie.memtrack import TensorMemoryTracker
from flash_genie.model.features import PairFeatureNet
from flash_genie.model.frames import frenet_frames
from flash_genie.model.ipa import InvariantPointAttention
from flash_genie.model.pair_stack import PairTransformLayer
from flash_genie.model.rigid import Rigid
from flash_genie.model.sparse import (
    NeighbourGraph,
    SparsePair,
    build_graph,
    gather_pairs,
    scatter_pairs,
    sparse_ipa,
    sparse_pair_features,
    sparse_pair_layer,
    sparse_triangle_attention,
    sparse_triangle_multiplication,
)

C_P = 6
N_RES, LENGTHS = 12, (9, 12)
TRIANGLE = ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end")


def _perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value (no zero-initialised layer hides a bug)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _layer(
    dtype=torch.float64, dropout=0.25, c_p=C_P, c_mul=5, c_att=3, heads=2
) -> PairTransformLayer:
    layer = PairTransformLayer(c_p, True, True, c_mul, c_att, heads, dropout, 2).to(dtype)
    for name in TRIANGLE:
        getattr(layer, name).backend = "reference"
    return _perturb(layer).eval()


def _inputs(helpers, batch=2, n_res=N_RES, lengths=LENGTHS, dtype=torch.float64, seed=0):
    """``(x, mask, pair_mask, p)``: a random chain and random dense pairs (zero at padding)."""
    x, mask = helpers.random_chain(batch, n_res, lengths, seed=seed, dtype=dtype)
    pair_mask = mask.unsqueeze(2) * mask.unsqueeze(1)
    g = torch.Generator().manual_seed(seed + 1)
    p = torch.randn(batch, n_res, n_res, C_P, generator=g, dtype=dtype) * pair_mask.unsqueeze(-1)
    return x, mask, pair_mask, p


def _edges(graph) -> dict[tuple[int, int, int], int]:
    """``{(b, i, j): slot}`` of the present edges."""
    return {(b, i, int(graph.index[b, i, n])): n for b, i, n in graph.valid.nonzero().tolist()}


def _real_close(label, helpers, sparse: torch.Tensor, dense: torch.Tensor, pair_mask, tol=1e-12):
    real = pair_mask.bool()
    helpers.assert_close(label, sparse[real], dense[real], atol=tol, rtol=tol)


# --------------------------------------------------------------------------- the graph


@pytest.mark.parametrize("selection", ["coordinates", "sequence", "hybrid"])
@pytest.mark.parametrize("k", [1, 4, 7, 12, 30])
def test_graph_invariants(helpers, selection, k):
    x, mask, _, _ = _inputs(helpers)
    graph = build_graph(x, mask, k, selection, chunk_size=5)
    assert graph.index.shape == (2, N_RES, min(k, N_RES)) and graph.index.dtype == torch.int64
    edges = _edges(graph)
    for b, length in enumerate(LENGTHS):
        for i in range(N_RES):
            row = graph.index[b, i][graph.valid[b, i]].tolist()
            if i >= length:
                assert row == []  # padded rows have no edge
                continue
            assert i in row  # self always included
            assert row == sorted(set(row))  # no repeats, ascending
            assert max(row) < length  # padded residues are never neighbours
            assert len(row) == min(k, length)
            assert graph.valid[b, i, : len(row)].all()  # valid slots come first
    # The lookup tables against the edge set.
    flat = {key: (key[0] * N_RES + key[1]) * graph.k + n for key, n in edges.items()}
    for b, i, a, c in torch.cartesian_prod(
        *(torch.arange(s) for s in graph.triangle.shape)
    ).tolist():
        j, m = int(graph.index[b, i, a]), int(graph.index[b, i, c])
        both = bool(graph.valid[b, i, a] and graph.valid[b, i, c])
        assert int(graph.triangle[b, i, a, c]) == (
            flat.get((b, j, m), graph.n_edges) if both else graph.n_edges
        )
        if c == 0:
            ok = bool(graph.valid[b, i, a])
            assert int(graph.reverse[b, i, a]) == (
                flat.get((b, j, i), graph.n_edges) if ok else graph.n_edges
            )


def _neighbours(graph, b, i) -> set[int]:
    return set(graph.index[b, i][graph.valid[b, i]].tolist())


def test_sequence_selection_takes_the_nearest_in_sequence(helpers):
    x, mask, _, _ = _inputs(helpers)
    graph = build_graph(x, mask, 4, "sequence")
    for b, length in enumerate(LENGTHS):
        for i in range(length):
            # By |i - j|, ties to the lower index.
            expected = sorted(range(length), key=lambda j, i=i: (abs(i - j), j))[:4]
            assert _neighbours(graph, b, i) == set(expected)
    assert _neighbours(graph, 0, 8) == {5, 6, 7, 8}  # the chain's last residue looks back only


def test_coordinate_selection_takes_the_true_nearest(helpers):
    x, mask, _, _ = _inputs(helpers)
    graph = build_graph(x, mask, 5, "coordinates", chunk_size=3)
    for b, length in enumerate(LENGTHS):
        dist = torch.cdist(x[b, :length], x[b, :length])
        order = dist.argsort(dim=-1, stable=True)
        for i in range(length):
            assert _neighbours(graph, b, i) == set(order[i, :5].tolist())


def test_hybrid_selection_has_both(helpers):
    _, mask, _, _ = _inputs(helpers)
    # Scattered points (not a chain): sequence neighbours are not spatial neighbours.
    x = 10 * torch.randn(
        2, N_RES, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    k = 5
    graph = build_graph(x, mask, k, "hybrid")
    pure = {name: build_graph(x, mask, k, name) for name in ("sequence", "coordinates")}
    differs = set()
    for b, length in enumerate(LENGTHS):
        dist = torch.cdist(x[b, :length], x[b, :length])
        for i in range(length):
            by_sequence = sorted(range(length), key=lambda j, i=i: (abs(i - j), j))[: k // 2]
            rest = sorted(
                set(range(length)) - set(by_sequence), key=lambda j, i=i: float(dist[i, j])
            )
            got = _neighbours(graph, b, i)
            assert got == set(by_sequence) | set(rest[: k - k // 2])
            differs |= {name for name, g in pure.items() if got != _neighbours(g, b, i)}
    assert differs == {"sequence", "coordinates"}  # neither selection alone gives the hybrid


@pytest.mark.parametrize("selection", ["coordinates", "sequence", "hybrid"])
def test_k_at_least_n_keeps_every_real_residue(helpers, selection):
    x, mask, pair_mask, _ = _inputs(helpers)
    graph = build_graph(x, mask, 50, selection)
    dense = scatter_pairs(SparsePair(graph.valid.unsqueeze(-1).double(), graph))[..., 0]
    assert torch.equal(dense, pair_mask)


def test_build_graph_rejects_bad_arguments(helpers):
    x, mask, _, _ = _inputs(helpers)
    with pytest.raises(ValueError, match="selection must be one of"):
        build_graph(x, mask, 4, "random")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        build_graph(x, mask, 0)
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, 3\]"):
        build_graph(x[..., :2], mask, 4)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, N\]"):
        build_graph(x, mask[:, :5], 4)
    graph = build_graph(x, mask, 4)
    with pytest.raises(ValueError, match=r"index must hold residue indices in \[0, 12\)"):
        NeighbourGraph.from_index(graph.index + N_RES, graph.valid)
    with pytest.raises(ValueError, match="valid a bool tensor"):
        NeighbourGraph.from_index(graph.index, graph.valid.long())


# --------------------------------------------------------------------------- k >= N: the dense model


def _grads(out, inputs, weights):
    return torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True, retain_graph=True)


def test_pair_features_equal_dense(helpers):
    x, mask, pair_mask, _ = _inputs(helpers)
    net = _perturb(PairFeatureNet(5, C_P, relpos_k=3).double())
    s = torch.randn(2, N_RES, 5, dtype=torch.float64, requires_grad=True)
    x = x.clone().requires_grad_(True)
    graph = build_graph(x, mask, N_RES, "coordinates")
    w = torch.randn(2, N_RES, N_RES, C_P, dtype=torch.float64) * pair_mask.unsqueeze(-1)
    dense = net(s, x, pair_mask)
    sparse = sparse_pair_features(net, s, x, graph)
    _real_close(
        "pair features", helpers, scatter_pairs(SparsePair(sparse, graph)), dense, pair_mask
    )
    params = tuple(net.parameters())
    for a, b in zip(
        _grads(dense, (s, x, *params), w), _grads(sparse, (s, x, *params), gather_pairs(w, graph))
    ):
        helpers.assert_close("pair features grad", b, a, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("op", [*TRIANGLE, "pair_transition"])
def test_operation_equals_dense(helpers, op):
    x, mask, pair_mask, p = _inputs(helpers)
    layer = _layer()
    module = getattr(layer, op)
    graph = build_graph(x, mask, 40, "hybrid")  # k >= N
    p = p.clone().requires_grad_(True)
    values = gather_pairs(p, graph)
    if op == "pair_transition":
        dense, sparse = module(p, pair_mask), module(values, graph.valid)
    else:
        dense = module(p, mask=pair_mask)
        run = (
            sparse_triangle_multiplication
            if op.startswith("tri_mul")
            else sparse_triangle_attention
        )
        sparse = run(module, values, graph)
    _real_close(op, helpers, scatter_pairs(SparsePair(sparse, graph)), dense, pair_mask)
    w = torch.randn_like(dense) * pair_mask.unsqueeze(-1)
    params = tuple(module.parameters())
    for a, b in zip(
        _grads(dense, (p, *params), w), _grads(sparse, (p, *params), gather_pairs(w, graph))
    ):
        helpers.assert_close(f"{op} grad", b, a, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_pair_layer_equals_dense(helpers, chunk_size):
    x, mask, pair_mask, p = _inputs(helpers)
    layer = _layer()
    graph = build_graph(x, mask, N_RES, "sequence")
    p = p.clone().requires_grad_(True)
    dense = layer(p, pair_mask)
    out = sparse_pair_layer(layer, SparsePair(gather_pairs(p, graph), graph), chunk_size=chunk_size)
    assert out.graph is graph
    _real_close("pair layer", helpers, scatter_pairs(out), dense, pair_mask)
    w = torch.randn_like(dense)
    params = tuple(layer.parameters())
    grads_dense = _grads(dense, (p, *params), w)
    grads_sparse = _grads(out.values, (p, *params), gather_pairs(w, graph))
    for a, b in zip(grads_dense, grads_sparse):
        helpers.assert_close("pair layer grad", b, a, atol=1e-12, rtol=1e-12)


def _ipa(dtype=torch.float64) -> InvariantPointAttention:
    return _perturb(InvariantPointAttention(8, C_P, 4, 3, 2, 3).to(dtype), scale=0.2)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_ipa_equals_dense(helpers, chunk_size):
    x, mask, _, p = _inputs(helpers)
    ipa = _ipa()
    s = torch.randn(2, N_RES, 8, dtype=torch.float64, requires_grad=True)
    x, p = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    frames = Rigid(frenet_frames(x, mask), x)
    graph = build_graph(x, mask, 20, "coordinates")
    dense = ipa(s, p, frames, mask)
    ipa.chunk_size = chunk_size
    sparse = sparse_ipa(ipa, s, SparsePair(gather_pairs(p, graph), graph), frames, mask)
    real = mask.bool()
    helpers.assert_close("ipa", sparse[real], dense[real], atol=1e-12, rtol=1e-12)
    w = torch.randn_like(dense) * mask.unsqueeze(-1)
    inputs = (s, x, p, *ipa.parameters())
    for a, b in zip(_grads(dense, inputs, w), _grads(sparse, inputs, w)):
        helpers.assert_close("ipa grad", b, a, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- k < N: the edge set


def _brute_triangle(module, op, values, graph):
    """The update of ``op`` at every edge by loops over the edge set (projections per edge
    with the module's own layers; the graph part written out)."""
    edges = _edges(graph)
    out = torch.zeros_like(values)
    zn = (module.layer_norm_in if op.startswith("tri_mul") else module.layer_norm)(values)
    if op.startswith("tri_mul"):
        mask = graph.valid.unsqueeze(-1).double()
        a = module.linear_a_p(zn) * torch.sigmoid(module.linear_a_g(zn)) * mask
        b = module.linear_b_p(zn) * torch.sigmoid(module.linear_b_g(zn)) * mask
        x = torch.zeros(*values.shape[:3], a.shape[-1], dtype=values.dtype)
    else:
        heads, mha = module.no_heads, module.mha
        q, k, v = (
            lin(zn).unflatten(-1, (heads, -1)) for lin in (mha.linear_q, mha.linear_k, mha.linear_v)
        )
        bias = module.linear(zn)  # [B, N, k, H]
        o = torch.zeros_like(q)
    for (bb, i, j), n in edges.items():
        ms = graph.index[bb, i][graph.valid[bb, i]].tolist()
        if op == "tri_mul_out":
            for m in ms:
                if (bb, j, m) in edges:
                    x[bb, i, n] += a[bb, i, edges[bb, i, m]] * b[bb, j, edges[bb, j, m]]
        elif op == "tri_mul_in":
            for m in ms:
                if (bb, m, i) in edges and (bb, m, j) in edges:
                    x[bb, i, n] += a[bb, m, edges[bb, m, i]] * b[bb, m, edges[bb, m, j]]
        else:
            if op == "tri_att_start":  # keys (i, m), bias (j, m)
                keys = [(edges[bb, i, m], (bb, j, m)) for m in ms if (bb, j, m) in edges]
                kv = [(bb, i, key) for key, _ in keys]
                bias_at = [(bias_edge[0], bias_edge[1], edges[bias_edge]) for _, bias_edge in keys]
            else:  # keys (m, j), bias (m, i)
                ok = [m for m in ms if (bb, m, j) in edges and (bb, m, i) in edges]
                kv = [(bb, m, edges[bb, m, j]) for m in ok]
                bias_at = [(bb, m, edges[bb, m, i]) for m in ok]
            logits = torch.stack(
                [q[bb, i, n] @ k[e].T / math.sqrt(q.shape[-1]) for e in kv]
            ).diagonal(dim1=1, dim2=2)
            logits = logits + torch.stack([bias[e] for e in bias_at])  # [keys, H]
            weights = torch.softmax(logits, dim=0)
            o[bb, i, n] = sum(weights[t].unsqueeze(-1) * v[e] for t, e in enumerate(kv))
    if op.startswith("tri_mul"):
        out = module.linear_z(module.layer_norm_out(x)) * torch.sigmoid(module.linear_g(zn))
    else:
        out = mha.linear_o(o.flatten(-2) * torch.sigmoid(mha.linear_g(zn)))
    return out * graph.valid.unsqueeze(-1).double()


@pytest.mark.parametrize("op", TRIANGLE)
@pytest.mark.parametrize("selection", ["coordinates", "hybrid"])
def test_triangle_operation_on_a_sparse_graph_matches_loops(helpers, op, selection):
    x, mask, _, p = _inputs(helpers, n_res=10, lengths=(7, 10))
    layer = _layer()
    module = getattr(layer, op)
    graph = build_graph(x, mask, 4, selection)
    values = gather_pairs(p, graph)
    run = sparse_triangle_multiplication if op.startswith("tri_mul") else sparse_triangle_attention
    with torch.no_grad():
        got = run(module, values, graph) * graph.valid.unsqueeze(-1).double()
        want = _brute_triangle(module, op, values, graph)
    helpers.assert_close(f"{op} k=4", got, want, atol=1e-12, rtol=1e-12)
    # The graph is not symmetric, so some triangles are incomplete: the test sees absent edges.
    edges = _edges(graph)
    assert any((b, j, i) not in edges for b, i, j in edges)


def test_ipa_on_a_sparse_graph_is_ipa_over_the_neighbours(helpers):
    """Row by row, the dense module with its keys restricted to ``N(i)`` (``keys=``)."""
    x, mask, _, p = _inputs(helpers, n_res=10, lengths=(7, 10))
    ipa = _ipa()
    s = torch.randn(2, 10, 8, dtype=torch.float64)
    frames = Rigid(frenet_frames(x, mask), x)
    graph = build_graph(x, mask, 4, "hybrid")
    values = gather_pairs(p, graph)
    with torch.no_grad():
        got = sparse_ipa(ipa, s, SparsePair(values, graph), frames, mask)
        for b, length in enumerate((7, 10)):
            for i in range(length):
                slots = graph.valid[b, i].nonzero().squeeze(-1)
                js = graph.index[b, i, slots]
                keys = (
                    s[b, js][None],
                    Rigid(frames.rots[b, js][None], frames.trans[b, js][None]),
                    mask[b, js][None],
                )
                row = Rigid(frames.rots[b, i].view(1, 1, 3, 3), frames.trans[b, i].view(1, 1, 3))
                want = ipa(
                    s[b, i].view(1, 1, -1),
                    values[b, i, slots][None, None],
                    row,
                    mask[b, i].view(1, 1),
                    keys=keys,
                )
                torch.testing.assert_close(got[b, i], want[0, 0], atol=1e-12, rtol=1e-12)


def test_chunking_is_exact_on_a_sparse_graph(helpers):
    x, mask, _, p = _inputs(helpers)
    layer, ipa = _layer(), _ipa()
    graph = build_graph(x, mask, 5, "hybrid")
    values = gather_pairs(p, graph).requires_grad_(True)
    s = torch.randn(2, N_RES, 8, dtype=torch.float64, requires_grad=True)
    frames = Rigid(frenet_frames(x, mask), x)
    results = []
    for chunk in (None, 4):
        ipa.chunk_size = chunk
        out = sparse_pair_layer(layer, SparsePair(values, graph), chunk_size=chunk)
        upd = sparse_ipa(ipa, s, out, frames, mask)
        loss = (upd * torch.linspace(-1, 1, upd.numel(), dtype=upd.dtype).view_as(upd)).sum()
        results.append(
            (out.values, upd, *torch.autograd.grad(loss, (values, s, *layer.parameters())))
        )
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


def test_layer_memory_grows_linearly(helpers):
    layer = _layer(torch.float32, dropout=0.0, c_p=4, c_mul=4, c_att=2, heads=1)
    peaks = {}
    for n_res in (256, 1024):
        x, mask = helpers.random_chain(1, n_res, [n_res], seed=3, dtype=torch.float32)
        graph = build_graph(x, mask, 8, "hybrid")
        values = (torch.randn(1, n_res, 8, 4) * graph.valid.unsqueeze(-1)).requires_grad_(True)
        with TensorMemoryTracker() as tracker:
            out = sparse_pair_layer(layer, SparsePair(values, graph))
            out.values.square().sum().backward()
        peaks[n_res] = tracker.peak
    ratio = peaks[1024] / peaks[256]
    dense_pair = 1024 * 1024 * 4 * 4  # one [N, N, 4] float32 pair tensor at N = 1024
    print(
        f"peak forward+backward: N=256 {peaks[256] / 2**20:.2f} MiB, N=1024 {peaks[1024] / 2**20:.2f} MiB, "
        f"ratio {ratio:.2f} (dense pair tensor alone at N=1024: {dense_pair / 2**20:.0f} MiB)"
    )
    assert ratio < 4.5
    assert peaks[1024] < dense_pair


def test_training_dropout_matches_dense(helpers):
    x, mask, pair_mask, p = _inputs(helpers)
    layer = _layer(dropout=0.3).train()
    graph = build_graph(x, mask, N_RES, "hybrid")
    torch.manual_seed(7)
    dense = layer(p, pair_mask)
    torch.manual_seed(7)
    sparse = sparse_pair_layer(layer, SparsePair(gather_pairs(p, graph), graph))
    _real_close("dropout", helpers, scatter_pairs(sparse), dense, pair_mask)
    assert not torch.allclose(dense, layer.eval()(p, pair_mask))  # dropout was active


def test_bf16_autocast_is_finite_and_close(helpers):
    x, mask, _, p = _inputs(helpers, dtype=torch.float32)
    layer, ipa = _layer(torch.float32), _ipa(torch.float32)
    ipa.chunk_size = 4
    graph = build_graph(x, mask, 5, "hybrid")
    values = gather_pairs(p, graph).requires_grad_(True)
    s = torch.randn(2, N_RES, 8, requires_grad=True)
    frames = Rigid(frenet_frames(x, mask), x)

    def run():
        out = sparse_pair_layer(layer, SparsePair(values, graph), chunk_size=3)
        return out.values, sparse_ipa(ipa, s, out, frames, mask)

    full = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run()
    grads = torch.autograd.grad(low[1].float().sum(), (values, s))
    for name, a, b in (("pair", low[0], full[0]), ("ipa", low[1], full[1])):
        assert torch.isfinite(a).all()
        rel = ((a.float() - b).norm() / b.norm()).item()
        print(f"bf16 {name}: relative error {rel:.3e}")
        assert rel < 0.05
    assert all(torch.isfinite(g).all() for g in grads)


def test_layer_checks_the_pair_shape(helpers):
    x, mask, _, p = _inputs(helpers)
    graph = build_graph(x, mask, 4, "hybrid")
    with pytest.raises(ValueError, match=r"pair.values must be \[B, N, k, C\]"):
        sparse_pair_layer(_layer(), SparsePair(p, graph))


def test_values_at_absent_edges_do_not_leak(helpers):
    x, mask, _, p = _inputs(helpers)
    graph = build_graph(x, mask, 5, "coordinates")
    layer, ipa = _layer(), _ipa()
    s = torch.randn(2, N_RES, 8, dtype=torch.float64)
    frames = Rigid(frenet_frames(x, mask), x)
    values = gather_pairs(p, graph)
    junk = values.masked_fill(~graph.valid.unsqueeze(-1), 50.0)  # unused slots and padded rows
    with torch.no_grad():
        clean = sparse_pair_layer(layer, SparsePair(values, graph))
        dirty = sparse_pair_layer(layer, SparsePair(junk, graph))
        torch.testing.assert_close(dirty.values, clean.values, atol=1e-12, rtol=1e-12)
        assert dirty.values[~graph.valid].abs().max() == 0  # masked at the end of the layer
        real = mask.bool()
        a = sparse_ipa(ipa, s, SparsePair(values, graph), frames, mask)
        b = sparse_ipa(ipa, s, SparsePair(junk, graph), frames, mask)
        torch.testing.assert_close(b[real], a[real], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n_res", [1, 3])
def test_degenerate_sizes_stay_finite(n_res):
    """A single residue, and a batch element with no real residue at all."""
    torch.manual_seed(0)
    x = torch.randn(2, n_res, 3, dtype=torch.float64)
    mask = torch.tensor([[1.0] * n_res, [0.0] * n_res], dtype=torch.float64)
    graph = build_graph(x, mask, 2, "hybrid")
    assert not graph.valid[1].any() and graph.valid[0].sum() == n_res * min(2, n_res)
    values = torch.randn(*graph.index.shape, C_P, dtype=torch.float64) * graph.valid.unsqueeze(-1)
    out = sparse_pair_layer(_layer(), SparsePair(values, graph), chunk_size=2)
    upd = sparse_ipa(
        _ipa(),
        torch.randn(2, n_res, 8, dtype=torch.float64),
        out,
        Rigid(frenet_frames(x, mask), x),
        mask,
    )
    assert torch.isfinite(out.values).all() and torch.isfinite(upd).all()
    assert out.values[1].abs().max() == 0
