"""Forward noising and Genie's loss."""

from __future__ import annotations

import pytest
import torch

from flash_genie import genie_loss, make_schedule, q_sample, training_loss
from flash_genie.diffusion.noising import sample_timesteps


def test_q_sample_and_loss_match_genie(genie_reference, reference_model, helpers):
    ref = genie_reference("tiny")
    inputs, outputs = ref["inputs"], ref["outputs"]
    schedule = make_schedule(1000, "cosine", torch.float64)
    xt, noise = q_sample(inputs["x0"], inputs["timesteps"], inputs["mask"], schedule, noise=inputs["noise"])
    helpers.assert_close("xt", xt, inputs["xt"], atol=1e-12, rtol=0)
    assert torch.equal(noise, inputs["noise"])
    with torch.no_grad():
        loss = training_loss(reference_model("tiny"), inputs["x0"], inputs["mask"], schedule,
                             timesteps=inputs["timesteps"], noise=inputs["noise"])
    helpers.report("training loss", loss, outputs["loss"])
    assert abs(loss.item() - outputs["loss"].item()) < 1e-10


def test_genie_loss_formula():
    torch.manual_seed(0)
    pred, eps = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    norms = torch.sqrt(1e-10 + ((pred - eps) ** 2).sum(-1))
    expected = (norms * mask).sum() / mask.sum()  # unsquared norm, mean over real residues
    torch.testing.assert_close(genie_loss(pred, eps, mask), expected)
    assert genie_loss(eps, eps, mask).item() == pytest.approx(1e-5)
    half = genie_loss(pred.bfloat16(), eps.bfloat16(), mask.bfloat16())
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[B, N, 3\]"):
        genie_loss(pred, eps, mask[:, :3])


def test_q_sample_masks_noise_and_draws_reproducibly():
    schedule = make_schedule(100, "cosine", torch.float64)
    x0 = torch.randn(2, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    steps = torch.tensor([0, 99])
    a = q_sample(x0, steps, mask, schedule, generator=torch.Generator().manual_seed(1))
    b = q_sample(x0, steps, mask, schedule, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and a[1][0, 3:].abs().max() == 0
    expected = schedule.sqrt_alphas_cumprod[99] * x0[1] + schedule.sqrt_one_minus_alphas_cumprod[99] * a[1][1]
    torch.testing.assert_close(a[0][1], expected)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        q_sample(x0, steps, mask, schedule, noise=torch.zeros(2, 5, 2))
    t = sample_timesteps(1000, 100, torch.Generator().manual_seed(2))
    assert t.min() >= 0 and t.max() <= 99 and t.dtype == torch.int64


def test_a_training_step_lowers_the_loss(tiny_config, helpers):
    model = helpers.random_model(tiny_config, seed=3, dtype=torch.float32)
    schedule = make_schedule(tiny_config["numTimesteps"])
    x0, mask = helpers.random_chain(4, 12, [12, 10, 8, 12], seed=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    steps = torch.randint(0, 100, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def loss_now():
        with torch.no_grad():
            return training_loss(model.eval(), x0, mask, schedule, timesteps=steps, noise=noise).item()

    before = loss_now()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(6)
    for _ in range(5):
        optimizer.zero_grad()
        training_loss(model.train(), x0, mask, schedule, timesteps=steps, noise=noise).backward()
        optimizer.step()
    after = loss_now()
    print(f"loss before {before:.4f}, after {after:.4f}")
    assert after < before
