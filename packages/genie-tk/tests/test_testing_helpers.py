"""The shared test helpers of :mod:`genie_tk.testing` that the GPU tests rely on."""

from __future__ import annotations

import pytest
import torch

from genie_tk.testing import rel, row_error


def test_row_error_names_the_one_wrong_row_a_frobenius_norm_hides():
    g = torch.Generator().manual_seed(0)
    want = torch.randn(2, 5, 3, 64, 16, generator=g)
    got = want + 1e-4 * torch.randn(want.shape, generator=g)
    got[1, 3, 2, 40] *= 1.5  # one query row scaled: 50% wrong
    err, where = row_error(got, want)
    print(err, where, rel(got, want))
    assert where == (1, 3, 2, 40)
    assert 0.45 < err < 0.55
    assert rel(got, want) < 0.05  # the whole-tensor error is ten times smaller


def test_row_error_unwritten_rows_zero_rows_and_shapes():
    want = torch.randn(4, 8)
    assert row_error(want, want) == (0.0, (0,))
    got = want.clone()
    got[2, 5] = float("nan")
    assert row_error(got, want) == (float("inf"), (2,))
    # A row that is zero in `want` is measured against the floor (1e-3 of the
    # tensor's largest value), not divided by zero.
    want[3] = 0
    got = want.clone()
    got[3, 0] = 1e-6 * want.abs().max()
    err, where = row_error(got, want)
    assert where == (3,) and err == pytest.approx(1e-3)
    assert row_error(want.flatten(), want.flatten(), row_dims=0)[0] == 0.0
    with pytest.raises(ValueError, match="got has shape"):
        row_error(want, want[:2])
