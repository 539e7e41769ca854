"""Sampled backbones are written without loss, also when they leave the PDB format."""

from __future__ import annotations

import numpy as np
import pytest

from flash_genie.eval.report import read_samples
from flash_genie.sampling import Backbone, write_backbones


def test_diverged_sample_is_written_as_mmcif(tmp_path):
    ok = np.cumsum(np.full((20, 3), 2.2), axis=0)
    far = ok * 400  # reaches 17,600 Å: no room in the PDB format's columns
    backbones = [Backbone(length=20, index=0, coords=ok), Backbone(length=20, index=1, coords=far)]
    with pytest.warns(UserWarning, match="20_1 reaches 17600 Å, beyond the PDB format: written as 20_1.cif"):
        out = write_backbones(backbones, tmp_path)
    assert sorted(p.name for p in (out / "pdbs").iterdir()) == ["20_0.pdb", "20_1.cif"]
    chains, skipped = read_samples(out / "pdbs")
    assert not skipped and [c.name for c in chains] == ["20_0", "20_1"]
    np.testing.assert_allclose(chains[1].ca, far, atol=1e-3, rtol=0)
