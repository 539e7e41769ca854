"""Dataset filters: chain breaks, length range, sequence redundancy; and the build report.

Redundancy removal (:func:`redundant`) has two levels:

* ``"exact"`` — chains with identical sequences: the first one (in source order) is kept.
* a float ``t`` in [0.8, 1.0] — greedy clustering in the manner of CD-HIT's short-word
  filter, *without* CD-HIT's alignment step. Chains are visited longest first; a chain is
  dropped when some already kept chain shares at least ``(L - k + 1) - k·(1 - t)·L``
  distinct k-mers with it (``L`` its length, which is the shorter one), and is otherwise
  kept. An ungapped alignment with identity ≥ t over the shorter chain shares at least that
  many words (each mismatch destroys at most k of them), so such pairs are always merged;
  some pairs a little below ``t`` (or related through gaps) are merged too. The word length
  is ``k = min(5, floor(0.6 / (1 - t)))`` (5 for t ≥ 0.88, 4 from 0.85, 3 from 0.8), which
  keeps the bound at 40 % of the words or more, well above what unrelated sequences share
  by chance; at t = 0.75 (k = 3, a quarter of the words) half of the 20,182 non-redundant
  ProMod3 chains were merged, so lower thresholds are refused. Distinct
  words are counted (repeats once), which only makes merging rarer. Sequences that are all
  ``X`` (sources without sequences, e.g. the Genie layout) are never merged.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from flash_genie.data.chains import Chain

MAX_KMER = 5
MIN_IDENTITY = 0.8

# Reasons a chain (or piece of a chain) is dropped; the report counts them by these names.
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
CHAIN_BREAK = "chain_break"
NON_FINITE = "non_finite_coordinates"
DUPLICATE = "duplicate_sequence"
SIMILAR = "similar_sequence"
SUBSAMPLED = "not_in_random_subset"


def ca_steps(ca: np.ndarray) -> np.ndarray:
    """Consecutive Cα–Cα distances in Å, ``[L - 1]`` for ``ca`` of shape ``[L, 3]``."""
    return np.linalg.norm(np.diff(np.asarray(ca, dtype=np.float64), axis=0), axis=-1)


def split_at_gaps(chain: Chain, max_gap: float) -> list[Chain]:
    """Split a chain wherever a Cα–Cα step exceeds ``max_gap`` Å.

    Pieces are named ``<name>/<first>-<last>`` with 1-based residue indices of the original
    chain; a chain without breaks is returned unchanged (same name) in a one-element list.
    """
    breaks = np.flatnonzero(ca_steps(chain.ca) > max_gap) + 1
    if len(breaks) == 0:
        return [chain]
    bounds = zip(np.r_[0, breaks], np.r_[breaks, len(chain)])
    return [
        Chain(f"{chain.name}/{a + 1}-{b}", chain.sequence[a:b], chain.ca[a:b]) for a, b in bounds
    ]


@dataclass
class BuildReport:
    """What a dataset build read, kept and dropped, and why.

    Attributes:
        source: the source path as given; ``kind``: ``structures``, ``structure_db``,
            ``genie`` or ``npz``.
        files_read: files parsed successfully (1 for single-file sources).
        chains_read: protein chains read before any filter.
        kept: chains (or pieces of chains) written to the dataset.
        dropped: count per reason (``too_short``, ``too_long``, ``chain_break``,
            ``non_finite_coordinates``, ``duplicate_sequence``, ``similar_sequence``,
            ``not_in_random_subset``); pieces of split chains count one each.
        split_chains: chains split at breaks (``gap_mode="split"``).
        skipped_files: ``(path, reason)`` for every file that could not be used.
    """

    source: str
    kind: str
    files_read: int = 0
    chains_read: int = 0
    kept: int = 0
    split_chains: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready copy."""
        return {
            "source": self.source,
            "kind": self.kind,
            "files_read": self.files_read,
            "chains_read": self.chains_read,
            "kept": self.kept,
            "split_chains": self.split_chains,
            "dropped": dict(sorted(self.dropped.items())),
            "skipped_files": [list(item) for item in self.skipped_files],
        }

    def __str__(self) -> str:
        lines = [
            f"source: {self.source} ({self.kind})",
            f"files read: {self.files_read}, skipped: {len(self.skipped_files)}",
            f"chains read: {self.chains_read}" + (f" ({self.split_chains} split at breaks)" if self.split_chains else ""),
            f"kept: {self.kept}",
            f"dropped: {sum(self.dropped.values())}",
        ]
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.dropped.items())]
        if self.skipped_files:
            lines.append("skipped files:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped_files]
        return "\n".join(lines)


def length_reason(length: int, min_length: int, max_length: int) -> str | None:
    """``too_short``/``too_long`` for a length outside ``[min_length, max_length]``, else None."""
    if length < min_length:
        return TOO_SHORT
    if length > max_length:
        return TOO_LONG
    return None


def word_length(identity: float) -> int:
    """The k-mer length used for an identity threshold (see the module docstring)."""
    return MAX_KMER if identity >= 1.0 else min(MAX_KMER, int(0.6 / (1.0 - identity) + 1e-9))


def _kmer_codes(sequence: str, k: int) -> np.ndarray:
    """Distinct k-mers of ``sequence`` as integers (base-32 codes of the letters)."""
    codes = np.frombuffer(sequence.upper().encode("ascii", "replace"), dtype=np.uint8) & 31
    if len(codes) < k:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(codes.astype(np.int64), k)
    return np.unique(windows @ (32 ** np.arange(k - 1, -1, -1)))


def redundant(sequences: list[str], dedup) -> dict[int, str]:
    """Indices of redundant sequences and why: ``{index: "duplicate_sequence" | "similar_sequence"}``.

    Args:
        sequences: one-letter sequences, in source order.
        dedup: ``None``/``False`` (nothing is redundant), ``"exact"``, or an identity
            threshold in [0.8, 1.0] (see the module docstring for the exact rule).
    """
    if dedup is None or dedup is False:
        return {}
    number = isinstance(dedup, (int, float)) and not isinstance(dedup, bool)
    if not (dedup == "exact" or (number and MIN_IDENTITY <= dedup <= 1.0)):
        raise ValueError(f"dedup must be None, 'exact' or a float in [{MIN_IDENTITY}, 1.0], got {dedup!r}")
    dropped: dict[int, str] = {}
    first_seen: dict[str, int] = {}
    for i, seq in enumerate(sequences):
        if set(seq) <= {"X"}:
            continue
        if seq in first_seen:
            dropped[i] = DUPLICATE
        else:
            first_seen[seq] = i
    if dedup == "exact":
        return dropped

    k = word_length(dedup)
    postings: dict[int, list[int]] = defaultdict(list)  # k-mer -> kept chains holding it
    order = sorted(first_seen.values(), key=lambda i: (-len(sequences[i]), i))
    for i in order:
        words = _kmer_codes(sequences[i], k).tolist()
        hits = [postings[w] for w in words if w in postings]
        length = len(sequences[i])  # kept chains are at least as long (longest first)
        needed = (length - k + 1) - k * (1.0 - dedup) * length
        if hits and needed > 0 and np.bincount(np.concatenate(hits)).max() >= needed:
            dropped[i] = SIMILAR
            continue
        for w in words:
            postings[w].append(i)
    return dropped
