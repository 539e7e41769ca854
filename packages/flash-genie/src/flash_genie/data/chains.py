"""The unit every reader yields: one protein chain as a Cα trace, and the data errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class StructureError(ValueError):
    """A structure file that cannot be used: unreadable, truncated or holding no protein.

    ``path`` is the offending file and ``reason`` says what was wrong; ``str(err)``
    names both.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(RuntimeError):
    """A dataset that cannot be built or opened (nothing kept, existing output, bad files)."""


@dataclass(frozen=True)
class Chain:
    """One protein chain.

    Attributes:
        name: ``<PDB id or file stem>_<chain id>``, e.g. ``1ABC_A``; pieces of a chain
            split at breaks get ``/<first>-<last>`` (1-based residue indices in the chain).
        sequence: one-letter codes, ``len(sequence) == len(ca)``; ``X`` for unknown or
            non-standard residues (all ``X`` where the source has no sequence).
        ca: Cα coordinates in Å, float32 ``[L, 3]``.
    """

    name: str
    sequence: str
    ca: np.ndarray

    def __post_init__(self):
        ca = np.asarray(self.ca, dtype=np.float32)
        if ca.ndim != 2 or ca.shape[1] != 3:
            raise ValueError(f"chain {self.name}: ca must have shape [L, 3], got {ca.shape}")
        if len(self.sequence) != len(ca):
            raise ValueError(
                f"chain {self.name}: sequence has {len(self.sequence)} letters for {len(ca)} Cα atoms"
            )
        object.__setattr__(self, "ca", ca)

    def __len__(self) -> int:
        return len(self.ca)
