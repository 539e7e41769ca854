"""Peak memory of one flash-genie training step (forward + backward), per configuration.

Measures Genie's architecture (the defaults: scope_l_128's model, 4.1 M parameters) at
B=1, float32, on the CPU, for flash-genie with every technique off (genie-tk's plain
``reference`` backend, nothing chunked or checkpointed: Genie's own computation) and with
its exact long-sequence configuration, plus the steps in between, and compares each
figure with the memory planner's prediction.

Method. Every (configuration, length) runs in a fresh process. It builds the model in
training mode and runs a 16-residue step first (so that code paths, thread pools and
parameter gradients exist once), frees the gradients, returns freed heap memory to the
system (``malloc_trim``), reads the resident set (``VmRSS``), resets the kernel's
high-water mark (``/proc/self/clear_refs``) and runs one step at length L: the figure is
``VmHWM - VmRSS`` (genie_bench.memory's method), so it counts everything the step adds,
parameter gradients included. A second step under
:class:`flash_genie.memtrack.TensorMemoryTracker` gives the tensor-level peak. The
children run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then serves every allocation of
128 KiB or more with its own mapping and returns it on ``free``, so the resident set
follows what the step holds; with glibc's default (a threshold that grows up to 32 MiB),
freed chunk buffers stay in the heap and the resident set grows with fragmentation (one
run records that figure too, ``--default-malloc-also``).

    python benchmarks/model_memory.py                  # L = 256, 384 (about 20 minutes on 2 cores)
    python benchmarks/model_memory.py --quick          # L = 64, 96 (under a minute)
    python benchmarks/model_memory.py --genie-source /path/to/genie  # add the original Genie's own figure
    python benchmarks/model_memory.py --report benchmarks/results/model_memory_cpu_<date>.json  # markdown, plot again

Files: ``benchmarks/results/model_memory_cpu_<date>[_quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from genie_bench import memory  # noqa: E402
from genie_bench.env import environment  # noqa: E402

from flash_genie import Config, Denoiser  # noqa: E402
from flash_genie.diffusion import make_schedule, training_loss  # noqa: E402
from flash_genie.memtrack import TensorMemoryTracker  # noqa: E402
from flash_genie.model.options import MemoryOptions  # noqa: E402
from flash_genie.planner import estimate  # noqa: E402

SCHEMA = "flash-genie-model-memory/1"
MIB = 2**20
CHUNK = 32
CONFIGURATIONS = {
    "all off": MemoryOptions(pair_stack_backend="reference"),
    "flash-genie default (genie-tk torch backend)": MemoryOptions(),
    "+ chunked IPA and pair transition, in place": MemoryOptions(
        pair_stack_backend="torch", ipa_chunk_size=CHUNK, pair_transition_chunk_size=CHUNK, inplace=True),
    "long sequence (+ every layer checkpointed)": MemoryOptions.long_sequence(
        checkpointing="all", ipa_chunk_size=CHUNK, pair_transition_chunk_size=CHUNK),
}
OFF, LONG = "all off", "long sequence (+ every layer checkpointed)"
GENIE = "original Genie (its own code)"
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
SOURCE_PATHS = ("packages/genie-tk/src", "packages/flash-genie/src", "benchmarks/model_memory.py")


def _options_json(options: MemoryOptions) -> dict:
    return {k: v for k, v in vars(options).items()}


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True)


def source() -> dict:
    """``{"hash", "changed"}``: the checkout's HEAD and the tracked source files the figures
    depend on (``SOURCE_PATHS``: both packages' ``src/``, this script) that differ from it.
    Each child records it when it starts, so a row names the code it measured even while
    others commit."""
    head, changed = _git("rev-parse", "HEAD"), _git("diff", "--name-only", "HEAD", "--", *SOURCE_PATHS)
    return {"hash": head.stdout.strip() if head.returncode == 0 else "unknown",
            "changed": changed.stdout.split() if changed.returncode == 0 else []}


def source_trees(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The distinct source trees the rows measured, and every commit they ran at. Two
    commits whose ``SOURCE_PATHS`` are the same (``git diff`` finds nothing between them)
    are one tree; files changed in the working tree make a tree of their own."""
    sources = [r["source"] for r in rows if "source" in r]
    commits = list(dict.fromkeys(s["hash"] for s in sources))
    trees: list[dict] = []
    for s in sources:
        if not any(t["changed"] == s["changed"] and (t["hash"] == s["hash"] or (
                not s["changed"] and _git("diff", "--quiet", t["hash"], s["hash"], "--", *SOURCE_PATHS).returncode == 0))
                   for t in trees):
            trees.append(s)
    return trees, commits


# -- child: one measurement ---------------------------------------------------------
def _architecture(path: str | None) -> Config:
    return Config.from_file(path) if path else Config()


def _genie_original(source: str, config: Config):
    """The original Genie's denoiser and a step function, imported from a checkout."""
    sys.path.insert(0, source)
    from genie.model.model import Denoiser as GenieDenoiser
    from genie.utils.affine_utils import T
    from genie.utils.geo_utils import compute_frenet_frames
    from genie.utils.loss import rmsd

    model = GenieDenoiser(**config.denoiser_kwargs()).train()

    def step(x0, mask, noise, steps):
        xt = x0 + noise  # the noised input; the memory does not depend on the schedule
        rots = compute_frenet_frames(xt, mask)
        eps = xt - model(T(rots, xt), steps, mask).trans
        rmsd(eps, noise, mask).backward()

    return model, step


def _flash_genie(options: MemoryOptions, config: Config):
    model = Denoiser.from_config(config).set_memory_options(options).train()
    schedule = make_schedule(1000, "cosine")

    def step(x0, mask, noise, steps):
        training_loss(model, x0, mask, schedule, timesteps=steps, noise=noise).backward()

    return model, step


def _inputs(length: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(batch, length, 3, generator=g)
    x0 = torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=1)  # a random-walk Cα trace
    x0 = x0 - x0.mean(dim=1, keepdim=True)
    return x0, torch.ones(batch, length), torch.randn(batch, length, 3, generator=g), torch.full((batch,), 500)


def child(args) -> dict:
    code = source()
    torch.manual_seed(0)
    config = _architecture(args.config)
    if args.child == GENIE:
        model, step = _genie_original(args.genie_source, config)
    else:
        model, step = _flash_genie(CONFIGURATIONS[args.child], config)
    step(*_inputs(16, args.batch, seed=1))  # warm-up: code paths, threads, gradient buffers
    model.zero_grad(set_to_none=True)
    inputs = _inputs(args.length, args.batch)
    t0 = time.perf_counter()
    rss = memory.peak_mib(lambda: step(*inputs), torch.device("cpu"))
    seconds = time.perf_counter() - t0
    out = {"peak_rss_mib": rss, "step_s": seconds, "malloc": "default" if args.default_malloc else "mmap-128KiB",
           "source": code}
    if not args.no_tracker:
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as tracker:
            step(*inputs)
        out["peak_tensor_mib"] = tracker.peak / MIB
    return out


# -- parent ---------------------------------------------------------------------------
def measure(name: str, length: int, args, default_malloc=False, tracker=True) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--lengths", str(length), "--batch", str(args.batch)]
    if args.genie_source:
        cmd += ["--genie-source", args.genie_source]
    if args.config:
        cmd += ["--config", args.config]
    if default_malloc:
        cmd.append("--default-malloc")
    if not tracker:
        cmd.append("--no-tracker")
    env = {**os.environ, **({} if default_malloc else MMAP_ENV), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"status": "error", "reason": done.stderr.strip()[-2000:]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def _meta_model(config: Config) -> Denoiser:
    with torch.device("meta"):  # shapes only
        return Denoiser.from_config(config)


def predicted(name: str, length: int, batch: int, config: Config) -> dict | None:
    if name == GENIE:
        return None
    model = _meta_model(config)
    e = estimate(model.dims, CONFIGURATIONS[name], batch, length,
                 parameters=sum(p.numel() for p in model.parameters()))
    return {"predicted_mib": e.activations / MIB, "predicted_phase": e.phase,
            "predicted_parts_mib": {k: v / MIB for k, v in e.parts.items()}}


def run(args) -> dict:
    lengths = args.lengths or ([64, 96] if args.quick else [256, 384])
    plan = []
    for length in lengths:
        names = list(CONFIGURATIONS) if (args.all_configs_at is None or length in args.all_configs_at) else [OFF, LONG]
        if args.genie_source:
            names = [GENIE, *names]
        plan += [(name, length) for name in names]
    code = source()  # before the first child: the code the run starts from
    rows = []
    for name, length in plan:
        print(f"measuring {name!r} at L={length} ...", flush=True)
        row = {"configuration": name, "length": length, "batch": args.batch, "dtype": "float32",
               "options": None if name == GENIE else _options_json(CONFIGURATIONS[name]),
               **measure(name, length, args)}
        pairs = args.batch * length * length
        if row["status"] == "ok":
            row["kb_per_pair_rss"] = row["peak_rss_mib"] * MIB / pairs / 1000
            if "peak_tensor_mib" in row:
                row["kb_per_pair_tensor"] = row["peak_tensor_mib"] * MIB / pairs / 1000
            pred = predicted(name, length, args.batch, _architecture(args.config))
            if pred:
                row.update(pred)
                row["prediction_error_rss"] = pred["predicted_mib"] / row["peak_rss_mib"] - 1
                if "peak_tensor_mib" in row:
                    row["prediction_error_tensor"] = pred["predicted_mib"] / row["peak_tensor_mib"] - 1
        print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                       if k not in ("options", "predicted_parts_mib")}, flush=True)
        rows.append(row)
    if args.default_malloc_also:
        length = max(lengths)
        extra = measure(LONG, length, args, default_malloc=True, tracker=False)
        rows.append({"configuration": LONG, "length": length, "batch": args.batch, "dtype": "float32",
                     "options": _options_json(CONFIGURATIONS[LONG]), **extra})
    arch = f"the architecture of {args.config}" if args.config else "Genie defaults (scope_l_128's model)"
    return {"schema": SCHEMA, "environment": _environment(code), "config": {
        "architecture": arch, "batch": args.batch, "lengths": lengths,
        "quick": args.quick, "chunk_size": CHUNK, "malloc_env": MMAP_ENV,
        "genie_source": args.genie_source}, "results": rows, "summary": summary(rows, lengths)}


def _environment(code: dict) -> dict:
    env = environment(torch.device("cpu"))
    env["commit"] = {"hash": code["hash"], "dirty": bool(code["changed"]), "changed": code["changed"]}
    return env


def summary(rows: list[dict], lengths: list[int]) -> dict:
    """Long-sequence peak over all-off peak per length, and the planner's errors."""
    out = {}
    for length in lengths:
        ok = {r["configuration"]: r for r in rows if r["length"] == length and r["status"] == "ok"
              and r.get("malloc") == "mmap-128KiB"}
        if OFF in ok and LONG in ok:
            entry = {"all_off_mib": ok[OFF]["peak_rss_mib"], "long_sequence_mib": ok[LONG]["peak_rss_mib"],
                     "ratio": ok[LONG]["peak_rss_mib"] / ok[OFF]["peak_rss_mib"],
                     "all_off_kb_per_pair": ok[OFF]["kb_per_pair_rss"],
                     "long_sequence_kb_per_pair": ok[LONG]["kb_per_pair_rss"]}
            if GENIE in ok:
                entry["original_genie_mib"] = ok[GENIE]["peak_rss_mib"]
                entry["original_genie_kb_per_pair"] = ok[GENIE]["kb_per_pair_rss"]
                entry["ratio_to_original_genie"] = ok[LONG]["peak_rss_mib"] / ok[GENIE]["peak_rss_mib"]
            out[str(length)] = entry
    errors = [abs(r["prediction_error_rss"]) for r in rows if "prediction_error_rss" in r]
    if errors:
        out["planner_max_abs_error_rss"] = max(errors)
    return out


# -- report ---------------------------------------------------------------------------
def markdown(doc: dict, plot: str | None) -> str:
    env, cfg = doc["environment"], doc["config"]
    lines = [f"# flash-genie training-step memory ({'quick, ' if cfg['quick'] else ''}CPU)", "",
             f"{env['date'][:10]} · commit `{env['commit']['hash'][:10]}`"
             f"{' (source files changed: ' + ', '.join(env['commit']['changed']) + ')' if env['commit']['changed'] else ''}"
             f" · torch {env['torch']} · {env['device']['name']} · {env['device']['threads']} threads, "
             f"load {env['device']['load_avg_1min']:.1f}", "",
             f"{cfg['architecture']}, B={cfg['batch']}, float32, one training step (forward + backward). "
             "Peak = growth of the resident set over the process holding the model and inputs "
             f"(fresh process per row, glibc with `MALLOC_MMAP_THRESHOLD_=131072`; method in "
             "`benchmarks/model_memory.py`); tensor peak = `flash_genie.memtrack`; predicted = "
             "`flash_genie.planner.estimate`. Step times are single runs on a shared machine.", "",
             "| configuration | L | peak (MiB) | KB/pair | tensor peak (MiB) | predicted (MiB) | error | step (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['configuration']} | {r['length']} | {r['status']}: {r['reason'][:80]} | | | | | |")
            continue
        name = r["configuration"] + (" (glibc default malloc)" if r.get("malloc") == "default" else "")
        tensor = f"{r['peak_tensor_mib']:.0f}" if "peak_tensor_mib" in r else ""
        pred = f"{r['predicted_mib']:.0f}" if "predicted_mib" in r else ""
        err = f"{100 * r['prediction_error_rss']:+.1f}%" if "prediction_error_rss" in r else ""
        kb = f"{r['peak_rss_mib'] * MIB / (r['batch'] * r['length'] ** 2) / 1000:.1f}"
        lines.append(f"| {name} | {r['length']} | {r['peak_rss_mib']:.0f} | {kb} | {tensor} | {pred} | {err} | "
                     f"{r['step_s']:.1f} |")
    lines += ["", "Long-sequence configuration against everything off:", ""]
    for length, s in doc["summary"].items():
        if not isinstance(s, dict):
            continue
        line = (f"* L={length}: {s['long_sequence_mib']:.0f} MiB against {s['all_off_mib']:.0f} MiB: "
                f"**{s['ratio']:.3f}** (1/{1 / s['ratio']:.1f}); {s['long_sequence_kb_per_pair']:.1f} against "
                f"{s['all_off_kb_per_pair']:.1f} KB per residue pair")
        if "original_genie_mib" in s:
            line += (f"; the original Genie: {s['original_genie_mib']:.0f} MiB, "
                     f"{s['original_genie_kb_per_pair']:.1f} KB/pair (ratio {s['ratio_to_original_genie']:.3f})")
        lines.append(line)
    if "planner_max_abs_error_rss" in doc["summary"]:
        lines += ["", f"Planner: largest error against the measured peak "
                  f"{100 * doc['summary']['planner_max_abs_error_rss']:.1f}%."]
    trees, commits = source_trees(doc["results"])
    if len(trees) > 1:
        lines += ["", "The rows ran on different source trees (others committed during the run): " + "; ".join(
            f"`{t['hash'][:10]}`" + (f" with {', '.join(t['changed'])} changed" if t["changed"] else "")
            for t in trees) + "."]
    elif len(commits) > 1:
        lines += ["", f"Others committed during the run (rows at {', '.join(f'`{c[:10]}`' for c in commits)}); "
                  f"none of those commits changed the measured source ({', '.join(SOURCE_PATHS)})."]
    if plot:
        lines += ["", f"![peak memory against L]({plot})"]
    return "\n".join(lines) + "\n"


def write_plot(doc: dict, path: Path, config: Config) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = _meta_model(config)
    parameters = sum(p.numel() for p in model.parameters())
    grid = list(range(64, 2049, 32))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, color in ((OFF, "tab:red"), (LONG, "tab:blue")):
        pred = [estimate(model.dims, CONFIGURATIONS[name], 1, n, parameters=parameters).activations / 2**30
                for n in grid]
        ax.plot(grid, pred, color=color, lw=1.2, label=f"{name}: planner, fp32")
        pts = [(r["length"], r["peak_rss_mib"] / 1024) for r in doc["results"]
               if r["configuration"] == name and r["status"] == "ok" and r.get("malloc") == "mmap-128KiB"]
        if pts:
            ax.plot(*zip(*pts), "o", color=color, label=f"{name}: measured (CPU)")
    genie = [(r["length"], r["peak_rss_mib"] / 1024) for r in doc["results"]
             if r["configuration"] == GENIE and r["status"] == "ok"]
    if genie:
        ax.plot(*zip(*genie), "x", color="black", label=GENIE)
    ax.axhline(80, color="gray", ls=":", lw=1)
    ax.text(grid[0], 82, "80 GiB", color="gray", fontsize=8)
    ax.set(xlabel="L (residues)", ylabel="peak memory of a training step (GiB)", yscale="log",
           title=f"{doc['config']['architecture']}, B={doc['config']['batch']}, float32")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="L = 64, 96")
    ap.add_argument("--lengths", type=int, nargs="+", help="default: 256 384 (quick: 64 96)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--all-configs-at", type=int, nargs="*",
                    help="lengths at which the intermediate configurations run too (default: all lengths)")
    ap.add_argument("--genie-source", help="a checkout of aqlaboratory/genie: measure the original too")
    ap.add_argument("--config", help="a Genie-format config whose architecture to measure (default: Genie's)")
    ap.add_argument("--default-malloc-also", action="store_true",
                    help="also measure the long-sequence configuration under glibc's default malloc")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", help="file stem (default model_memory_cpu_<date>[_quick])")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="measure nothing: write the markdown and plot of a result file again, beside it")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--default-malloc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-tracker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.length = args.lengths[0]
        print(json.dumps(child(args)))
        return 0
    if args.report:
        doc, out, stem = json.loads(args.report.read_text()), args.report.parent, args.report.stem
    else:
        doc = run(args)
        date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        out, stem = args.out, args.name or f"model_memory_cpu_{date}" + ("_quick" if args.quick else "")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot = f"{stem}.png" if write_plot(doc, out / f"{stem}.png", _architecture(args.config)) else None
    (out / f"{stem}.md").write_text(markdown(doc, plot))
    print((out / f"{stem}.md").read_text())
    bad = [r for r in doc["results"] if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
