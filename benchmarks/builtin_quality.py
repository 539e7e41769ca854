"""Sample quality of flash-genie's built-in model against real chains, with the issue's targets.

Samples 32 backbones (4 of each of 8 lengths from 50 to 128) from the built-in model with
Genie's 1,000-step ancestral sampler at the recommended noise scale (the default of
``flash-genie sample``), evaluates them with ``flash-genie evaluate`` against real chains of
the built-in set in the same 32-residue length bins, draws the samples and the reference
chains, and checks the quality targets of issue 18, printing pass/fail per target:

* Cα step: mean over samples within 0.05 Å of 3.80; spread (standard deviation over samples
  of each sample's mean step) ≤ 0.2 Å;
* clashes: at least 95 % of samples with no Cα pair closer than 3 Å (``|i − j| ≥ 2``);
* compactness: the samples' mean Rg / (2.2·L^0.38) within the real chains' mean ± one sd;
* secondary structure: mean helix + strand fraction ≥ 0.5, mean strand fraction at least half
  the real chains';
* diversity: mean pairwise TM-score of the samples ≤ 0.6;
* novelty (highest TM-score to training chains) and the designability proxy ``mpnn_nll``
  (with ``mpnn_top_aa``, which flags low-complexity designs): reported, samples beside real
  chains.

    python benchmarks/builtin_quality.py                       # the committed evaluation
    python benchmarks/builtin_quality.py --device cuda         # the same on a GPU
    python benchmarks/builtin_quality.py --num 1 --lengths 50 64 --timesteps 5   # smoke run

Files in ``--out`` (default ``benchmarks/results/builtin_quality_<device>_<date>``): ``quality.json``,
``quality.md``, ``samples.png`` and ``reference.png`` (Cα traces), ``samples/`` (PDBs and the
evaluation: ``samples/evaluation/{metrics.csv,summary.json,report.png}``). ``--timesteps``
rebuilds the model for a shorter schedule (same weights; Genie's timestep encoding depends on
the number of steps, so its samples say nothing about the model): for testing this script only,
and such runs, like runs of fewer than 32 samples or lengths outside 50–128, are marked quick.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine

import torch  # noqa: E402
from genie_bench import results  # noqa: E402
from genie_bench.env import environment, slug  # noqa: E402

from flash_genie import cli, load_genie  # noqa: E402
from flash_genie.data import builtin_dataset  # noqa: E402
from flash_genie.eval.geometry import CA_STEP  # noqa: E402
from flash_genie.eval.plots import REFERENCE_COLOR, write_trace_grid  # noqa: E402
from flash_genie.pretrained import builtin_checkpoint, load_builtin  # noqa: E402
from flash_genie.sampling import generate, load_model, write_backbones  # noqa: E402

SCHEMA = "flash-genie-builtin-quality/1"
LENGTHS = [50, 61, 72, 83, 94, 105, 117, 128]  # 8 lengths evenly over 50–128
NUM = 4  # per length: 32 samples
MIN_SAMPLES, LENGTH_RANGE = 32, (50, 128)
MPNN_SEQUENCES = 2


def recommended_noise_scale() -> float:
    """The noise scale ``flash-genie sample`` uses by default (the one its docs recommend)."""
    return cli.build_parser().parse_args(["sample", "--lengths", "1", "--out", "-"]).noise_scale


def _mean_sd(values) -> list[float] | None:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    return [float(v.mean()), float(v.std())] if len(v) else None


def _target(name: str, requirement: str, value: str, passed: bool | None) -> dict:
    return {"target": name, "requirement": requirement, "value": value,
            "status": "reported" if passed is None else ("pass" if passed else "FAIL")}


def check_targets(samples: list[dict], reference: list[dict], diversity: dict) -> list[dict]:
    """The quality targets (module docstring) from per-structure metric rows (``metrics.csv``
    as dicts of floats) and the ``diversity`` entry of ``summary.json``."""
    step = _mean_sd([r["step_mean"] for r in samples])
    targets = [
        _target("Cα step mean", f"|mean − {CA_STEP:.2f}| ≤ 0.05 Å", f"{step[0]:.3f} Å", abs(step[0] - CA_STEP) <= 0.05),
        _target("Cα step spread", "sd over samples ≤ 0.2 Å", f"{step[1]:.3f} Å", step[1] <= 0.2),
    ]
    clean = float(np.mean([r["clashes"] == 0 for r in samples]))
    targets.append(_target("no clash", "≥ 95 % of samples without a Cα pair < 3 Å", f"{100 * clean:.0f} %",
                           clean >= 0.95))
    rg, rg_ref = _mean_sd([r["rg_ratio"] for r in samples]), _mean_sd([r["rg_ratio"] for r in reference])
    if rg_ref is None:
        targets.append(_target("Rg ratio", "within real mean ± 1 sd", f"{rg[0]:.3f} (no real chains)", False))
    else:
        lo, hi = rg_ref[0] - rg_ref[1], rg_ref[0] + rg_ref[1]
        targets.append(_target("Rg ratio", f"within real mean ± 1 sd: [{lo:.3f}, {hi:.3f}]", f"{rg[0]:.3f}",
                               lo <= rg[0] <= hi))
    ss = float(np.mean([r["helix"] + r["strand"] for r in samples]))
    targets.append(_target("helix + strand", "≥ 0.5", f"{ss:.3f}", ss >= 0.5))
    strand = float(np.mean([r["strand"] for r in samples]))
    strand_ref = float(np.mean([r["strand"] for r in reference])) if reference else math.nan
    targets.append(_target("strand", f"≥ half the real chains' ({strand_ref:.3f} / 2)", f"{strand:.3f}",
                           bool(strand >= strand_ref / 2)))
    tm = (diversity.get("samples") or {}).get("mean_pairwise_tm")
    targets.append(_target("diversity", "mean pairwise TM ≤ 0.6", "not computed" if tm is None else f"{tm:.3f}",
                           tm is not None and tm <= 0.6))
    for key, label in (("novelty", "novelty (max TM to training chains)"), ("mpnn_nll", "mpnn_nll (designability proxy)"),
                       ("mpnn_top_aa", "commonest residue share of the designs")):
        s, r = _mean_sd([x[key] for x in samples]), _mean_sd([x[key] for x in reference])
        fmt = lambda v: "—" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
        targets.append(_target(label, "reported (samples; real chains)", f"{fmt(s)}; {fmt(r)}", None))
    return targets


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """``(samples, reference)`` rows of a ``metrics.csv``, numbers as floats."""
    rows = list(csv.DictReader(path.read_text().splitlines()))
    for row in rows:
        for key, value in row.items():
            if key not in ("set", "name"):
                row[key] = float(value)
    return [r for r in rows if r["set"] == "sample"], [r for r in rows if r["set"] == "reference"]


def _model(args):
    """``(model, config, source)``; with ``--timesteps`` rebuilt for that schedule."""
    if args.checkpoint:
        model, config = load_model(args.checkpoint, ema=args.ema, device="cpu")
        source = {"checkpoint": str(args.checkpoint), "ema": args.ema}
    else:
        model, config = load_builtin()
        step = torch.load(builtin_checkpoint(), map_location="cpu", weights_only=True).get("step")
        source = {"checkpoint": "built-in (flash_genie/pretrained/builtin.pt)", "step": step}
    if args.timesteps:
        config = config.replace(numTimesteps=args.timesteps)
        model = load_genie(config, model.state_dict())
    return model.to(args.device), config, source


def _grid(path: Path, traces, names, title: str, color=None) -> str:
    from flash_genie.eval.geometry import radius_of_gyration

    titles = [f"{n} (L={len(t)}, Rg {radius_of_gyration(t):.1f} Å)" for n, t in zip(names, traces)]
    write_trace_grid(path, traces, titles, title=title, **({"color": color} if color else {}))
    return path.name


def markdown(doc: dict) -> str:
    cfg, env = doc["config"], doc["environment"]
    head = (f"### Built-in model: {cfg['n_samples']} samples, lengths {min(cfg['lengths'])}–{max(cfg['lengths'])}, "
            f"{cfg['timesteps']} timesteps, noise scale {cfg['noise_scale']} "
            f"({env['device']['name']}, commit {(env['commit'].get('hash') or '?')[:10]})")
    lines = [head, ""]
    if doc["quick"]:
        lines += ["**Quick run** (fewer than 32 samples, lengths outside 50–128, or a shortened schedule): "
                  "not the committed evaluation.", ""]
    lines += [f"Model: {doc['model']['source']['checkpoint']} (step {doc['model']['source'].get('step', '?')}), "
              f"{doc['model']['parameters']:,} parameters. Sampling {doc['timing']['sample_s']:.0f} s, "
              f"evaluation {doc['timing']['evaluate_s']:.0f} s.", "",
              "| target | requirement | value | status |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['requirement']} | {t['value']} | {t['status']} |" for t in doc["targets"]]
    overall = doc["summary"]["overall"]
    lines += ["", "| metric | samples | real chains |", "|---|---:|---:|"]
    for key, stat in overall["samples"].items():
        ref = overall["reference"].get(key)
        cell = lambda v: "—" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
        lines.append(f"| {key} | {cell(stat)} | {cell(ref)} |")
    tm = [(doc["summary"]["diversity"].get(k) or {}).get("mean_pairwise_tm") for k in ("samples", "reference")]
    lines.append("| mean pairwise TM | " + " | ".join("—" if v is None else f"{v:.3f}" for v in tm) + " |")
    pictures = f"[samples]({doc['files']['samples_png']})"
    if doc["files"]["reference_png"]:
        pictures += f", [real chains]({doc['files']['reference_png']})"
    lines += ["", f"{doc['summary']['n_samples']} samples, {doc['summary']['n_reference']} real chains of the built-in "
              f"set in the same 32-residue length bins; mean ± sd over structures. Pictures: {pictures}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="evaluate this flash-genie checkpoint instead of the built-in model")
    ap.add_argument("--ema", action="store_true", help="with --checkpoint: its EMA weights")
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help=f"default {LENGTHS}")
    ap.add_argument("--num", type=int, default=NUM, help=f"samples per length (default {NUM})")
    ap.add_argument("--noise-scale", type=float, default=recommended_noise_scale(),
                    help="default: flash-genie sample's (%(default)s)")
    ap.add_argument("--timesteps", type=int, help="smoke tests only: a shorter schedule (see above)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mpnn-sequences", type=int, default=MPNN_SEQUENCES, help="ProteinMPNN designs per structure")
    ap.add_argument("--reference-per-bin", type=int, default=8, help="real chains per 32-residue length bin")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/builtin_quality_<device>_<date>)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    quick = bool(args.timesteps) or args.num * len(args.lengths) < MIN_SAMPLES or not all(
        LENGTH_RANGE[0] <= n <= LENGTH_RANGE[1] for n in args.lengths)
    out = args.out or HERE / "results" / results.stem(f"builtin_quality_{slug(env['device'])}", quick)
    out.mkdir(parents=True, exist_ok=True)

    model, config, source = _model(args)
    print(f"sampling {args.num} × {args.lengths} with {config['numTimesteps']} timesteps, noise scale "
          f"{args.noise_scale} on {device}", flush=True)
    t0 = time.perf_counter()
    backbones = generate(model, config, args.lengths, args.num, noise_scale=args.noise_scale, seed=args.seed,
                         batch_size=args.batch_size, device=device, progress=True)
    sample_s = time.perf_counter() - t0
    folder = write_backbones(backbones, out / "samples", title=f"flash-genie built-in model, noise scale {args.noise_scale}")
    t0 = time.perf_counter()
    code = cli.main(["evaluate", str(folder), "--overwrite", "--mpnn-sequences", str(args.mpnn_sequences),
                     "--reference-per-bin", str(args.reference_per_bin), "--seed", str(args.seed)])
    evaluate_s = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"flash-genie evaluate failed with exit code {code}")
    summary = json.loads((folder / "evaluation" / "summary.json").read_text())
    samples, reference = read_metrics(folder / "evaluation" / "metrics.csv")
    targets = check_targets(samples, reference, summary["diversity"])

    ds = builtin_dataset()
    index = {name: i for i, name in enumerate(ds.names)}
    files = {
        "samples_png": _grid(out / "samples.png", [b.coords for b in backbones], [b.name for b in backbones],
                             f"flash-genie built-in model: {len(backbones)} samples"),
        "reference_png": _grid(out / "reference.png", [ds.coords(index[r["name"]]) for r in reference],
                               [r["name"] for r in reference], f"{len(reference)} real chains (built-in set)",
                               REFERENCE_COLOR) if reference else None,
        "evaluation": str((folder / "evaluation").relative_to(out)),
    }
    doc = {"schema": SCHEMA, "quick": quick, "environment": env,
           "config": {"lengths": args.lengths, "num_per_length": args.num, "n_samples": len(backbones),
                      "timesteps": config["numTimesteps"], "schedule": config["schedule"],
                      "noise_scale": args.noise_scale, "seed": args.seed, "batch_size": args.batch_size,
                      "mpnn_sequences": args.mpnn_sequences, "reference_per_bin": args.reference_per_bin,
                      "threads": torch.get_num_threads()},
           "model": {"source": source, "name": config["name"], "parameters": sum(p.numel() for p in model.parameters())},
           "timing": {"sample_s": sample_s, "evaluate_s": evaluate_s},
           "targets": targets, "summary": summary, "files": files}
    (out / "quality.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(doc))
    print(markdown(doc))
    width = max(len(t["target"]) for t in targets)
    for t in targets:
        print(f"{t['status']:>8}  {t['target']:<{width}}  {t['value']}  ({t['requirement']})")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
