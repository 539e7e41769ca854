"""TM-score: our own for traces with known residue correspondence, TM-align for the rest.

* :func:`tm_score` — two traces of the same length whose residues correspond (a sample and
  a perturbed copy, two models of one sequence). TM-score (Zhang & Skolnick, Proteins
  57:702, 2004) with the superposition search of the TM-score program: Kabsch on seed
  fragments of length L, L/2, L/4, … (≥ 4 residues, starting every half fragment), then
  repeatedly re-superposed on the residues within ``d0_search = clip(d0, 4.5, 8)`` Å; the
  best score over all seeds and iterations is returned. Pure numpy, batched over seeds.
* :func:`tm_align` — different chains (any lengths): TM-align (Zhang & Skolnick, NAR
  33:2302, 2005) through the ``tmtools`` package (GPL-3.0 bindings of TM-align), a dependency
  of flash-genie, so that diversity and novelty are always computed. Should it fail to
  import, :class:`TMalignUnavailable` says so and how to reinstall it.
"""

from __future__ import annotations

import numpy as np

from flash_genie.eval.geometry import kabsch

SEARCH_ITERATIONS = 20


class TMalignUnavailable(ImportError):
    """TM-align (the ``tmtools`` package) is not installed."""


def tm_d0(length: int) -> float:
    """TM-score's distance scale d0(L) = 1.24·(L − 15)^(1/3) − 1.8 Å, at least 0.5 Å."""
    if length <= 21:  # the formula goes below 0.5 Å (and negative) for short chains
        return 0.5
    return max(1.24 * (length - 15) ** (1.0 / 3.0) - 1.8, 0.5)


def _seeds(length: int) -> np.ndarray:
    """Boolean ``[S, L]`` masks of the seed fragments."""
    masks, frag = [], length
    while True:
        step = max(frag // 2, 1)
        for start in range(0, length - frag + 1, step):
            m = np.zeros(length, dtype=bool)
            m[start : start + frag] = True
            masks.append(m)
        if frag // 2 < 4:
            break
        frag //= 2
    return np.array(masks)


def tm_score(x, y, normalize_by: int | None = None) -> float:
    """TM-score of ``x`` against ``y`` for corresponding residues (see the module docstring).

    Args:
        x, y: ``[L, 3]`` Cα coordinates in Å, residue ``i`` of ``x`` matching residue ``i``
            of ``y`` (L ≥ 3).
        normalize_by: the length in the score's denominator and d0 (default L).

    Returns:
        TM-score in (0, 1]; 1 for identical traces up to rotation and translation.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[1] != 3 or len(x) < 3:
        raise ValueError(f"tm_score needs two [L, 3] traces of equal length L >= 3, got {x.shape}, {y.shape}")
    length = len(x)
    norm = normalize_by or length
    d0 = tm_d0(norm)
    d_search = float(np.clip(d0, 4.5, 8.0))
    weights = _seeds(length).astype(np.float64)
    best = 0.0
    for _ in range(SEARCH_ITERATIONS):
        r, t = kabsch(x[None], y[None], weights)
        moved = np.einsum("sij,lj->sli", r, x) + t[:, None, :]
        dist = np.linalg.norm(moved - y[None], axis=-1)  # [S, L]
        best = max(best, float((1.0 / (1.0 + (dist / d0) ** 2)).sum(axis=1).max() / norm))
        close = dist < d_search
        # Fewer than 3 residues within reach: take the 3 nearest so Kabsch stays defined.
        few = close.sum(axis=1) < 3
        if few.any():
            nearest = np.argsort(dist[few], axis=1)[:, :3]
            close[few] = False
            close[np.flatnonzero(few)[:, None], nearest] = True
        new = close.astype(np.float64)
        if np.array_equal(new, weights):
            break
        weights = new
    return best


def tm_align(x, y) -> tuple[float, float]:
    """TM-align of two Cα traces of any lengths (needs ``tmtools``).

    Returns:
        ``(tm_x, tm_y)``: the TM-score normalised by the length of ``x`` and of ``y``.

    Raises:
        TMalignUnavailable: ``tmtools`` cannot be imported.
    """
    _tm_align = require_tm_align()
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    # TM-align aligns structures, not sequences; the sequences only label residues.
    result = _tm_align(x, y, "A" * len(x), "A" * len(y))
    return float(result.tm_norm_chain1), float(result.tm_norm_chain2)


def require_tm_align():
    """``tmtools.tm_align``, or :class:`TMalignUnavailable` with the fix when it cannot be imported."""
    try:
        from tmtools import tm_align as _tm_align
    except ImportError as err:
        raise TMalignUnavailable(
            f"TM-align (the tmtools package, a dependency of flash-genie) cannot be imported: {err}. "
            "Reinstall it: pip install tmtools"
        ) from err
    return _tm_align


def has_tm_align() -> bool:
    """Whether :func:`tm_align` can run (``tmtools`` importable)."""
    try:
        import tmtools  # noqa: F401
    except ImportError:
        return False
    return True


def pairwise_tm(traces) -> np.ndarray:
    """Symmetric ``[n, n]`` TM-scores between traces (TM-align), diagonal 1.

    Each pair's score is the mean of its two normalisations (by either chain's length).
    """
    n = len(traces)
    tm = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            tm[i, j] = tm[j, i] = float(np.mean(tm_align(traces[i], traces[j])))
    return tm


def single_linkage_clusters(similarity: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Cluster labels ``[n]``: connected components of the graph ``similarity >= threshold``."""
    n = len(similarity)
    labels = np.full(n, -1)
    current = 0
    for seed in range(n):
        if labels[seed] >= 0:
            continue
        stack, labels[seed] = [seed], current
        while stack:
            i = stack.pop()
            for j in np.flatnonzero((similarity[i] >= threshold) & (labels < 0)):
                labels[j] = current
                stack.append(j)
        current += 1
    return labels


def novelty(trace, references) -> float:
    """Highest TM-score (normalised by ``trace``'s length) of ``trace`` to any reference.

    Low values mean novel folds; 1 means the trace is in the reference set.
    """
    return max((tm_align(trace, ref)[0] for ref in references), default=float("nan"))
