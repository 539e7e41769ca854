"""TM-score: our corresponding-residue search against known answers and against TM-align."""

from __future__ import annotations

import numpy as np
import pytest
import tmtools

from flash_genie.data import builtin_dataset
from flash_genie.eval import single_linkage_clusters, tm_score
from flash_genie.eval import tmscore as tm_module


def random_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.fixture(scope="module")
def chain():
    return builtin_dataset().coords(7).astype(np.float64)


def test_identical_and_rotated(chain):
    assert tm_score(chain, chain) == pytest.approx(1.0, abs=1e-12)
    moved = chain @ random_rotation(1).T + np.array([40.0, -3.0, 7.0])
    assert tm_score(moved, chain) == pytest.approx(1.0, abs=1e-9)


def test_d0_and_errors():
    assert tm_module.tm_d0(100) == pytest.approx(1.24 * 85 ** (1 / 3) - 1.8)
    assert tm_module.tm_d0(10) == 0.5
    with pytest.raises(ValueError, match="equal length"):
        tm_score(np.zeros((5, 3)), np.zeros((6, 3)))


def test_partial_match_finds_the_good_part(chain):
    """Half the chain moved rigidly far away: the search superposes the other half (TM ≈ 0.5)."""
    broken = chain.copy()
    half = len(chain) // 2
    broken[half:] = broken[half:] @ random_rotation(2).T + 30.0
    score = tm_score(broken, chain)
    print(f"half-moved chain: TM {score:.3f}")
    assert 0.4 < score < 0.6  # a single global superposition would give far less


@pytest.mark.parametrize("noise", [0.5, 1.5, 3.0])
def test_agrees_with_tm_align(chain, noise):
    rng = np.random.default_rng(int(noise * 10))
    noisy = (chain + rng.normal(scale=noise, size=chain.shape)) @ random_rotation(3).T
    ours = tm_score(noisy, chain)
    result = tmtools.tm_align(noisy, chain, "A" * len(chain), "A" * len(chain))
    # TM-align's superposition, scored with our residue correspondence: our search maximises
    # over superpositions, so it must do as well, up to what a heuristic search can miss.
    dist = np.linalg.norm(noisy @ result.u.T + result.t - chain, axis=1)
    at_theirs = np.mean(1.0 / (1.0 + (dist / tm_module.tm_d0(len(chain))) ** 2))
    print(f"noise {noise} Å: ours {ours:.4f}, TM-align {result.tm_norm_chain1:.4f}, "
          f"TM-align's superposition with our correspondence {at_theirs:.4f}")
    assert ours >= at_theirs - 1e-3
    if noise <= 1.5:  # the residue correspondence is then also TM-align's alignment
        assert ours == pytest.approx(result.tm_norm_chain1, abs=2e-3)


def test_tm_align_and_novelty(chain):
    rotated = chain @ random_rotation(4).T
    assert tm_module.tm_align(rotated, chain) == pytest.approx((1.0, 1.0), abs=1e-6)
    sub = chain[10:70]
    tm_sub, tm_full = tm_module.tm_align(sub, chain)
    assert tm_sub > 0.95 and tm_full < tm_sub  # normalised by the longer chain it is lower
    others = [builtin_dataset().coords(i) for i in (20, 30)]
    assert tm_module.novelty(sub, [*others, chain]) == pytest.approx(tm_sub)
    pair = tm_module.pairwise_tm([chain, rotated, others[0]])
    assert pair[0, 1] == pytest.approx(1.0, abs=1e-6) and np.allclose(pair, pair.T)


def test_tm_align_unavailable(monkeypatch, chain):
    import builtins

    real_import = builtins.__import__

    def no_tmtools(name, *args, **kwargs):
        if name == "tmtools":
            raise ImportError("no tmtools here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tmtools)
    assert not tm_module.has_tm_align()
    with pytest.raises(tm_module.TMalignUnavailable, match="pip install tmtools"):
        tm_module.tm_align(chain, chain)


def test_single_linkage_clusters():
    sim = np.array([[1, 0.6, 0.1, 0.1], [0.6, 1, 0.55, 0.1], [0.1, 0.55, 1, 0.2], [0.1, 0.1, 0.2, 1]])
    assert single_linkage_clusters(sim, 0.5).tolist() == [0, 0, 0, 1]
    assert single_linkage_clusters(sim, 0.58).tolist() == [0, 0, 1, 2]
