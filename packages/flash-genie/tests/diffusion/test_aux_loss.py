"""The auxiliary pairwise-distance loss: FrameDiff's formula, chunked equal to dense, O(chunk·N)."""

from __future__ import annotations

import pytest
import torch

from flash_genie import Config, make_schedule, training_loss
from flash_genie.diffusion import genie_loss, loss_options, pairwise_distance_loss, q_sample
from flash_genie.memtrack import TensorMemoryTracker


def _chains(batch=2, n=20, lengths=(20, 13), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cumsum(3.8 * torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=g, dtype=torch.float64),
                                                         dim=-1), dim=1)
    pred = x + 0.7 * torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).double()
    return pred, x, mask


def test_formula_by_hand():
    pred, x, mask = _chains()
    expected = []
    for b in range(2):
        length = int(mask[b].sum())
        num = den = 0.0
        for i in range(length):
            for j in range(length):
                d = (x[b, i] - x[b, j]).norm().item()
                if i != j and d < 6.0:
                    num += ((pred[b, i] - pred[b, j]).norm().item() - d) ** 2
                    den += 1
        expected.append(num / den)
    actual = pairwise_distance_loss(pred, x, mask, cutoff=6.0)
    print(actual, expected)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_equals_dense_with_gradients(chunk_size):
    pred, x, mask = _chains(seed=1)
    pred = pred.requires_grad_()
    weights = torch.tensor([0.3, 1.7], dtype=torch.float64)
    dense = pairwise_distance_loss(pred, x, mask)
    (g_dense,) = torch.autograd.grad((dense * weights).sum(), pred)
    chunk = pairwise_distance_loss(pred, x, mask, chunk_size=chunk_size)
    (g_chunk,) = torch.autograd.grad((chunk * weights).sum(), pred)
    torch.testing.assert_close(chunk, dense, atol=0, rtol=1e-13)
    torch.testing.assert_close(g_chunk, g_dense, atol=1e-14, rtol=1e-12)
    assert g_dense.abs().max() > 0.01


def test_chunked_memory_is_linear_in_the_length():
    n, chunk = 384, 16
    pred, x, mask = _chains(1, n, (n,), seed=2)
    pred, x, mask = pred.float().requires_grad_(), x.float(), mask.float()
    peaks = {}
    for size in (None, chunk):
        with TensorMemoryTracker() as tracker:
            pairwise_distance_loss(pred, x, mask, chunk_size=size).sum().backward()
        peaks[size] = tracker.peak
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()})
    assert peaks[None] > 4 * n * n * 4  # the dense loss holds several [N, N] float32 matrices
    assert peaks[chunk] < 12 * chunk * n * 4 * 4 + 2 * n * 3 * 4 * 8  # a few [chunk, N] blocks (and [N, 3] tensors)


def test_training_loss_adds_the_weighted_auxiliary_term(tiny_config, helpers):
    model = helpers.random_model(tiny_config)
    x0, mask = helpers.random_chain(2, 12, [12, 9], seed=3)
    schedule = make_schedule(100, "cosine", dtype=torch.float64)
    steps, noise = torch.tensor([5, 60]), torch.randn(2, 12, 3, dtype=torch.float64)
    base = training_loss(model, x0, mask, schedule, timesteps=steps, noise=noise)
    total = training_loss(model, x0, mask, schedule, timesteps=steps, noise=noise, aux_distance_weight=0.5,
                          aux_distance_cutoff=8.0, aux_distance_time_fraction=0.25, loss_chunk_size=4)
    xt, eps = q_sample(x0, steps, mask, schedule, noise=noise)
    with torch.no_grad():
        eps_pred = model.predict_noise(xt, steps, mask)
    a, b = schedule.sqrt_alphas_cumprod[steps].view(-1, 1, 1), schedule.sqrt_one_minus_alphas_cumprod[steps].view(-1, 1, 1)
    aux = pairwise_distance_loss((xt - b * eps_pred) / a, x0, mask, cutoff=8.0)
    expected = genie_loss(eps_pred, eps, mask) + 0.5 * (aux[0] * 1 + aux[1] * 0) / 2  # only s=5 < 25
    torch.testing.assert_close(total.detach(), expected, atol=1e-12, rtol=1e-12)
    assert total.item() > base.item()


def test_loss_options_from_config():
    config = Config.from_text("auxDistanceLossWeight 0.25\nauxDistanceCutoff 8\nlossChunkSize 32\n")
    assert loss_options(config) == {"aux_distance_weight": 0.25, "aux_distance_cutoff": 8.0,
                                    "aux_distance_time_fraction": 0.25, "loss_chunk_size": 32}
    assert loss_options(Config())["aux_distance_weight"] == 0.0 and loss_options(Config())["loss_chunk_size"] is None
