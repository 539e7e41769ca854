"""Sinusoidal encodings and relative-position bins."""

from __future__ import annotations

import math

import pytest
import torch

from flash_genie.model.encodings import relative_position_bins, sinusoidal_encoding


@pytest.mark.parametrize("name", ["scope_l_128", "tiny"])
def test_encodings_match_genie(genie_reference, helpers, name):
    ref = genie_reference(name)
    model = ref["config_resolved"]["model"]
    n_res = ref["inputs"]["xt"].shape[1]
    pos = sinusoidal_encoding(torch.arange(n_res), n_res, model["c_pos_emb"], torch.float64)
    time = sinusoidal_encoding(ref["inputs"]["timesteps"], 1000, model["c_timestep_emb"], torch.float64)
    helpers.assert_close("pos_emb", pos, ref["intermediates"]["pos_emb"], atol=1e-12, rtol=0)
    helpers.assert_close("timestep_emb", time, ref["intermediates"]["timestep_emb"], atol=1e-12, rtol=0)


def test_encoding_layout():
    # Channel j: cos(v·π / N^(2j/D)) for even j, sin(v·π / N^(2(j+1)/D)) for odd j.
    v, n, d = torch.tensor([0, 3, 17]), 50, 6
    enc = sinusoidal_encoding(v, n, d, torch.float64)
    assert enc.shape == (3, 6) and enc.dtype == torch.float64
    for i, vi in enumerate(v.tolist()):
        for j in range(d):
            e = 2 * j / d if j % 2 == 0 else 2 * (j + 1) / d
            fn = math.cos if j % 2 == 0 else math.sin
            assert math.isclose(enc[i, j].item(), fn(vi * math.pi / n**e), abs_tol=1e-14)


def test_encoding_float32_dtype():
    enc = sinusoidal_encoding(torch.arange(5), 5, 8, torch.float32)
    assert enc.dtype == torch.float32


def test_relative_position_bins():
    bins = relative_position_bins(6, 2)
    assert bins.dtype == torch.int64
    assert bins[0, 0] == 2 and bins[3, 1] == 4 and bins[1, 3] == 0  # clip(i - j, -2, 2) + 2
    assert bins[5, 0] == 4 and bins[0, 5] == 0
