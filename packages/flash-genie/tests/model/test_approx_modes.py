"""The approximate modes: configuration keys, axial attention, layer sharing; the hybrid layer
step's semantics, SE(3) equivariance of the structure-aware factorized mode, the defaults that
keep memory linear, and training (kill and resume) and sampling in every mode."""

from __future__ import annotations

import math

import pytest
import torch

from flash_genie import Config, Denoiser
from flash_genie.config import ConfigError
from flash_genie.diffusion import make_schedule, sample, training_loss
from flash_genie.memtrack import TensorMemoryTracker
from flash_genie.model import chunking
from flash_genie.model.approx import (
    Approximations,
    _layer_step,
    approximate_pair_stack,
    factors_at_edges,
    parameter_report,
)
from flash_genie.model.axial import AxialAttention
from flash_genie.model.factorized import FactorizedPairTransformLayer, FactorPair
from flash_genie.model.pair_stack import PairTransformLayer
from flash_genie.model.sparse import (
    SparsePair,
    build_graph,
    gather_pairs,
    scatter_pairs,
    sparse_pair_layer,
)
from flash_genie.training import Trainer
from genie_tk import TriangleAttentionEndingNode, TriangleAttentionStartingNode

LONG_SEQUENCE_TRAINING = """\
name long_sequence_training
batchSize 2
maximumNumResidues 1024
singleFeatureDimension 128
pairFeatureDimension 128
zFactorRank 2
learningRate 2e-4
warmupEpochs 100
gradientClipVal 1.0
"""

ULTRA_LONG_TRAINING = """\
name ultra_long_training
batchSize 1
maximumNumResidues 4096
zFactorRank 2
useSparseKNN True
kNeighbors 32
useProgressiveTraining True
useChunkedLoss True
useModelCompression True
compressionStrategy universal
"""


def test_user_configs_parse_and_act():
    long = Config.from_text(LONG_SEQUENCE_TRAINING)
    assert Approximations.from_config(long) == Approximations(z_factor_rank=2)
    assert (long["batchSize"], long["learningRate"], long["warmupEpochs"], long["gradientClipVal"]) == (
        2, 2e-4, 100, 1.0)
    ultra = Config.from_text(ULTRA_LONG_TRAINING)
    approx = Approximations.from_config(ultra)
    assert approx == Approximations(z_factor_rank=2, sparse_knn=True, k_neighbors=32, compression="universal")
    assert approx.pair_mode == "factorized+sparse" and approx.share_pair and approx.share_structure
    # useProgressiveTraining: doubling lengths from 128 below 4096, 1000 steps each, and a
    # length-independent residue-index encoding; useChunkedLoss: the pairwise loss, chunked.
    assert ultra.curriculum() == [(128, 1000), (256, 2000), (512, 3000), (1024, 4000), (2048, 5000)]
    assert ultra["positionalEncoding"] == "absolute"
    assert (ultra["auxDistanceLossWeight"], ultra["lossChunkSize"]) == (1.0, 128)
    assert Config.from_text(ultra.to_text()) == ultra
    assert Config.from_text(long.to_text()) == long


@pytest.mark.parametrize(
    "text, message",
    [
        ("kNeighbors 16", "only acts with 'useSparseKNN True'"),
        ("compressionStrategy pair", "only acts with 'useModelCompression True'"),
        ("progressiveStageSteps 10", "only acts with 'useProgressiveTraining True'"),
        ("useAxialAttention True\nzFactorRank 2", "acts on the dense pair tensor"),
        ("useChunkedLoss True\nauxDistanceLossWeight 0", "turns off"),
        ("useSparseKNN True\nknnSelection nearest", "expected one of hybrid, coordinates, sequence"),
        ("zFactorRank -1", "must be >= 0"),
        ("useModelCompression yes", "expected True or False"),
    ],
)
def test_bad_combinations_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_text("maximumNumResidues 64\n" + text)


def test_explicit_curriculum_wins_and_progressive_needs_a_length():
    c = Config.from_text("maximumNumResidues 64\nuseProgressiveTraining True\nlengthCurriculum 16:5")
    assert c.curriculum() == [(16, 5)]
    c = Config.from_text("maximumNumResidues 64\nuseProgressiveTraining True\nprogressiveStartLength 16\n"
                         "progressiveStageSteps 3")
    assert c.curriculum() == [(16, 3), (32, 6)]
    with pytest.raises(ConfigError, match="maximumNumResidues"):
        Config.from_text("useProgressiveTraining True").curriculum()


# -- axial attention -----------------------------------------------------------------------
def _axial_loop(module: AxialAttention, z, mask):
    """Row attention written out pair by pair (float64)."""
    if not module.starting:
        z, mask = z.transpose(1, 2), mask.transpose(1, 2)
    x = module.layer_norm(z)
    mha, h, d = module.mha, module.no_heads, module.c_hidden
    q, k, v = (lin(x).unflatten(-1, (h, d)) for lin in (mha.linear_q, mha.linear_k, mha.linear_v))
    out = torch.zeros_like(q)
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            for j in range(z.shape[2]):
                logits = torch.einsum("hd,nhd->hn", q[b, i, j], k[b, i]) / d**0.5
                logits = logits + module.inf * (mask[b, i] - 1)
                out[b, i, j] = torch.einsum("hk,khd->hd", torch.softmax(logits, -1), v[b, i])
    out = mha.linear_o(out.flatten(-2) * torch.sigmoid(mha.linear_g(x)))
    return out if module.starting else out.transpose(1, 2)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return module


@pytest.mark.parametrize("starting", [True, False])
def test_axial_attention_matches_the_loop_and_triangle_attention_without_bias(starting):
    torch.manual_seed(0)
    n, c = 7, 6
    module = _randomize(AxialAttention(c, 3, 2, starting=starting).double())
    z = torch.randn(2, n, n, c, dtype=torch.float64)
    mask = torch.ones(2, n, n, dtype=torch.float64)
    mask[1, 5:, :] = 0
    mask[1, :, 5:] = 0
    out = module(z, mask)
    torch.testing.assert_close(out, _axial_loop(module, z, mask), rtol=1e-12, atol=1e-12)
    # Triangle attention whose bias projection is zero is axial attention.
    tri = (TriangleAttentionStartingNode if starting else TriangleAttentionEndingNode)(c, 3, 2).double()
    tri.load_state_dict({**module.state_dict(), "linear.weight": torch.zeros(2, c, dtype=torch.float64)})
    torch.testing.assert_close(out, tri(z, mask), rtol=1e-12, atol=1e-12)


def test_axial_attention_chunked_equals_whole_with_gradients():
    torch.manual_seed(1)
    module = _randomize(AxialAttention(5, 4, 2).double(), seed=3)
    z = torch.randn(1, 9, 9, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 9, 9, dtype=torch.float64)
    mask[0, :, 7:] = 0
    grads = []
    for chunk in (None, 2):
        out = module(z, mask, chunk_size=chunk)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (z, *module.parameters()))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


TINY = Config.from_text(
    "maximumNumResidues 16\nsingleFeatureDimension 8\npairFeatureDimension 8\npositionalEmbeddingDimension 8\n"
    "timestepEmbeddingDimension 8\nrelativePositionK 4\nnumPairTransformLayers 3\n"
    "triangularMultiplicativeHiddenDimension 8\ntriangularAttentionHiddenDimension 4\n"
    "triangularAttentionNumHeads 2\nnumStructureLayers 4\nipaHiddenDimension 4\nipaNumHeads 2\n"
    "ipaNumQkPoints 2\nipaNumVPoints 2\nnumTimesteps 100\n")


def _noise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cumsum(torch.randn(2, 12, 3, generator=g, dtype=torch.float64) * 2, dim=1)
    mask = torch.ones(2, 12, dtype=torch.float64)
    mask[1, 9:] = 0
    return model.predict_noise(x, torch.tensor([3, 70]), mask)


def test_axial_mode_replaces_triangle_attention_in_the_model():
    config = TINY.replace(useAxialAttention=True, includeTriangularAttention=True)
    model = Denoiser.from_config(config).double().eval()
    layer = model.pair_transform_net.net[0]
    assert layer.tri_att_start is None and isinstance(layer.row_att, AxialAttention)
    assert not layer.col_att.starting
    _randomize(model)
    eps = _noise(model)
    assert torch.isfinite(eps).all()
    # The axial updates take part: zeroing them changes the prediction.
    with torch.no_grad():
        for layer in model.pair_transform_net.net:
            layer.row_att.mha.linear_o.weight.zero_()
            layer.row_att.mha.linear_o.bias.zero_()
    assert (eps - _noise(model)).abs().max() > 1e-6


# -- layer sharing (model compression) --------------------------------------------------------
@pytest.mark.parametrize("strategy, pair_modules, structure_modules",
                         [("universal", 1, 1), ("pair", 1, 4), ("structure", 3, 1)])
def test_layer_sharing_keeps_one_layer_and_runs_it_every_time(strategy, pair_modules, structure_modules):
    plain = Denoiser.from_config(TINY)
    model = Denoiser.from_config(TINY.replace(useModelCompression=True, compressionStrategy=strategy))
    assert (len(model.pair_transform_net.net), len(model.structure_net.net)) == (pair_modules, structure_modules)
    assert len(model.pair_transform_net.calls()) == 3 and len(model.structure_net.calls()) == 4
    report, plain_report = parameter_report(model), parameter_report(plain)
    assert report["parameters_without_sharing"] == plain_report["parameters"]
    assert report["parameters"] < plain_report["parameters"]
    assert report["state_dict_bytes"] == 8 * report["parameters"] // 2  # float32, no buffers
    keys = set(model.state_dict())
    assert keys <= set(plain.state_dict())
    # The shared layer runs once per call: count the calls.
    seen = []
    model.pair_transform_net.net[0].register_forward_hook(lambda *a: seen.append("pair"))
    model.structure_net.net[0].register_forward_hook(lambda *a: seen.append("structure"))
    model.double().predict_noise(torch.randn(1, 10, 3, dtype=torch.float64), torch.tensor([5]),
                                 torch.ones(1, 10))
    assert seen.count("pair") == (3 if pair_modules == 1 else 1)
    assert seen.count("structure") == (4 if structure_modules == 1 else 1)


def test_shared_model_equals_the_plain_model_with_copied_layers():
    """Sharing is the plain model whose layers all hold the same weights."""
    shared = _randomize(Denoiser.from_config(TINY.replace(useModelCompression=True)).double(), seed=4).eval()
    plain = Denoiser.from_config(TINY).double().eval()
    state = {}
    for key in plain.state_dict():
        source = key
        for net in ("pair_transform_net.net.", "structure_net.net."):
            if key.startswith(net):
                source = net + "0." + key[len(net):].split(".", 1)[1]
        state[key] = shared.state_dict()[source]
    plain.load_state_dict(state)
    torch.testing.assert_close(_noise(shared), _noise(plain), rtol=1e-12, atol=1e-12)


# -- sparse and factorized+sparse pairs inside the denoiser ----------------------------------------
def test_sparse_model_with_every_neighbour_is_the_dense_model():
    dense = _randomize(Denoiser.from_config(TINY.replace(includeTriangularAttention=True)).double(), seed=5).eval()
    sparse = Denoiser.from_config(TINY.replace(includeTriangularAttention=True, useSparseKNN=True, kNeighbors=12))
    sparse.double().eval().load_state_dict(dense.state_dict())  # the same modules and keys
    real = torch.tensor([[1] * 12, [1] * 9 + [0] * 3], dtype=torch.bool)
    torch.testing.assert_close(_noise(sparse)[real], _noise(dense)[real], rtol=1e-11, atol=1e-11)
    few = Denoiser.from_config(TINY.replace(includeTriangularAttention=True, useSparseKNN=True, kNeighbors=4))
    few.double().eval().load_state_dict(dense.state_dict())
    assert (_noise(few)[real] - _noise(dense)[real]).abs().max() > 1e-3  # fewer pairs: a different model


@pytest.mark.parametrize("chunk", [None, 3])
def test_hybrid_ipa_is_ipa_on_the_materialised_low_rank_plus_sparse_pair(chunk):
    from flash_genie.model.approx import HybridPair, hybrid_ipa
    from flash_genie.model.factorized import FactorPair
    from flash_genie.model.ipa import InvariantPointAttention
    from flash_genie.model.rigid import Rigid
    from flash_genie.model.sparse import SparsePair, build_graph, scatter_pairs

    torch.manual_seed(2)
    b, n, c_s, c_z, r, k = 2, 10, 8, 6, 2, 4
    ipa = _randomize(InvariantPointAttention(c_s, c_z, 4, 3, 2, 2).double(), seed=6)
    ipa.chunk_size = chunk
    mask = torch.ones(b, n, dtype=torch.float64)
    mask[1, 7:] = 0
    x = torch.cumsum(torch.randn(b, n, 3, dtype=torch.float64) * 2, dim=1)
    frames = Rigid(torch.linalg.qr(torch.randn(b, n, 3, 3, dtype=torch.float64))[0], x)
    graph = build_graph(x, mask, k, "hybrid")
    left, right = (torch.randn(b, n, r, c_z, dtype=torch.float64) * mask[..., None, None] for _ in range(2))
    values = torch.randn(b, n, k, c_z, dtype=torch.float64) * graph.valid[..., None]
    s = torch.randn(b, n, c_s, dtype=torch.float64, requires_grad=True)
    factors, sparse = FactorPair(left.requires_grad_(), right.requires_grad_()), SparsePair(values, graph)
    out = hybrid_ipa(ipa, s, HybridPair(factors, sparse), frames, mask)
    dense_pair = factors.materialize() + scatter_pairs(sparse)
    expected = InvariantPointAttention.forward(ipa, s, dense_pair, frames, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out[real].sum(), (s, left, right))
    expected_grads = torch.autograd.grad(expected[real].sum(), (s, left, right))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("text", [LONG_SEQUENCE_TRAINING, ULTRA_LONG_TRAINING], ids=["long", "ultra"])
def test_user_configs_start_training_at_reduced_length(text, tmp_path):
    """The two configurations as written, with a shorter chain, a few steps and (for the
    progressive one) short stages, train on the CPU and write a checkpoint."""
    from flash_genie.training import Trainer

    config = Config.from_text(text, source="<user config>")
    reduced = {"maximumNumResidues": 40, "maximumSteps": 3, "precision": "fp32", "batchSize": 1}
    if config["useProgressiveTraining"]:
        reduced.update(progressiveStartLength=16, progressiveStageSteps=1)
    trainer = Trainer(config.replace(**reduced), tmp_path, device="cpu", progress=False)
    lengths = []
    trainer.model.register_forward_pre_hook(lambda module, args: lengths.append(args[2].shape[1]))
    logs = trainer.fit()
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(log.loss)) for log in logs)
    assert (tmp_path / "checkpoints" / "final.pt").exists()
    approx = trainer.model.approx
    if config["useSparseKNN"]:
        assert approx.pair_mode == "factorized+sparse" and approx.compression == "universal"
        assert lengths == [16, 32, 40]  # progressive: 16, then 32, then maximumNumResidues
        assert trainer.loss_options["aux_distance_weight"] == 1.0 and trainer.loss_options["loss_chunk_size"] == 128
        report = parameter_report(trainer.model)
        assert report["parameters"] * 3 < report["parameters_without_sharing"]
    else:
        assert approx.pair_mode == "factorized" and lengths == [40, 40, 40]
        assert trainer.model.pair_transform_net is None and len(trainer.model.factor_transform_net.net) == 5


# == the approximate modes as a model ==========================================================
MODES = {
    "factorized": {"zFactorRank": 2},
    "sparse": {"useSparseKNN": True, "kNeighbors": 6},
    "hybrid": {"zFactorRank": 2, "useSparseKNN": True, "kNeighbors": 6},
    "axial": {"useAxialAttention": True, "includeTriangularAttention": True},
    "sharing": {"useModelCompression": True, "compressionStrategy": "universal"},
}


def _chain(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    return torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=1)


def _mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).double()


# -- the hybrid (factorized + sparse) layer step ---------------------------------------------
def _hybrid_inputs(n=9, k=None, rank=2, c=6, seed=0):
    torch.manual_seed(seed)
    mask = _mask([n, n - 3], n)
    x = _chain(2, n, seed)
    graph = build_graph(x, mask, k or n, "hybrid")
    left, right = (torch.randn(2, n, rank, c, dtype=torch.float64) * mask[..., None, None] for _ in range(2))
    values = torch.randn(2, n, graph.k, c, dtype=torch.float64) * graph.valid[..., None]
    sparse_layer = _randomize(PairTransformLayer(c, include_mul_update=True, include_tri_att=True, c_hidden_mul=5,
                                                 c_hidden_tri_att=3, n_head_tri=2, tri_dropout=0.0,
                                                 pair_transition_n=2).double(), seed=seed + 1).eval()
    factor_layer = _randomize(FactorizedPairTransformLayer(c, rank, 5, 2, 0.0).double(), seed=seed + 2).eval()
    return mask, graph, FactorPair(left, right), SparsePair(values, graph), factor_layer, sparse_layer


def test_hybrid_step_with_every_neighbour_is_the_dense_layer_on_the_whole_pair():
    """k >= N: the sparse part lives on every pair, so the layer step is Genie's dense layer on
    z = factors + sparse, and afterwards factors + sparse hold exactly that layer's output
    (the low-rank part carrying the factorized layer's update, the sparse part the rest)."""
    mask, _graph, factors, sparse, factor_layer, sparse_layer = _hybrid_inputs()
    new_factors, new_sparse = _layer_step(factor_layer, sparse_layer, factors, sparse, mask)
    z = factors.materialize() + scatter_pairs(sparse)
    pair_mask = mask[:, :, None] * mask[:, None, :]
    dense = sparse_layer(z, pair_mask)
    got = new_factors.materialize() + scatter_pairs(new_sparse)
    real = pair_mask.bool()
    err = (got - dense)[real].abs().max().item()
    print(f"hybrid step vs dense layer on the whole pair: max |Δ| = {err:.3e}")
    assert err < 1e-11
    # The factors are the factorized layer's output, untouched by the sparse part.
    want = factor_layer(factors, mask)
    for a, b in zip(new_factors, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hybrid_step_with_zero_factors_is_the_sparse_layer():
    """A zero low-rank part stays zero (a fresh factor layer's output projections are zero and
    its LayerNorms see zeros) and the step reduces to the sparse layer on the graph."""
    mask, _graph, _, sparse, _, sparse_layer = _hybrid_inputs(k=4)
    zeros = FactorPair(*(torch.zeros(2, 9, 2, 6, dtype=torch.float64) for _ in range(2)))
    fresh = FactorizedPairTransformLayer(6, 2, 5, 2, 0.0).double().eval()  # output layers zero at init
    new_factors, new_sparse = _layer_step(fresh, sparse_layer, zeros, sparse, mask)
    assert max(t.abs().max().item() for t in new_factors) == 0
    want = sparse_pair_layer(sparse_layer, sparse)
    torch.testing.assert_close(new_sparse.values, want.values, rtol=1e-12, atol=1e-12)


def test_hybrid_step_is_equivariant_to_the_residue_order():
    """Permuting the residues (factors, graph rows and neighbour indices together) permutes
    the result: the layer step has no notion of sequence order (it enters through the
    features and the graph only)."""
    mask, graph, factors, _sparse, factor_layer, sparse_layer = _hybrid_inputs(n=9, k=5)
    mask = torch.ones_like(mask)  # a permutation of a prefix mask is not a prefix mask
    x = _chain(2, 9, 3)
    graph = build_graph(x, mask, 5, "coordinates")
    values = torch.randn(2, 9, 5, 6, dtype=torch.float64) * graph.valid[..., None]
    new_factors, new_sparse = _layer_step(factor_layer, sparse_layer, factors, SparsePair(values, graph), mask)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    dense_values = scatter_pairs(SparsePair(values, graph))[:, perm][:, :, perm]
    p_graph = build_graph(x[:, perm], mask, 5, "coordinates")
    p_values = gather_pairs(dense_values, p_graph)
    p_factors = FactorPair(factors.left[:, perm], factors.right[:, perm])
    out_factors, out_sparse = _layer_step(factor_layer, sparse_layer, p_factors, SparsePair(p_values, p_graph), mask)
    for a, b in zip(out_factors, new_factors, strict=True):
        torch.testing.assert_close(a, b[:, perm], rtol=1e-12, atol=1e-12)
    want = scatter_pairs(new_sparse)[:, perm][:, :, perm]
    torch.testing.assert_close(scatter_pairs(out_sparse), want, rtol=1e-11, atol=1e-11)


def test_factors_at_edges_reads_the_materialised_low_rank_pair():
    _, graph, factors, *_ = _hybrid_inputs(k=4)
    dense = factors.materialize()
    want = gather_pairs(dense, graph)
    torch.testing.assert_close(factors_at_edges(factors, graph.index) * graph.valid[..., None], want,
                               rtol=1e-12, atol=1e-12)


# -- the structure-aware factorized mode -------------------------------------------------------
def _rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


@pytest.mark.parametrize("mode", ["factorized", "hybrid"])
def test_pair_stack_sees_the_structure_and_noise_is_equivariant(mode):
    model = _randomize(Denoiser.from_config(TINY.replace(**MODES[mode])).double(), seed=7).eval()
    mask = _mask([12, 9], 12)
    x, other = _chain(2, 12, 1) * mask[..., None], _chain(2, 12, 2) * mask[..., None]
    t = torch.tensor([3, 70])
    s = model.single_feature_net(t, mask)
    a = approximate_pair_stack(model, s, x, mask)
    b = approximate_pair_stack(model, s, other, mask)
    factors_a, factors_b = (p.factors if mode == "hybrid" else p for p in (a, b))
    real = (mask[:, :, None] * mask[:, None, :]).bool()
    diff = (factors_a.materialize() - factors_b.materialize())[real].abs().max().item()
    print(f"{mode}: pair stacks of two structures differ by {diff:.3e}")
    assert diff > 1e-3
    # Rotating and translating the input rotates the predicted noise with it.
    rot, shift = _rotation(5), torch.tensor([4.0, -7.0, 2.5], dtype=torch.float64)
    eps = model.predict_noise(x, t, mask)
    moved = model.predict_noise((x @ rot.T + shift) * mask[..., None], t, mask)
    err = (moved - eps @ rot.T)[mask.bool()].abs().max().item()
    print(f"{mode}: equivariance error {err:.3e} (max |eps| {eps.abs().max().item():.3e})")
    assert err < 1e-9


# -- linear memory by default --------------------------------------------------------------------
REDUCED = {"singleFeatureDimension": 16, "pairFeatureDimension": 16, "positionalEmbeddingDimension": 16,
           "timestepEmbeddingDimension": 16, "triangularMultiplicativeHiddenDimension": 16,
           "numPairTransformLayers": 2, "numStructureLayers": 2, "ipaNumHeads": 4, "kNeighbors": 8}


def _step_peak(config: Config, length: int) -> int:
    torch.manual_seed(0)
    model = Denoiser.from_config(config.replace(maximumNumResidues=length)).train()
    x0 = _chain(config["batchSize"], length).float()
    x0 = x0 - x0.mean(dim=1, keepdim=True)
    mask = torch.ones(config["batchSize"], length)
    schedule = make_schedule(config["numTimesteps"], "cosine")
    with TensorMemoryTracker() as tracker:
        training_loss(model, x0, mask, schedule, timesteps=torch.full((x0.shape[0],), 50)).backward()
    return tracker.peak


@pytest.mark.parametrize("text", [LONG_SEQUENCE_TRAINING, ULTRA_LONG_TRAINING], ids=["long", "ultra"])
def test_user_configs_get_linear_memory_by_default(text, monkeypatch):
    config = Config.from_text(text)
    model = Denoiser.from_config(config)
    memory = model.memory
    assert (memory.ipa_chunk_size, memory.checkpointing, memory.sparse_chunk_size) == ("auto", "all", "auto")
    assert {layer.ipa.chunk_size for layer in model.structure_net.net} == {"auto"}
    assert model.checkpoint_plan(1, 64) == (5, 5)
    # The keys a user sets win.
    own = Denoiser.from_config(config.replace(ipaChunkSize=16, activationCheckpointing="none")).memory
    assert (own.ipa_chunk_size, own.checkpointing) == (16, "none")
    assert Denoiser.from_config(config.replace(ipaChunkSize=0)).memory.ipa_chunk_size is None
    # Memory grows linearly. At a reduced width the auto IPA block is reduced with it, so
    # that the chunks are as much smaller than N² as they are at full size.
    monkeypatch.setattr(chunking, "AUTO_BLOCK", 1 << 17)
    reduced = config.replace(**{k: v for k, v in REDUCED.items() if k != "kNeighbors" or config["useSparseKNN"]},
                             numTimesteps=100)
    peaks = [_step_peak(reduced, n) for n in (64, 128)]
    exponent = math.log(peaks[1] / peaks[0]) / math.log(2)
    # Without the defaults (IPA unchunked, nothing checkpointed) the same step is quadratic.
    plain = reduced.replace(ipaChunkSize=0, activationCheckpointing="none")
    plain_peaks = [_step_peak(plain, n) for n in (64, 128)]
    plain_exponent = math.log(plain_peaks[1] / plain_peaks[0]) / math.log(2)
    print(f"peaks {[p / 2**20 for p in peaks]} MiB (exponent {exponent:.2f}); without the defaults "
          f"{[p / 2**20 for p in plain_peaks]} MiB (exponent {plain_exponent:.2f})")
    assert exponent <= 1.25 < plain_exponent
    assert peaks[1] < plain_peaks[1] / 2


# -- training (kill and resume) and sampling in every mode --------------------------------------
class Killed(Exception):
    pass


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_resumes_exactly_and_samples(mode, tmp_path, training_config):
    config = training_config(**MODES[mode], maximumNumResidues=12, minimumNumResidues=10, batchSize=2,
                             maximumSteps=4, checkpointEverySteps=2)
    full = [log.loss for log in Trainer(config, tmp_path / "full", device="cpu", progress=False).fit()]

    def kill_after_step_3(log):
        if log.step == 3:
            raise Killed

    run = tmp_path / "killed"
    with pytest.raises(Killed):
        Trainer(config, run, device="cpu", progress=False).fit(on_step=kill_after_step_3)
    resumed = Trainer(config, run, device="cpu", progress=False).fit(resume=True)
    print(mode, "uninterrupted", full, "resumed", [log.loss for log in resumed])
    assert [log.step for log in resumed] == [3, 4]
    assert [log.loss for log in resumed] == full[2:]
    # Sampling with the trained weights: finite coordinates of the requested shape.
    trainer = Trainer(config, tmp_path / "sampler", device="cpu", progress=False)
    model = trainer.model.eval()
    mask = torch.ones(2, 10)
    out = sample(model, mask, make_schedule(config["numTimesteps"], config["schedule"]),
                 generator=torch.Generator().manual_seed(3))
    assert out.x.shape == (2, 10, 3) and torch.isfinite(out.x).all()
    assert out.x.std() > 0
