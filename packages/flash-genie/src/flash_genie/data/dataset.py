"""The on-disk dataset: a directory of Cα traces, built once and memory-mapped for training.

Format (``FORMAT_VERSION = 1``), one directory::

    ca.npy          float32 [R, 3]   Cα coordinates of all chains, concatenated, in Å
    index.npy       int64   [C, 2]   (start row in ca.npy, length) per chain
    names.txt       C lines          chain names, e.g. ``1ABC_A`` or ``1ABC_A/1-120`` (a piece)
    sequences.txt   C lines          one-letter sequences (``X`` where unknown)
    meta.json       format version, source (name, kind, sha256 of a file source), filters,
                    the build report, counts and length range

``ca.npy`` and ``index.npy`` are plain ``.npy`` files opened with ``mmap_mode="r"``, so a
DataLoader worker touches only the chains it reads; names and sequences are small and read
whole. Coordinates keep the source's frame (no centring): centring belongs to the model.
Float32 costs 12 bytes a residue (60 MB for the 4.5 M residues of ProMod3's StructureDB).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from flash_genie.data.chains import Chain, DatasetError

FORMAT_VERSION = 1
FILES = ("ca.npy", "index.npy", "names.txt", "sequences.txt", "meta.json")


def write_dataset_files(folder: Path, ca: np.ndarray, index: np.ndarray, names, sequences, meta: dict) -> None:
    """Write the dataset files into an existing (temporary) ``folder``.

    ``ca`` may be a memmap; ``meta`` gets ``format_version`` and counts added.
    """
    np.save(folder / "index.npy", np.ascontiguousarray(index, dtype=np.int64))
    out = np.lib.format.open_memmap(folder / "ca.npy", mode="w+", dtype=np.float32, shape=(len(ca), 3))
    out[:] = ca
    out.flush()
    del out
    (folder / "names.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    (folder / "sequences.txt").write_text("".join(f"{s}\n" for s in sequences), encoding="ascii")
    lengths = np.asarray(index)[:, 1]
    meta = {
        "format_version": FORMAT_VERSION,
        "chains": len(lengths),
        "residues": int(lengths.sum()),
        "length_range": [int(lengths.min()), int(lengths.max())] if len(lengths) else None,
        **meta,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class Dataset:
    """A built dataset, memory-mapped. ``ds[i] -> (coords [L, 3] float32 Å, name, sequence)``.

    Attributes:
        path: the dataset directory; ``meta``: the contents of ``meta.json``.
        lengths: int64 ``[C]`` residues per chain; ``names``/``sequences``: lists of str.
    """

    def __init__(self, path: Path, ca: np.ndarray, index: np.ndarray, names, sequences, meta: dict):
        self.path, self.meta = path, meta
        self._ca, self._index = ca, index
        self.names, self.sequences = names, sequences

    @classmethod
    def open(cls, path) -> Dataset:
        """Open a dataset directory written by :func:`~flash_genie.data.build_dataset`.

        Raises:
            DatasetError: a missing file, an unknown format version, or files that disagree.
        """
        path = Path(path)
        if not path.is_dir():
            raise DatasetError(f"dataset {path} does not exist (build one with build_dataset)")
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise DatasetError(f"dataset {path} is incomplete: missing {', '.join(missing)}")
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            ca = np.load(path / "ca.npy", mmap_mode="r")
            index = np.load(path / "index.npy", mmap_mode="r")
        except (ValueError, OSError) as err:
            raise DatasetError(f"dataset {path}: unreadable file ({err})") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"dataset {path}: format version {meta.get('format_version')!r}, "
                f"this flash-genie reads version {FORMAT_VERSION}"
            )
        names = (path / "names.txt").read_text(encoding="utf-8").splitlines()
        sequences = (path / "sequences.txt").read_text(encoding="ascii").splitlines()
        problems = []
        if ca.dtype != np.float32 or ca.ndim != 2 or ca.shape[1] != 3:
            problems.append(f"ca.npy is {ca.dtype} {ca.shape}, expected float32 [R, 3]")
        if index.dtype != np.int64 or index.ndim != 2 or index.shape[1] != 2:
            problems.append(f"index.npy is {index.dtype} {index.shape}, expected int64 [C, 2]")
        elif len(index) and (index[:, 0].min() < 0 or (index[:, 0] + index[:, 1]).max() > len(ca)):
            problems.append("index.npy points outside ca.npy")
        if not (len(names) == len(sequences) == len(index)):
            problems.append(f"{len(index)} index rows, {len(names)} names, {len(sequences)} sequences")
        elif any(len(s) != n for s, n in zip(sequences, np.asarray(index[:, 1]))):
            problems.append("a sequence's length differs from its chain's length")
        if problems:
            raise DatasetError(f"dataset {path} is inconsistent: " + "; ".join(problems))
        return cls(path, ca, index, names, sequences, meta)

    def __reduce__(self):
        # DataLoader workers started by spawn/forkserver get the dataset pickled: re-open the
        # files there instead of copying the memory-mapped arrays into the pickle.
        return (Dataset.open, (self.path,))

    def __len__(self) -> int:
        return len(self._index)

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``[C]``: residues per chain."""
        return np.asarray(self._index[:, 1])

    def coords(self, i: int) -> np.ndarray:
        """Read-only view of chain ``i``'s Cα coordinates, float32 ``[L, 3]`` in Å."""
        start, length = self._index[self._check(i)]
        return self._ca[start : start + length]

    def _check(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"chain index {i} out of range for a dataset of {n} chains")
        return i % n

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, str]:
        i = self._check(int(i))
        return np.array(self.coords(i)), self.names[i], self.sequences[i]

    def chain(self, i: int) -> Chain:
        """Chain ``i`` as a :class:`Chain`."""
        coords, name, seq = self[i]
        return Chain(name, seq, coords)

    def __repr__(self) -> str:
        lengths = self.lengths
        span = f"{lengths.min()}–{lengths.max()}" if len(lengths) else "empty"
        return f"Dataset({str(self.path)!r}, chains={len(self)}, lengths {span})"


def builtin_dataset() -> Dataset:
    """The small dataset of real PDB chains shipped inside flash-genie (see its README.md)."""
    folder = resources.files("flash_genie.data") / "builtin"
    if not isinstance(folder, Path):  # e.g. a zipped install: memory-mapping needs real files
        raise DatasetError(f"the built-in dataset must be installed as files, found {folder!r}")
    return Dataset.open(folder)
