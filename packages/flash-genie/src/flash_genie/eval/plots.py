"""The PNG report of an evaluation (matplotlib, imported only here and only when needed).

Layout: one histogram per metric (samples against the reference chains); Rg against length
with the native scaling curve; helix against strand fraction; Cα traces of a few samples
and one reference chain projected on their two principal axes; a contact map (Cα < 8 Å)
of the first sample beside a reference chain. :func:`write_trace_grid` draws many traces
in one figure (the samples' pictures of a benchmark).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flash_genie.eval.geometry import native_rg, pair_distances

HISTOGRAMS = (
    ("step_mean", "Cα–Cα step mean (Å)"),
    ("step_std", "Cα–Cα step std (Å)"),
    ("clashes", "clashes (Cα pairs < 3 Å)"),
    ("rg_ratio", "Rg / (2.2 L^0.38)"),
    ("helix", "helix fraction"),
    ("strand", "strand fraction"),
    ("novelty", "novelty: max TM to reference"),
    ("mpnn_nll", "ProteinMPNN NLL (designability proxy)"),
)
SAMPLE_COLOR, REFERENCE_COLOR = "tab:orange", "tab:blue"
CONTACT_DISTANCE = 8.0  # Å, the usual Cα contact cut-off


def require_matplotlib() -> None:
    """Raise ImportError with the fix when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the PNG report needs matplotlib (pip install matplotlib), or pass png=False"
        ) from err


def _projection(ca) -> np.ndarray:
    """``[L, 2]``: the trace centred and projected on its two largest principal axes."""
    centred = np.asarray(ca, dtype=np.float64) - np.mean(ca, axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def _values(rows, key) -> np.ndarray:
    v = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
    return v[~np.isnan(v)]


def write_report_png(path, report, sample_traces, reference_traces, n_traces: int = 2) -> Path:
    """Draw the report figure for an :class:`~flash_genie.eval.EvaluationReport` to ``path``."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(20, 12), layout="constrained")
    axes = fig.subplots(3, 5)
    for ax, (key, label) in zip(axes.flat, HISTOGRAMS):
        s, r = _values(report.samples, key), _values(report.reference, key)
        if len(s) + len(r) == 0:
            ax.text(0.5, 0.5, f"{label}\nnot computed", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        edges = np.histogram_bin_edges(np.concatenate([s, r]), bins=20)
        for values, color, name in ((r, REFERENCE_COLOR, "reference"), (s, SAMPLE_COLOR, "samples")):
            if len(values):  # a density of no values is 0/0
                ax.hist(values, bins=edges, alpha=0.5, density=True, color=color, label=f"{name} ({len(values)})")
        ax.set_xlabel(label)
        ax.legend(fontsize="small")

    ax = axes.flat[len(HISTOGRAMS)]
    lengths = np.array([r["length"] for r in report.samples + report.reference])
    grid = np.linspace(max(lengths.min() * 0.9, 1), lengths.max() * 1.1, 100)
    ax.plot(grid, native_rg(grid), "k--", label="2.2 L^0.38")
    for rows, color, label in ((report.reference, REFERENCE_COLOR, "reference"), (report.samples, SAMPLE_COLOR, "samples")):
        ax.scatter([r["length"] for r in rows], [r["rg"] for r in rows], s=12, color=color, label=label)
    ax.set_xlabel("length (residues)")
    ax.set_ylabel("Rg (Å)")
    ax.legend(fontsize="small")

    ax = axes.flat[len(HISTOGRAMS) + 1]
    for rows, color, label in ((report.reference, REFERENCE_COLOR, "reference"), (report.samples, SAMPLE_COLOR, "samples")):
        ax.scatter([r["helix"] for r in rows], [r["strand"] for r in rows], s=12, color=color, label=label)
    ax.set_xlabel("helix fraction")
    ax.set_ylabel("strand fraction")
    ax.legend(fontsize="small")

    traces = [(f"sample {r['name']}", t, SAMPLE_COLOR) for r, t in zip(report.samples[:n_traces], sample_traces)]
    if reference_traces:
        traces.append((f"reference {report.reference[0]['name']}", reference_traces[0], REFERENCE_COLOR))
    slots = list(axes.flat[len(HISTOGRAMS) + 2 :])
    for ax, (label, trace, color) in zip(slots, traces):
        xy = _projection(trace)
        ax.plot(xy[:, 0], xy[:, 1], "-", color=color, lw=1)
        ax.scatter(xy[:, 0], xy[:, 1], c=np.arange(len(xy)), cmap="viridis", s=8)
        ax.set_title(f"{label} (L={len(xy)}), PCA projection", fontsize="small")
        ax.set_aspect("equal")
    maps = [(f"contacts: sample {report.samples[0]['name']}", sample_traces[0])]
    if reference_traces:
        maps.append((f"contacts: reference {report.reference[0]['name']}", reference_traces[0]))
    for ax, (label, trace) in zip(slots[len(traces) :], maps):
        ax.imshow(pair_distances(trace) < CONTACT_DISTANCE, cmap="Greys", interpolation="nearest")
        ax.set_title(f"{label} (Cα < {CONTACT_DISTANCE:.0f} Å)", fontsize="small")
    for ax in slots[len(traces) + len(maps) :]:
        ax.set_axis_off()
    fig.suptitle(f"flash-genie evaluation: {len(report.samples)} samples, {len(report.reference)} reference chains")
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path


def write_trace_grid(path, traces, titles, columns: int = 8, color: str = SAMPLE_COLOR, title: str | None = None) -> Path:
    """One panel per Cα trace ``[L, 3]``, projected on its two principal axes and coloured
    from N to C terminus, in a grid of ``columns`` (each panel scaled to its trace: put the
    size, e.g. Rg, in ``titles``)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if len(traces) != len(titles) or not traces:
        raise ValueError(f"need one title per trace and at least one trace, got {len(traces)} and {len(titles)}")
    rows = -(-len(traces) // columns)
    fig = Figure(figsize=(2.2 * columns, 2.3 * rows + (0.4 if title else 0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, trace, label in zip(axes, traces, titles):
        xy = _projection(trace)
        ax.plot(xy[:, 0], xy[:, 1], "-", color=color, lw=0.8)
        ax.scatter(xy[:, 0], xy[:, 1], c=np.arange(len(xy)), cmap="viridis", s=4)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize="small")
    for ax in axes[len(traces):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
