"""The whole denoiser: Genie's outputs in float64 and float32, input checks, symmetries, gradients."""

from __future__ import annotations

import pytest
import torch

from flash_genie import Rigid, genie_loss
from flash_genie.model.rigid import quaternion_to_rotation

NAMES = ["scope_l_128", "tiny", "tiny_triatt"]
# Absolute float64 bounds, about 5x the largest measured over NAMES (torch 2.13.0 CPU): trans and
# eps_pred 1.1e-14 (scope_l_128, |trans| up to 51 Å), rots 6.3e-15, loss 4.4e-16.
ATOL64 = {"trans": 5e-14, "rots": 3e-14, "eps_pred": 5e-14, "loss": 2e-15}


@pytest.mark.parametrize("name", NAMES)
def test_float64_outputs_match_genie(genie_reference, reference_model, helpers, name):
    ref = genie_reference(name)
    inputs, outputs = ref["inputs"], ref["outputs"]
    model, mask = reference_model(name), inputs["mask"]
    real = mask.bool()
    with torch.no_grad():
        frames = model(Rigid(inputs["rots_t"], inputs["xt"]), inputs["timesteps"], mask)
        eps = model.predict_noise(inputs["xt"], inputs["timesteps"], mask)
        loss = genie_loss(eps, inputs["noise"], mask)
    for key, value in (("trans", frames.trans), ("rots", frames.rots), ("eps_pred", eps)):
        helpers.assert_close(f"{name} {key}", value[real], outputs[key][real], atol=ATOL64[key], rtol=0)
    assert helpers.report(f"{name} loss", loss, outputs["loss"]) <= ATOL64["loss"]


@pytest.mark.parametrize("name", NAMES)
def test_float32_outputs_match_genie_float32(genie_reference, reference_model, helpers, name):
    ref = genie_reference(name)
    inputs, outputs = ref["inputs"], ref["outputs"]
    model, mask = reference_model(name, torch.float32), inputs["mask"].float()
    real = mask.bool()
    with torch.no_grad():
        frames = model(Rigid(inputs["rots_t_float32"], inputs["xt_float32"]), inputs["timesteps"], mask)
        eps = model.predict_noise(inputs["xt_float32"], inputs["timesteps"], mask)
    assert eps.dtype == torch.float32
    helpers.assert_close(f"{name} trans32", frames.trans[real], outputs["trans_float32"][real], atol=2e-4, rtol=1e-4)
    helpers.assert_close(f"{name} rots32", frames.rots[real], outputs["rots_float32"][real], atol=2e-4, rtol=1e-4)
    helpers.assert_close(f"{name} eps32", eps[real], outputs["eps_pred_float32"][real], atol=2e-4, rtol=1e-4)
    helpers.assert_close(f"{name} eps32 vs f64", eps[real].double(), outputs["eps_pred"][real], atol=2e-4, rtol=0)


def test_padded_values_do_not_matter(genie_reference, reference_model, helpers):
    ref = genie_reference("tiny")
    inputs, mask = ref["inputs"], ref["inputs"]["mask"]
    model = reference_model("tiny")
    zeroed = inputs["xt"] * mask.unsqueeze(-1)
    with torch.no_grad():
        a = model.predict_noise(inputs["xt"], inputs["timesteps"], mask)
        b = model.predict_noise(zeroed, inputs["timesteps"], mask)
    real = mask.bool()
    assert helpers.report("padding independence", a[real], b[real]) == 0.0


# -- tests that need nothing outside the repository ---------------------------------


def _rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, generator=g, dtype=torch.float64)
    return quaternion_to_rotation(q / q.norm())


def test_noise_prediction_is_rotation_equivariant_and_translation_invariant(tiny_config, helpers):
    model = helpers.random_model(tiny_config)
    x, mask = helpers.random_chain(2, 12, [12, 8], seed=3)
    steps = torch.tensor([5, 80])
    r, shift = _rotation(4), torch.tensor([3.0, -7.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        eps = model.predict_noise(x, steps, mask)
        eps_moved = model.predict_noise((x @ r.T + shift) * mask.unsqueeze(-1), steps, mask)
    real = mask.bool()
    err = helpers.report("equivariance", eps_moved[real], (eps @ r.T)[real])
    assert err < 1e-10
    assert eps[real].abs().max() > 1e-2  # not trivially zero


def test_batch_elements_are_independent_and_padding_is_ignored(tiny_config, helpers):
    model = helpers.random_model(tiny_config)
    x, mask = helpers.random_chain(3, 10, [10, 6, 3], seed=5)
    steps = torch.tensor([0, 42, 99])
    junk = x.clone()
    junk[1, 6:] = torch.randn(4, 3, dtype=x.dtype) * 30
    with torch.no_grad():
        full = model.predict_noise(x, steps, mask)
        alone = model.predict_noise(x[1:2], steps[1:2], mask[1:2])
        with_junk = model.predict_noise(junk, steps, mask)
    helpers.assert_close("batch independence", full[1, :6], alone[0, :6], atol=1e-12, rtol=0)
    helpers.assert_close("padding junk", with_junk[mask.bool()], full[mask.bool()], atol=1e-12, rtol=0)


def test_gradients_reach_every_parameter(tiny_config, helpers):
    model = helpers.random_model(tiny_config).train()
    x, mask = helpers.random_chain(2, 9, [9, 7], seed=6)
    torch.manual_seed(7)
    eps = model.predict_noise(x, torch.tensor([10, 60]), mask)
    loss = genie_loss(eps, torch.randn_like(x) * mask.unsqueeze(-1), mask)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_float32_and_float64_agree(tiny_config, helpers):
    model = helpers.random_model(tiny_config)
    x, mask = helpers.random_chain(2, 9, [9, 5], seed=8)
    steps = torch.tensor([1, 70])
    with torch.no_grad():
        eps64 = model.predict_noise(x, steps, mask)
        eps32 = model.float().predict_noise(x.float(), steps, mask.float())
    helpers.assert_close("float32 vs float64", eps32.double()[mask.bool()], eps64[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("xt", "steps", "mask", "error", "pattern"),
    [
        ((2, 5, 2), (2,), (2, 5), ValueError, r"xt must be a \[B, N, 3\]"),
        ((2, 5, 3), (2,), (2, 4), ValueError, r"mask must have shape \[B, N\]"),
        ((2, 5, 3), (3,), (2, 5), ValueError, r"timesteps must have shape \[B\]"),
        ((2, 5, 3), "float", (2, 5), TypeError, "timesteps must be an integer"),
        ((2, 5, 3), "big", (2, 5), ValueError, r"timesteps must lie in \[0, 100\)"),
        ((2, 5, 3), "neg", (2, 5), ValueError, r"timesteps must lie in \[0, 100\)"),
        ((2, 5, 3), (2,), "holes", ValueError, "contiguous prefix"),
        ("f32", (2,), (2, 5), TypeError, "xt is torch.float32 but the model is torch.float64"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_config, helpers, xt, steps, mask, error, pattern):
    model = helpers.random_model(tiny_config)
    xt = torch.zeros(2, 5, 3, dtype=torch.float32) if xt == "f32" else torch.zeros(xt, dtype=torch.float64)
    steps = {
        "float": torch.zeros(2), "big": torch.tensor([0, 100]), "neg": torch.tensor([-1, 0])
    }.get(steps, None) if isinstance(steps, str) else torch.zeros(steps, dtype=torch.long)
    mask = torch.tensor([[1.0, 0, 1, 0, 0], [1, 1, 1, 1, 1]]) if mask == "holes" else torch.ones(mask)
    with pytest.raises(error, match=pattern):
        model.predict_noise(xt, steps, mask.double())


def test_python_int_timestep_and_bool_mask(tiny_config, helpers):
    model = helpers.random_model(tiny_config)
    x, mask = helpers.random_chain(2, 7, [7, 4], seed=9)
    with torch.no_grad():
        a = model.predict_noise(x, 12, mask.bool())
        b = model.predict_noise(x, torch.tensor([12, 12]), mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bf16_autocast_stays_close_to_float32(tiny_config, helpers):
    # Frames, IPA softmax and the loss keep at least float32 under autocast.
    model = helpers.random_model(tiny_config, dtype=torch.float32)
    x, mask = helpers.random_chain(2, 10, [10, 7], seed=10, dtype=torch.float32)
    steps = torch.tensor([4, 77])
    with torch.no_grad():
        ref = model.predict_noise(x, steps, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.predict_noise(x, steps, mask)
            loss = genie_loss(low, ref, mask)
    assert low.dtype == torch.float32 and loss.dtype == torch.float32
    err = helpers.report("bf16 autocast vs float32", low[mask.bool()], ref[mask.bool()])
    assert err < 0.05 * ref.abs().max().item()
