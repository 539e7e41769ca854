"""Compare flash-genie's Cα-only secondary structure with DSSP on TS50.

    pip download --no-deps --no-binary :all: mdanalysistests==2.11.0
    tar -xzf mdanalysistests-2.11.0.tar.gz --wildcards '*/data/dssp/*'
    python packages/flash-genie/tools/check_secondary_structure.py \\
        mdanalysistests-2.11.0/MDAnalysisTests/data/dssp

The folder holds ``<id>.pdb.gz`` and ``<id>.pdb.dssp`` (DSSP in three states, H/E/-, one
letter per residue). Prints three-state agreement, mean fractions and per-chain correlations.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flash_genie.data import read_structure
from flash_genie.eval import assign_secondary_structure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder with <id>.pdb.gz and <id>.pdb.dssp")
    args = parser.parse_args(argv)
    agree = total = 0
    ours, theirs = [], []
    for dssp_file in sorted(args.folder.glob("*.pdb.dssp")):
        reference = dssp_file.read_text().split()[0]
        chain = read_structure(dssp_file.with_suffix(".gz"))[0]
        if len(chain) != len(reference):
            print(f"skipped {dssp_file.name}: {len(chain)} Cα atoms, {len(reference)} DSSP states")
            continue
        states = np.array(list(assign_secondary_structure(chain.ca)))
        ref = np.array(list(reference))
        agree += int((states == ref).sum())
        total += len(ref)
        ours.append([(states == s).mean() for s in "HE"])
        theirs.append([(ref == s).mean() for s in "HE"])
    ours, theirs = np.array(ours), np.array(theirs)
    print(f"{len(ours)} chains, {total} residues; three-state agreement {agree / total:.3f}")
    for k, name in enumerate(("helix", "strand")):
        corr = np.corrcoef(ours[:, k], theirs[:, k])[0, 1]
        print(f"{name}: mean fraction {ours[:, k].mean():.3f} (DSSP {theirs[:, k].mean():.3f}), "
              f"per-chain correlation {corr:.3f}")


if __name__ == "__main__":
    main()
