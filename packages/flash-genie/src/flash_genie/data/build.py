"""``build_dataset``: any supported source → filtered, deduplicated dataset directory, atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from flash_genie.data import filters
from flash_genie.data.chains import Chain, DatasetError, StructureError
from flash_genie.data.dataset import write_dataset_files
from flash_genie.data.readers import (
    genie_layout_files,
    is_structure_file,
    read_genie_coords,
    read_npz_chains,
    read_structure,
)
from flash_genie.data.structure_db import is_structure_db, read_structure_db

SOURCE_KINDS = ("structures", "structure_db", "genie", "npz")
GAP_MODES = ("split", "drop")


def detect_source(src) -> str:
    """The kind of a source path: one of :data:`SOURCE_KINDS`.

    * a folder with ``<name>/coords`` or ``<name>_coords`` sub-folders: ``genie``;
    * any other folder, or a single PDB/mmCIF file: ``structures``;
    * a file starting with the StructureDB magic: ``structure_db``; a zip/``.npz``: ``npz``.

    Raises:
        FileNotFoundError: ``src`` does not exist; DatasetError: a file of no known kind.
    """
    src = Path(src)
    if src.is_dir():
        genie = any(p.is_dir() for p in src.glob("*/coords")) or any(p.is_dir() for p in src.glob("*_coords"))
        return "genie" if genie else "structures"
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if is_structure_db(src):
        return "structure_db"
    if zipfile.is_zipfile(src):
        return "npz"
    if is_structure_file(src):
        return "structures"
    raise DatasetError(
        f"source {src}: not a folder, PDB/mmCIF file, ProMod3 StructureDB or .npz of chains"
    )


def _structure_files(src: Path) -> tuple[list[Path], list[Path]]:
    """(structure files, other files) under ``src``, sorted; hidden files are ignored."""
    if src.is_file():
        return [src], []
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p for p in files if is_structure_file(p)], [p for p in files if not is_structure_file(p)]


def _read_source(src: Path, kind: str, dataset_names, report: filters.BuildReport) -> Iterator[Chain]:
    """Yield the chains of ``src``; unusable files go to ``report.skipped_files``."""
    if kind in ("structure_db", "npz"):
        reader = read_structure_db if kind == "structure_db" else read_npz_chains
        try:
            yield from reader(src)
        except StructureError as err:
            raise DatasetError(f"cannot read {src}: {err.reason}") from err
        report.files_read = 1
        return
    if kind == "genie":
        files, read_one = genie_layout_files(src, dataset_names), (lambda p: [read_genie_coords(p)])
    else:
        files, others = _structure_files(src)
        report.skipped_files += [
            (str(p), "not named like a PDB/mmCIF file (.pdb, .ent, .cif, .mmcif, optionally .gz)")
            for p in others
        ]
        read_one = read_structure
    for path in files:
        try:
            chains = read_one(path)
        except StructureError as err:
            report.skipped_files.append((str(path), err.reason))
            continue
        report.files_read += 1
        yield from chains


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_args(min_length, max_length, max_gap, gap_mode, dedup, limit) -> None:
    if min_length < 1 or max_length < min_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    if max_gap is not None and not max_gap > 0:
        raise ValueError(f"max_gap must be a positive distance in Å or None, got {max_gap}")
    if gap_mode not in GAP_MODES:
        raise ValueError(f"gap_mode must be one of {GAP_MODES}, got {gap_mode!r}")
    filters.redundant([], dedup)  # validates dedup
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of chains or None, got {limit}")


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise DatasetError(f"output {out} already exists (pass overwrite=True to replace it)")
    if not (out.is_dir() and (out / "meta.json").is_file()):
        raise DatasetError(f"output {out} exists and is not a flash-genie dataset; refusing to replace it")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` directory to ``out`` by renames (atomic on one filesystem)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; give it a normal folder's mode
    _check_out(out, overwrite)  # again: something may have appeared while building
    if not out.exists():
        os.rename(tmp, out)  # fails rather than merge if ``out`` appeared meanwhile
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / "dataset")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def build_dataset(
    src,
    out,
    *,
    min_length: int = 40,
    max_length: int = 1024,
    max_gap: float | None = 4.2,
    gap_mode: str = "split",
    dedup: str | float | None = "exact",
    limit: int | None = None,
    seed: int = 0,
    dataset_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> filters.BuildReport:
    """Build a dataset directory (format in :mod:`flash_genie.data.dataset`) from ``src``.

    Args:
        src: a folder of PDB/mmCIF files (plain or ``.gz``, searched recursively), one such
            file, a ProMod3 StructureDB file, an ``.npz`` of chains (``pdb_chains_ca.npz``
            format) or a folder in the original Genie layout (see :func:`detect_source`).
        out: the dataset directory to create. It is written under a temporary name next to
            ``out`` and renamed into place at the end, so ``out`` is either absent or complete.
        min_length, max_length: residues per kept chain (or piece), inclusive.
        max_gap: a Cα–Cα step longer than this (Å) is a chain break; ``None`` disables the
            check. Consecutive Cα atoms sit 3.8 Å apart (2.9 Å for cis peptides).
        gap_mode: ``"split"`` cuts chains at breaks and keeps the pieces whose length is in
            range (named ``<name>/<first>-<last>``); ``"drop"`` drops chains with a break.
        dedup: ``None``, ``"exact"`` (identical sequences) or a sequence-identity threshold
            in [0.8, 1.0] (greedy k-mer clustering; see :mod:`flash_genie.data.filters`).
        limit, seed: keep a random subset of at most ``limit`` chains (after the filters),
            drawn with ``numpy.random.default_rng(seed)``, in source order.
        dataset_names: for the Genie layout, the ``datasetNames`` to read (default: all).
        overwrite: replace an existing dataset at ``out`` (never a non-dataset path).

    Returns:
        The :class:`~flash_genie.data.BuildReport` (also stored in ``out/meta.json``).

    Raises:
        FileNotFoundError: ``src`` does not exist. ValueError: a bad argument.
        DatasetError: ``out`` exists (and not ``overwrite``), ``src`` is unusable as a whole,
            or no chain survives the filters (the message holds the report).
    """
    src, out = Path(src), Path(out)
    _check_args(min_length, max_length, max_gap, gap_mode, dedup, limit)
    _check_out(out, overwrite)
    kind = detect_source(src)
    report = filters.BuildReport(source=str(src), kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        records = _spool_chains(src, kind, dataset_names, report, tmp / "spool.f32",
                                min_length, max_length, max_gap, gap_mode)
        dropped = filters.redundant([r[1] for r in records], dedup)
        report.dropped.update(dropped.values())
        keep = [i for i in range(len(records)) if i not in dropped]
        if limit is not None and len(keep) > limit:
            chosen = np.sort(np.random.default_rng(seed).choice(len(keep), size=limit, replace=False))
            report.dropped[filters.SUBSAMPLED] += len(keep) - limit
            keep = [keep[i] for i in chosen]
        report.kept = len(keep)
        if not keep:
            raise DatasetError(f"no chain kept from {src}; nothing written to {out}.\n{report}")
        spool = np.memmap(tmp / "spool.f32", dtype=np.float32, mode="r").reshape(-1, 3)
        lengths = np.array([records[i][3] for i in keep], dtype=np.int64)
        index = np.stack([np.cumsum(lengths) - lengths, lengths], axis=1)
        ca = np.concatenate([spool[records[i][2] : records[i][2] + records[i][3]] for i in keep])
        del spool
        (tmp / "spool.f32").unlink()
        meta = {
            "source": {"name": src.name, "kind": kind, "sha256": _sha256(src) if src.is_file() else None},
            "filters": {"min_length": min_length, "max_length": max_length, "max_gap": max_gap,
                        "gap_mode": gap_mode, "dedup": dedup, "limit": limit, "seed": seed,
                        "dataset_names": list(dataset_names) if dataset_names else None},
            "report": report.to_dict(),
            "created_by": f"flash-genie {_version()}",
        }
        write_dataset_files(tmp, ca, index, [records[i][0] for i in keep], [records[i][1] for i in keep], meta)
        _install(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _spool_chains(src, kind, dataset_names, report, spool_path, min_length, max_length, max_gap, gap_mode):
    """Read and filter chains, appending coordinates to ``spool_path`` (float32 rows).

    Returns ``[(name, sequence, first_row, length)]`` of the chains that pass the length
    and gap filters, so only one chain's coordinates are in memory at a time.
    """
    records, row = [], 0
    with spool_path.open("wb") as spool:
        for chain in _read_source(src, kind, dataset_names, report):
            report.chains_read += 1
            if not np.isfinite(chain.ca).all():
                report.dropped[filters.NON_FINITE] += 1
                continue
            pieces = [chain]
            if max_gap is not None:
                pieces = filters.split_at_gaps(chain, max_gap)
                if len(pieces) > 1 and gap_mode == "drop":
                    report.dropped[filters.CHAIN_BREAK] += 1
                    continue
                report.split_chains += len(pieces) > 1
            for piece in pieces:
                reason = filters.length_reason(len(piece), min_length, max_length)
                if reason:
                    report.dropped[reason] += 1
                    continue
                spool.write(np.ascontiguousarray(piece.ca, dtype=np.float32).tobytes())
                records.append((piece.name, piece.sequence, row, len(piece)))
                row += len(piece)
    return records


def _version() -> str:
    try:
        return metadata.version("flash-genie")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"
