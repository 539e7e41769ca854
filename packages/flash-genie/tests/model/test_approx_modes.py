"""The approximate modes' configuration keys, axial attention and layer sharing."""

from __future__ import annotations

import pytest
import torch

from flash_genie import Config, Denoiser
from flash_genie.config import ConfigError
from flash_genie.model.approx import Approximations, parameter_report
from flash_genie.model.axial import AxialAttention
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
