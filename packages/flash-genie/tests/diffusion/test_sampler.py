"""The ancestral sampler: Genie's recorded 1,000-step run of ``tiny`` and the step formula."""

from __future__ import annotations

import time

import pytest
import torch

from flash_genie import make_schedule, p_step, sample


def _relative_to_step(actual, expected):
    """Per-step max |Δ| divided by max(1, max |x|) of that step: ``[steps]``."""
    dims = tuple(range(1, expected.dim()))
    return (actual - expected).abs().amax(dim=dims) / expected.abs().amax(dim=dims).clamp_min(1.0)


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: at this size (N = 64) a second thread gains ~20 %
    on an idle machine but costs ~5x when another process holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # about 60 s: 1,000 float64 forwards of the tiny model
def test_free_running_replay_of_genie_sampling(genie_reference, reference_model, helpers, one_thread):
    run = genie_reference("tiny")["sampling"]
    model, schedule = reference_model("tiny"), make_schedule(1000, "cosine", torch.float64)
    start = time.perf_counter()
    out = sample(model, run["mask"], schedule, run["noise_scale"], x_init=run["init_noise_raw"], z=run["z"],
                 return_trajectory=True)
    print(f"1000 float64 steps in {time.perf_counter() - start:.1f} s")
    rel = _relative_to_step(out.trajectory, run["trans"])
    print(f"free-running: max relative error {rel.max().item():.3e} (final {rel[-1].item():.3e}), "
          f"final max |x| {run['trans'][-1].abs().max().item():.1f}")
    # Measured (one thread, torch 2.13.0 CPU): 1.1e-15 relative over the trajectory, final rots 2.9e-15.
    assert rel.max() < 6e-15
    helpers.assert_close("final frames", out.rots, run["rots_last"], atol=1.5e-14, rtol=0)
    assert torch.equal(out.x, out.trajectory[-1])


def test_seeded_generator_redraws_genie_noise(genie_reference):
    # Seeding a generator like the original's global RNG replays the same draws, in order.
    run = genie_reference("tiny")["sampling"]
    g = torch.Generator().manual_seed(run["seed"])
    shape = tuple(run["init_noise_raw"].shape)
    assert torch.equal(torch.randn(shape, generator=g, dtype=torch.float64), run["init_noise_raw"])
    for k in range(3):
        assert torch.equal(torch.randn(shape, generator=g, dtype=torch.float64), run["z"][k])


@pytest.mark.parametrize("k", [0, 1, 500, 990, 998, 999])
def test_teacher_forced_steps(genie_reference, reference_model, k):
    run = genie_reference("tiny")["sampling"]
    model, schedule = reference_model("tiny"), make_schedule(1000, "cosine", torch.float64)
    s = int(run["timesteps"][k])
    x = run["trans"][k]
    with torch.no_grad():
        eps = model.predict_noise(x, torch.full((2,), s), run["mask"])
        nxt = p_step(model, schedule, x, s, run["mask"], run["noise_scale"], z=run["z"][k] if s > 0 else None)
    real = run["mask"].bool()
    scale = max(1.0, x.abs().max().item())
    model_err = (x - eps - run["model_trans"][k])[real].abs().max().item()
    step_err = (nxt - run["trans"][k + 1]).abs().max().item()
    print(f"step {k} (s={s}): model |Δ| {model_err:.3e}, step |Δ| {step_err:.3e}, scale {scale:.1f}")
    # Measured: at most 4.2e-16 * scale (the step at k = 0); bound about 5x that.
    assert model_err < 2e-15 * scale and step_err < 2e-15 * scale


# -- tests that need nothing outside the repository ---------------------------------


class ConstantNoise(torch.nn.Module):
    """A stand-in denoiser whose noise estimate is a fixed multiple of the input."""

    n_timestep = 10
    dtype = torch.float64

    def predict_noise(self, xt, timesteps, mask):
        assert timesteps.shape == (xt.shape[0],) and timesteps.dtype == torch.int64
        return 0.5 * xt


def test_step_formula_and_masking():
    schedule = make_schedule(10, "cosine", torch.float64)
    model = ConstantNoise()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    s = 6
    w = (1 - schedule.alphas[s]) / schedule.sqrt_one_minus_alphas_cumprod[s]
    mean = (x - w * 0.5 * x) / schedule.sqrt_alphas[s] * mask[..., None]
    out = p_step(model, schedule, x, s, mask, 0.6, z=z)
    torch.testing.assert_close(out, (mean + 0.6 * schedule.sqrt_betas[s] * z) * mask[..., None])
    g = torch.Generator().manual_seed(0)
    last = p_step(model, schedule, x, 0, mask, 0.6, generator=g)
    w0 = (1 - schedule.alphas[0]) / schedule.sqrt_one_minus_alphas_cumprod[0]
    torch.testing.assert_close(last, (x - w0 * 0.5 * x) / schedule.sqrt_alphas[0] * mask[..., None])
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # s = 0 draws nothing


def test_sample_loop_shapes_draw_order_and_errors():
    schedule = make_schedule(10, "cosine", torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    out = sample(ConstantNoise(), mask, schedule, 0.6, generator=torch.Generator().manual_seed(3), return_trajectory=True)
    assert out.trajectory.shape == (11, 2, 4, 3) and out.rots.shape == (2, 4, 3, 3)
    assert out.x[0, 3].abs().max() == 0
    # The same run with the draws passed explicitly, in the documented order.
    g = torch.Generator().manual_seed(3)
    x_init = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    z = torch.stack([torch.randn(2, 4, 3, generator=g, dtype=torch.float64) for _ in range(9)])
    replay = sample(ConstantNoise(), mask, schedule, 0.6, x_init=x_init, z=z)
    assert torch.equal(replay.x, out.x) and replay.trajectory is None
    with pytest.raises(ValueError, match=r"z must have shape \(9, 2, 4, 3\)"):
        sample(ConstantNoise(), mask, schedule, z=z[:3])
    with pytest.raises(ValueError, match="x_init must have shape"):
        sample(ConstantNoise(), mask, schedule, x_init=x_init[:1])
    with pytest.raises(ValueError, match="the schedule has 20 steps but the model was built for 10"):
        sample(ConstantNoise(), mask, make_schedule(20))
    with pytest.raises(ValueError, match="contiguous prefix"):
        sample(ConstantNoise(), torch.tensor([[0.0, 1, 1, 1]]), schedule)


def test_sample_with_a_real_model(tiny_config, helpers):
    model = helpers.random_model(tiny_config.replace(numTimesteps=10), dtype=torch.float32)
    mask = torch.ones(1, 6)
    out = sample(model, mask, make_schedule(10), generator=torch.Generator().manual_seed(1))
    assert out.x.dtype == torch.float32 and torch.isfinite(out.x).all()


def test_trimmed_padding_gives_the_padded_run(tiny_config, helpers):
    """A batch padded to 20 but no longer than 13 runs over 13 positions (the pair work
    drops to (13/20)²) and gives the padded run's coordinates and draws, float64."""
    model = helpers.random_model(tiny_config.replace(numTimesteps=12))
    mask = torch.zeros(2, 20, dtype=torch.float64)
    mask[0, :13], mask[1, :9] = 1, 1
    calls = []
    model.pair_feature_net.register_forward_hook(lambda mod, args, out: calls.append(out.shape[1]))
    runs = {trim: sample(model, mask, make_schedule(12, "cosine", torch.float64), 0.6, trim_padding=trim,
                         generator=torch.Generator().manual_seed(4), return_trajectory=True)
            for trim in (False, True)}
    assert calls == [20] * 12 + [13] * 12
    err = (runs[True].trajectory - runs[False].trajectory).abs().max() / runs[False].trajectory.abs().max()
    print(f"trimmed vs padded: max relative difference {err:.1e}")
    assert err <= 1e-12
    assert runs[True].x.shape == (2, 20, 3) and (runs[True].x[1, 9:] == 0).all()
    assert torch.equal(runs[True].rots[:, 13:], runs[False].rots[:, 13:])
