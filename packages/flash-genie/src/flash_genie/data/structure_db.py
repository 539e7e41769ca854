"""Reader of ProMod3's StructureDB file (version 2, as in Debian's ``promod3-data`` 3.2.1).

Layout (little-endian; checked against ``/usr/share/promod3/loop_data/structure_db.dat`` of
``promod3-data=3.2.1+ds-6``, sha256 ``0f1c6e35…3301a``, 21,119 entries, 4,561,225 residues)::

    int32 magic 1234, int32 version 2, then type-size checks up to byte 0x4d
    uint64 n                                    # entries
    n × { uint32 len, bytes pdb_id,             # e.g. b"12AS"
          uint32 len, bytes chain_name,         # e.g. b"A"
          uint32 residue_offset, uint16 residue_count, int16 first_residue_number,
          float32[3] shift }
    uint64 N, N bytes one-letter sequence      # all entries, concatenated
    uint64 N, N × 4 × 3 int16 coordinates      # atoms N, CA, C, O per residue; 0.01 Å
    ... further per-residue arrays (dihedrals, accessibility, DSSP, profiles): not read

The file is memory-mapped and only the Cα column is copied, chain by chain, so reading the
521 MB file costs about one chain of memory at a time. The coordinates are returned as
stored (``int16 × 0.01`` Å) — the same values as ``pdb_chains_ca.npz`` — without the
per-entry ``shift``: a translation does not change a Cα trace's geometry.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flash_genie.data.chains import Chain, StructureError

MAGIC = 1234
VERSION = 2
ENTRIES_OFFSET = 0x4D
_ENTRY_FIXED = struct.Struct("<IHh3f")  # residue offset, count, first number, shift


def is_structure_db(path) -> bool:
    """Whether ``path`` is a file starting with the StructureDB magic number."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        head = fh.read(4)
    return len(head) == 4 and struct.unpack("<i", head)[0] == MAGIC


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; running off the end is a StructureError."""

    def __init__(self, buf, path: Path, offset: int):
        self.buf, self.path, self.offset = buf, path, offset

    def unpack(self, fmt: struct.Struct | str, what: str):
        fmt = struct.Struct(fmt) if isinstance(fmt, str) else fmt
        if self.offset + fmt.size > len(self.buf):
            raise StructureError(self.path, f"truncated: file ends inside {what} at byte {self.offset}")
        values = fmt.unpack_from(self.buf, self.offset)
        self.offset += fmt.size
        return values

    def text(self, what: str) -> str:
        (length,) = self.unpack("<I", what)
        end = self.offset + length
        if end > len(self.buf):
            raise StructureError(self.path, f"truncated: file ends inside {what} at byte {self.offset}")
        value = bytes(self.buf[self.offset : end]).decode("ascii", errors="replace")
        self.offset = end
        return value


def read_structure_db(path) -> Iterator[Chain]:
    """Yield the chains of a ProMod3 StructureDB v2 file as Cα traces.

    Chains are named ``<pdb id>_<chain name>`` (``12AS_A``); coordinates are in Å.

    Raises:
        StructureError: wrong magic/version, truncated file, or entries pointing outside
            the residue arrays (raised on the first ``next``, before any chain is yielded).
    """
    path = Path(path)
    if not path.is_file():
        raise StructureError(path, "file not found")
    with path.open("rb") as fh:
        if path.stat().st_size < ENTRIES_OFFSET + 8:
            raise StructureError(path, "too short for a StructureDB header")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        magic, version = struct.unpack_from("<ii", buf, 0)
        if magic != MAGIC or version != VERSION:
            raise StructureError(
                path, f"not a StructureDB v{VERSION} file (magic {magic}, version {version}; "
                f"expected {MAGIC}, {VERSION})"
            )
        cur = _Cursor(buf, path, ENTRIES_OFFSET)
        (n_entries,) = cur.unpack("<Q", "the entry count")
        entries = []
        for i in range(n_entries):
            pdb_id = cur.text(f"entry {i}")
            chain = cur.text(f"entry {i}")
            offset, count, _first, *_shift = cur.unpack(_ENTRY_FIXED, f"entry {i}")
            entries.append((f"{pdb_id}_{chain}", offset, count))
        (n_res,) = cur.unpack("<Q", "the residue count")
        seq_start = cur.offset
        cur.offset += n_res
        (n_res2,) = cur.unpack("<Q", "the coordinate count")
        if n_res2 != n_res:
            raise StructureError(path, f"sequence has {n_res} residues but coordinates {n_res2}")
        if cur.offset + n_res * 24 > len(buf):
            raise StructureError(path, "truncated: file ends inside the coordinate array")
        bad = [name for name, off, cnt in entries if off + cnt > n_res]
        if bad:
            raise StructureError(path, f"entries point past the {n_res} residues: {bad[:3]}")
        coords = np.frombuffer(buf, dtype="<i2", count=n_res * 12, offset=cur.offset)
        coords = coords.reshape(n_res, 4, 3)
        for name, off, cnt in entries:
            sequence = bytes(buf[seq_start + off : seq_start + off + cnt]).decode("ascii", "replace")
            ca = coords[off : off + cnt, 1].astype(np.float32) * np.float32(0.01)
            yield Chain(name, sequence, ca)
        del coords  # the mmap cannot close while a numpy view of it is alive
    finally:
        try:
            buf.close()
        except BufferError:  # a caller still holds a view; the mmap closes when it goes
            pass
