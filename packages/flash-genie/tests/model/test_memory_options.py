"""Every memory option gives the plain model's outputs and gradients (float64).

The plain model is the reference backend with nothing chunked, checkpointed or in place:
Genie's own computation. Training mode draws dropout masks from the global RNG, seeded
identically on both sides, so checkpointing must replay them exactly.
"""

from __future__ import annotations

import pytest
import torch

from flash_genie import Config
from flash_genie.diffusion import make_schedule, training_loss
from flash_genie.model.options import MemoryOptions

PLAIN = MemoryOptions(pair_stack_backend="reference")
OPTIONS = {
    "torch backend": MemoryOptions(pair_stack_backend="torch"),
    "ipa chunks": MemoryOptions(pair_stack_backend="reference", ipa_chunk_size=4),
    "transition chunks": MemoryOptions(pair_stack_backend="reference", pair_transition_chunk_size=3),
    "attention chunks": MemoryOptions(pair_stack_backend="torch", triangle_attention_chunk_size=2),
    "in place": MemoryOptions(pair_stack_backend="reference", inplace=True),
    "checkpoint all": MemoryOptions(pair_stack_backend="reference", checkpointing="all"),
    "long sequence": MemoryOptions.long_sequence(memory_budget=1, ipa_chunk_size=5, pair_transition_chunk_size=4),
}
N_RES, LENGTHS = 13, [13, 9]


def _step(helpers, config, options, train, seed=0):
    model = helpers.random_model(config, seed=seed).set_memory_options(options).train(train)
    x, mask = helpers.random_chain(2, N_RES, LENGTHS, seed=1)
    schedule = make_schedule(100, "cosine", dtype=torch.float64)
    torch.manual_seed(5)  # the dropout masks
    noise = torch.randn(2, N_RES, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    loss = training_loss(model, x, mask, schedule, timesteps=torch.tensor([3, 70]), noise=noise)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _max_error(grads, expected) -> float:
    """Largest gradient difference relative to the largest gradient (a gradient that is zero
    by symmetry, e.g. IPA's key-constant bias, carries only rounding noise)."""
    scale = max(g.abs().max().item() for g in expected.values())
    return max((grads[k] - expected[k]).abs().max().item() for k in expected) / scale


_PLAIN_STEPS: dict[bool, tuple] = {}


@pytest.fixture
def plain_step(tiny_config, helpers):
    """The plain model's step, computed once per mode for all the parametrized tests."""

    def step(train: bool):
        if train not in _PLAIN_STEPS:
            _PLAIN_STEPS[train] = _step(helpers, tiny_config, PLAIN, train)
        return _PLAIN_STEPS[train]

    return step


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_gives_the_plain_gradients(tiny_config, helpers, plain_step, name, train):
    loss0, grads0 = plain_step(train)
    loss1, grads1 = _step(helpers, tiny_config, OPTIONS[name], train)
    err = _max_error(grads1, grads0)
    print(f"{name} ({'train' if train else 'eval'}): |Δloss| = {abs(loss1 - loss0).item():.1e}, "
          f"max |Δgrad| / max |grad| = {err:.1e}")
    assert abs(loss1 - loss0).item() <= 1e-12 * abs(loss0).item()
    assert err <= 1e-12
    assert all(g is not None for g in grads1.values())


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_gives_the_plain_inference(tiny_config, helpers, name):
    x, mask = helpers.random_chain(2, N_RES, LENGTHS, seed=2)
    steps = torch.tensor([10, 90])
    with torch.no_grad():
        expected = helpers.random_model(tiny_config).set_memory_options(PLAIN).predict_noise(x, steps, mask)
        model = helpers.random_model(tiny_config).set_memory_options(OPTIONS[name])
        actual = model.predict_noise(x, steps, mask)
    real = mask.bool()
    assert helpers.report(name, actual[real], expected[real]) <= 1e-12 * expected.abs().max().item()


def test_inplace_residuals_keep_the_float32_stream_under_autocast(tiny_config, helpers):
    """Under bf16 autocast an update is bfloat16 and the stream float32: adding in place
    into the update would round the stream to bfloat16. The in-place path must give the
    very same numbers as the plain one."""
    config = tiny_config
    results = []
    for inplace in (False, True):
        model = helpers.random_model(config, dtype=torch.float32).set_memory_options(
            MemoryOptions(pair_stack_backend="torch", inplace=inplace, pair_transition_chunk_size=5))
        x, mask = helpers.random_chain(2, N_RES, LENGTHS, seed=1, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps = model.predict_noise(x, torch.tensor([3, 70]), mask)
        eps.sum().backward()
        results.append((eps.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_checkpoint_plan_follows_the_policy(tiny_config, helpers):
    model = helpers.random_model(tiny_config)
    n_pair, n_struct = 1, 2 * 2  # TINY_CONFIG: 1 pair layer; 2 structure layers run twice
    assert model.checkpoint_plan(2, 16) == (0, 0)
    model.set_memory_options(MemoryOptions(checkpointing="all"))
    assert model.checkpoint_plan(2, 16) == (n_pair, n_struct)
    with torch.no_grad():  # nothing to recompute without autograd
        assert model.checkpoint_plan(2, 16) == (0, 0)
    # auto: everything when nothing fits, nothing when everything does, more as N grows
    model.set_memory_options(MemoryOptions(checkpointing="auto", memory_budget=1))
    assert model.checkpoint_plan(2, 16) == (n_pair, n_struct)
    model.set_memory_options(MemoryOptions(checkpointing="auto", memory_budget=2**40))
    assert model.checkpoint_plan(2, 16) == (0, 0)


def test_config_sets_the_options(tiny_config, helpers):
    config = tiny_config.replace(pairStackBackend="reference", activationCheckpointing="all", ipaChunkSize=8,
                                 pairTransitionChunkSize=16, triangleAttentionChunkSize=4, inplaceResidual=True,
                                 memoryBudget="2GiB")
    options = MemoryOptions.from_config(config)
    assert options == MemoryOptions("reference", "all", 2 * 2**30, 8, 16, 4, True)
    assert Config({**tiny_config.explicit, **options.to_config()}).memory == config.memory
    model = helpers.random_model(config)
    net, layer = model.pair_transform_net, model.pair_transform_net.net[0]
    assert (net.chunk_size, net.transition_chunk_size, net.inplace) == (4, 16, True)
    assert {layer.tri_mul_out.backend, layer.tri_att_end.backend} == {"reference"}
    assert {lay.ipa.chunk_size for lay in model.structure_net.net} == {8}
    default = helpers.random_model(tiny_config)
    assert default.memory == MemoryOptions() and layer.tri_mul_in.backend == "reference"
    assert default.pair_transform_net.net[0].tri_mul_in.backend is None


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="checkpointing"):
        MemoryOptions(checkpointing="some")
    with pytest.raises(ValueError, match="pair_stack_backend"):
        MemoryOptions(pair_stack_backend="cuda")
    with pytest.raises(ValueError, match="ipa_chunk_size"):
        MemoryOptions(ipa_chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_long_sequence_as_accurate_as_plain(tiny_config, helpers, dtype):
    """Under autocast the long-sequence configuration's gradients are as close to float64
    as the plain model's in the same precision (the flash-attention rule, on the relative
    error of all gradients together; in bfloat16 averaged over three models, as one run
    is a noisy sample). In float16 the plain reference backend overflows (its 1e9 attention
    mask bias is -inf in float16, so a padded row is NaN); flash-genie's default, genie-tk's
    torch backend, keeps that bias in float32 and is the comparison there."""

    def grads(options, seed, low):
        model = helpers.random_model(tiny_config, seed=seed)
        x, mask = helpers.random_chain(2, N_RES, LENGTHS, seed=1)
        noise = torch.randn(2, N_RES, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        if low:
            model, x, mask, noise = model.float(), x.float(), mask.float(), noise.float()
        model.set_memory_options(options)
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            loss = training_loss(model, x, mask, make_schedule(100, "cosine", dtype=torch.float64),
                                 timesteps=torch.tensor([3, 70]), noise=noise)
        loss.backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters()])

    # float16 compares two runs of the same backend: one model is enough.
    reference, seeds = ("plain", 3) if dtype == torch.bfloat16 else ("default", 1)
    configurations = {"plain": PLAIN, "default": MemoryOptions(), "long": OPTIONS["long sequence"]}
    errors = {reference: 0.0, "long": 0.0}
    for seed in range(seeds):
        exact = grads(PLAIN, seed, low=False)
        for name in errors:
            err = (grads(configurations[name], seed, low=True) - exact).norm() / exact.norm()
            errors[name] += err.item() / seeds
    print(dtype, {k: f"{v:.2e}" for k, v in errors.items()})
    assert 0 < errors["long"] <= 2 * errors[reference]
