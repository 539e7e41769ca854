"""The built-in dataset: size, contents, provenance, and reproducibility from the shared npz."""

from __future__ import annotations

import pickle
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

from flash_genie.data import Dataset, builtin_dataset
from flash_genie.data.filters import ca_steps

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_builtin_dataset.py"


def test_builtin_contents():
    ds = builtin_dataset()
    size = sum(p.stat().st_size for p in ds.path.iterdir())
    print(f"built-in: {len(ds)} chains, {ds.lengths.sum()} residues, {size / 1e6:.2f} MB")
    assert size <= 3_000_000
    assert len(ds) == 1000 and ds.lengths.min() >= 50 and ds.lengths.max() <= 256
    assert all(re.fullmatch(r"[0-9A-Z]{4}_\w+", n) for n in ds.names)
    assert len(set(ds.sequences)) == len(ds)
    assert all(ca_steps(ds.coords(i)).max() <= 4.2 for i in range(0, len(ds), 37))
    readme = (ds.path / "README.md").read_text()
    for needed in ("promod3-data", "Apache-2.0", "CC0", "make_builtin_dataset.py", "sha256"):
        assert needed in readme
    assert ds.meta["source"]["kind"] == "npz" and ds.meta["report"]["kept"] == 1000


def test_builtin_is_reproducible(shared_dir, tmp_path):
    """Running the committed script on the shared npz gives the committed files."""
    out = tmp_path / "builtin"
    runpy.run_path(str(TOOL), run_name="not_main")["main"]([str(shared_dir / "data" / "pdb_chains_ca.npz"), "--out", str(out)])
    built, shipped = Dataset.open(out), builtin_dataset()
    assert built.names == shipped.names and built.sequences == shipped.sequences
    np.testing.assert_array_equal(np.asarray(built._ca), np.asarray(shipped._ca))
    assert (out / "README.md").read_text() == (shipped.path / "README.md").read_text()


def test_builtin_matches_shared_chains(shared_dir):
    from flash_genie.data import read_npz_chains

    wanted = set(builtin_dataset().names)
    source = {c.name: c for c in read_npz_chains(shared_dir / "data" / "pdb_chains_ca.npz") if c.name in wanted}
    ds = builtin_dataset()
    for i in range(0, len(ds), 50):
        coords, name, seq = ds[i]
        assert source[name].sequence == seq
        np.testing.assert_array_equal(coords, source[name].ca)


def test_pickle_reopens_files():
    ds = builtin_dataset()
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 10_000  # the arrays are not in the pickle
    assert isinstance(copy._ca, np.memmap) and copy.names == ds.names


@pytest.mark.parametrize("i", [0, 999])
def test_builtin_items(i):
    coords, _, seq = builtin_dataset()[i]
    assert coords.shape == (len(seq), 3) and coords.dtype == np.float32 and coords.flags.writeable
