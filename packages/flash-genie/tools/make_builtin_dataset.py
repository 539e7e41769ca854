"""Make flash-genie's built-in dataset from ``pdb_chains_ca.npz`` (see ``../shared/DATA.md``).

    python packages/flash-genie/tools/make_builtin_dataset.py /path/to/pdb_chains_ca.npz

Writes ``src/flash_genie/data/builtin/`` (replacing it): the chains of 50–256 residues,
gap-free at 4.2 Å, deduplicated at 90 % sequence identity (k-mer clustering), then a
seeded random subset of 1000, plus a README.md with the provenance. Deterministic: the
same npz (its sha256 is recorded) gives the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flash_genie.data import Dataset, build_dataset

PACKAGE = Path(__file__).resolve().parents[1]
DEFAULT_OUT = PACKAGE / "src" / "flash_genie" / "data" / "builtin"
SETTINGS = {"min_length": 50, "max_length": 256, "max_gap": 4.2, "gap_mode": "drop",
            "dedup": 0.9, "limit": 1000, "seed": 0}

README = """\
# flash-genie built-in dataset

{chains} real protein chains from the Protein Data Bank, Cα atoms only, {min_len}–{max_len}
residues ({residues} residues in all), so that flash-genie trains and is evaluated with no
download. Open it with `flash_genie.data.builtin_dataset()`; the file format is described in
`flash_genie/data/dataset.py`.

## Provenance

- Structures: the Protein Data Bank (wwPDB); atomic coordinates are CC0 (public domain).
- Selection and extraction: the StructureDB of ProMod3 3.2.1 (`structure_db.dat`, as
  shipped in Debian's `promod3-data` 3.2.1+ds-6; ProMod3 is Apache-2.0), via
  `pdb_chains_ca.npz` (20,182 chains of 50–1024 residues, Cα in 0.01 Å, sha256
  `{sha256}`), which copies that database's Cα coordinates and sequences unchanged.
- Names are `<PDB id>_<chain id>` as in the StructureDB (`names.txt`, one per chain).

## How it was made

`python packages/flash-genie/tools/make_builtin_dataset.py pdb_chains_ca.npz` with
`{settings}`:
chains of 50–256 residues with no Cα–Cα step over 4.2 Å, sequence-redundancy removal at
90 % identity (k-mer clustering, see `flash_genie/data/filters.py`), then a random subset of
{chains} drawn with numpy's `default_rng(0)`. Build report:

```
{report}
```

Whole chains, not CATH/SCOPe domains: multi-domain chains are included.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", type=Path, help="pdb_chains_ca.npz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    report = build_dataset(args.npz, args.out, overwrite=True, **SETTINGS)
    meta_path = args.out / "meta.json"  # record the source by name, not by a local path
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["report"]["source"] = args.npz.name
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    ds = Dataset.open(args.out)
    text = README.format(
        chains=len(ds), residues=int(ds.lengths.sum()), min_len=int(ds.lengths.min()),
        max_len=int(ds.lengths.max()), sha256=meta["source"]["sha256"],
        settings=json.dumps(SETTINGS), report=str(report).replace(str(args.npz), args.npz.name),
    )
    (args.out / "README.md").write_text(text, encoding="utf-8")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(report)
    print(f"wrote {args.out}: {len(ds)} chains, {np.sum(ds.lengths)} residues, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
