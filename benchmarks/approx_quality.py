"""Quality cost of flash-genie's approximate modes: the same small training budget for the
dense model and each mode, then the evaluation metrics of their samples side by side.

Every run is the quick start (``flash-genie train`` without a config: a 200k-parameter
Genie on the 1,000 built-in PDB chains of 50–64 residues after cropping) with the mode's
keys added, the same seed, data order and number of steps; then 8 backbones (lengths 50
and 64) sampled with the same seed and evaluated by ``flash-genie evaluate``'s metrics
against real chains. At these lengths the sparse modes keep k = 16 neighbours (of 50–64
residues) so that they really drop pairs. A CPU budget this small says which modes train
and how far each falls behind the dense model in the same budget, not what a converged
model samples.

    python benchmarks/approx_quality.py                 # 400 steps per mode (about 30 minutes on 2 cores)
    python benchmarks/approx_quality.py --steps 20 --quick

Files: ``benchmarks/results/approx_quality_cpu_<date>[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine

import torch  # noqa: E402
from genie_bench import results  # noqa: E402
from genie_bench.env import environment  # noqa: E402

from flash_genie import Config  # noqa: E402
from flash_genie.cli import QUICKSTART, QUICKSTART_SAMPLES  # noqa: E402
from flash_genie.eval import evaluate_directory  # noqa: E402
from flash_genie.model.approx import parameter_report  # noqa: E402
from flash_genie.sampling import generate, write_backbones  # noqa: E402
from flash_genie.training import Trainer  # noqa: E402

SCHEMA = "flash-genie-approx-quality/1"
MODES = {
    "dense (Genie)": {},
    "axial attention": {"useAxialAttention": True},
    "factorized r=2": {"zFactorRank": 2},
    "sparse k=16": {"useSparseKNN": True, "kNeighbors": 16},
    "factorized r=2 + sparse k=16": {"zFactorRank": 2, "useSparseKNN": True, "kNeighbors": 16},
    "universal layer sharing": {"useModelCompression": True},
}
METRICS = ("step_mean", "step_std", "clashes", "rg_ratio", "helix", "strand", "coil", "novelty", "pairwise_tm")


def run_mode(name: str, steps: int, num: int, workdir: Path, lengths: list[int] | None = None, **overrides) -> dict:
    """Train the quick start with mode ``name``'s keys (and ``overrides``), sample ``num``
    backbones of each of ``lengths`` (default: the quick start's), evaluate."""
    lengths = lengths or QUICKSTART_SAMPLES["lengths"]
    config = Config.from_text(QUICKSTART, source="<quickstart preset>").replace(
        maximumSteps=steps, checkpointEverySteps=steps, precision="fp32", **MODES[name], **overrides)
    out = workdir / name.replace(" ", "_").replace("=", "").replace("+", "and").replace("(", "").replace(")", "")
    trainer = Trainer(config, out, device="cpu", progress=False)
    t0 = time.perf_counter()
    logs = trainer.fit()
    train_s = time.perf_counter() - t0
    tail = [log.loss for log in logs[-max(1, len(logs) // 8):]]
    backbones = generate(trainer.model, config, lengths, num, seed=0, progress=False)
    samples = write_backbones(backbones, out / "samples", title=name)
    # mpnn_sequences=0: the same metrics as the committed results (no designability proxy)
    report = evaluate_directory(samples / "pdbs", out=samples / "evaluation", png=False, overwrite=True,
                                mpnn_sequences=0)
    summary = report.to_dict()["overall"]
    for name_ in ("samples", "reference"):  # diversity: mean pairwise TM-score
        summary[name_]["pairwise_tm"] = (report.diversity.get(name_) or {}).get("mean_pairwise_tm")
    return {"mode": name, "keys": MODES[name], "steps": steps, "train_s": train_s,
            "final_loss": sum(tail) / len(tail), "parameters": parameter_report(trainer.model),
            "samples": summary["samples"], "reference": summary["reference"]}


def _cell(summary: dict, key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "—"
    if isinstance(value, list | tuple):
        return f"{value[0]:.2f} ± {value[1]:.2f}"
    return f"{value:.2f}"


def markdown(doc: dict) -> str:
    rows = doc["results"]
    keys = [k for k in METRICS if any(r["samples"].get(k) is not None for r in rows)]
    lines = [f"### Approximate modes, same budget: {doc['config']['steps']} steps of the quick start, "
             f"{doc['config']['samples']} samples each (CPU, commit {doc['environment']['commit']['hash'][:10]})", "",
             "| mode | parameters | train s | final loss | " + " | ".join(keys) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['parameters']['parameters']:,} | {r['train_s']:.0f} | "
                     f"{r['final_loss']:.3f} | " + " | ".join(_cell(r["samples"], k) for k in keys) + " |")
    ref = rows[0]["reference"]
    lines.append("| real chains (reference) | | | | " + " | ".join(_cell(ref, k) for k in keys) + " |")
    lines += ["", "Values are mean ± standard deviation over the samples; step in Å (3.80 for proteins), "
              "rg_ratio = radius of gyration / 2.2·L^0.38, secondary-structure fractions from the Cα trace, "
              "novelty = TM-score to the nearest of 30 training chains, pairwise_tm = mean TM-score between "
              "samples (lower: more diverse)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="training steps per mode (default 400)")
    ap.add_argument("--num", type=int, default=QUICKSTART_SAMPLES["num"], help="samples per length (default 4)")
    ap.add_argument("--modes", nargs="*", choices=list(MODES), help="default: all")
    ap.add_argument("--lengths", type=int, nargs="+", default=QUICKSTART_SAMPLES["lengths"],
                    help="sample lengths (default: the quick start's, 50 64)")
    ap.add_argument("--threads", type=int, help="torch threads (several runs side by side: 1 each)")
    ap.add_argument("--merge", type=Path, nargs="+", help="combine these result files (runs of some modes each)")
    ap.add_argument("--quick", action="store_true", help="mark the result as a quick run")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.merge:
        docs = [json.loads(path.read_text()) for path in args.merge]
        order = list(MODES)
        doc = {**docs[0], "results": sorted((r for d in docs for r in d["results"]),
                                            key=lambda r: order.index(r["mode"]))}
        results.write(doc, markdown(doc), args.out, results.stem("approx_quality_cpu", args.quick))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    doc = {"schema": SCHEMA, "environment": environment(torch.device("cpu")),
           "config": {"steps": args.steps, "samples": args.num * len(args.lengths),
                      "lengths": args.lengths, "preset": "quickstart", "threads": torch.get_num_threads()},
           "results": rows}
    partial = args.out / f"{results.stem('approx_quality_cpu', args.quick)}.partial.json"
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.modes or list(MODES):
            print(f"{name}: training {args.steps} steps ...", flush=True)
            rows.append(run_mode(name, args.steps, args.num, Path(tmp), args.lengths))
            r = rows[-1]
            print(f"    {r['train_s']:.0f} s, final loss {r['final_loss']:.3f}, samples: "
                  f"{ {k: r['samples'].get(k) for k in ('step_mean', 'rg_ratio', 'helix')} }", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(doc, indent=1) + "\n")  # each finished mode is kept
    results.write(doc, markdown(doc), args.out, results.stem("approx_quality_cpu", args.quick))
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
