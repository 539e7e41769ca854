"""Memory and time of flash-genie's approximate long-chain modes, measured on the CPU.

Two measurements:

1. **Training step** (forward + backward of Genie's loss, float32, B=1) of Genie's
   architecture (flash-genie's defaults: c_s = c_p = 128, 5 pair layers, 5 structure layers)
   in each mode, every mode with flash-genie's exact memory options on top (genie-tk's
   ``torch`` backend, chunked IPA and pair transition, in-place residuals, every layer
   checkpointed): the linear modes (factorized rank 2, sparse k = 32, both together as in
   the ``ultra_long_training`` config) at L = 512, 1024, 2048; the quadratic ones (the exact
   dense model without and with triangle attention, axial attention in place of triangle
   attention) at L = 256, 512, 1024, as far as the machine holds them.
   Every figure comes from a fresh process (resident-set growth with the high-water mark
   reset, glibc's mmap threshold fixed at 128 KiB so freed buffers go back to the system:
   the method of ``benchmarks/model_memory.py``) plus the tensor-level peak
   (:class:`flash_genie.memtrack.TensorMemoryTracker`). The growth exponent is fitted by
   least squares on log(peak) against log(L).
2. **Axial against triangle attention**: one module (c = 128, 4 heads of 32), forward +
   backward, at N = 128, 256, 384: wall time and tensor-level peak, with fitted exponents,
   so the docs state the complexity that is measured.

Plus the parameter count and state-dict size of each mode (layer sharing included).

    python benchmarks/approx_modes.py            # everything (hours on one loaded CPU thread)
    python benchmarks/approx_modes.py --quick    # small lengths, a few minutes
    python benchmarks/approx_modes.py --modes "long_sequence_training (as written)" --no-attention

The seed configurations of the README (``long_sequence_training``, ``ultra_long_training``) get
rows *as written*: their own batch size, loss options and the memory defaults of the approximate
modes (chunked IPA, every layer checkpointed), nothing added, at the linear modes' lengths. The
dense model is measured without and with triangle attention; axial attention replaces triangle
attention in the latter (the model it approximates).

Files: ``benchmarks/results/approx_modes_cpu_<date>[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from genie_bench import memory, results  # noqa: E402
from model_memory import MMAP_ENV, _environment, _inputs, source  # noqa: E402  (the same method)

from flash_genie import Config, Denoiser  # noqa: E402
from flash_genie.diffusion import loss_options, make_schedule, training_loss  # noqa: E402
from flash_genie.memtrack import TensorMemoryTracker  # noqa: E402
from flash_genie.model.approx import parameter_report  # noqa: E402
from flash_genie.model.options import MemoryOptions  # noqa: E402

SCHEMA = "flash-genie-approx-modes/1"
MIB = 2**20
CHUNK = 64
#: The two user configurations of the README, as written (their batch sizes and memory defaults).
SEED_CONFIGS = {
    "long_sequence_training": "batchSize 2\nmaximumNumResidues 1024\nsingleFeatureDimension 128\n"
                              "pairFeatureDimension 128\nzFactorRank 2\nlearningRate 2e-4\nwarmupEpochs 100\n"
                              "gradientClipVal 1.0\n",
    "ultra_long_training": "batchSize 1\nmaximumNumResidues 4096\nzFactorRank 2\nuseSparseKNN True\n"
                           "kNeighbors 32\nuseProgressiveTraining True\nuseChunkedLoss True\n"
                           "useModelCompression True\ncompressionStrategy universal\n",
}
MODES = {
    "dense (exact)": {},
    "dense + triangle attention": {"includeTriangularAttention": True},
    # Axial attention in place of triangle attention: the model it approximates is the row above.
    "axial attention": {"useAxialAttention": True, "includeTriangularAttention": True},
    "factorized r=2": {"zFactorRank": 2},
    "sparse k=32": {"useSparseKNN": True, "kNeighbors": 32},
    "factorized r=2 + sparse k=32": {"zFactorRank": 2, "useSparseKNN": True, "kNeighbors": 32},
    "universal layer sharing": {"useModelCompression": True, "compressionStrategy": "universal"},
    "ultra_long_training": {"zFactorRank": 2, "useSparseKNN": True, "kNeighbors": 32,
                            "useModelCompression": True, "compressionStrategy": "universal"},
}
LINEAR = ("factorized r=2", "sparse k=32", "factorized r=2 + sparse k=32")
QUADRATIC = ("dense (exact)", "dense + triangle attention", "axial attention")
AS_WRITTEN = " (as written)"


def mode_config(name: str, length: int, small: bool = False) -> Config:
    if name.endswith(AS_WRITTEN):
        config = Config.from_text(SEED_CONFIGS[name[: -len(AS_WRITTEN)]], source=f"<{name}>")
        return config.replace(maximumNumResidues=length)
    keys = {"maximumNumResidues": length, **MODES[name]}
    if small:  # --quick: a small architecture
        keys.update(singleFeatureDimension=32, pairFeatureDimension=16, numPairTransformLayers=2,
                    numStructureLayers=2, ipaNumHeads=4, triangularMultiplicativeHiddenDimension=16)
    return Config(keys, source=f"<mode {name}>")


def options() -> MemoryOptions:
    return MemoryOptions.long_sequence(checkpointing="all", ipa_chunk_size=CHUNK, pair_transition_chunk_size=CHUNK,
                                       triangle_attention_chunk_size=CHUNK)


# -- child: one training-step measurement ------------------------------------------------
def child_step(name: str, length: int, small: bool) -> dict:
    torch.manual_seed(0)
    config = mode_config(name, length, small)
    model = Denoiser.from_config(config).train()
    batch, extra = 1, {}
    if name.endswith(AS_WRITTEN):  # the config's own batch, memory defaults and loss
        batch, extra = config["batchSize"], loss_options(config)
    else:
        model.set_memory_options(options())
    schedule = make_schedule(1000, "cosine")

    def step(x0, mask, noise, timesteps):
        training_loss(model, x0, mask, schedule, timesteps=timesteps, noise=noise, **extra).backward()

    step(*_inputs(16, batch, seed=1))  # warm-up: code paths, threads, gradient buffers
    model.zero_grad(set_to_none=True)
    inputs = _inputs(length, batch)
    t0 = time.perf_counter()
    rss = memory.peak_mib(lambda: step(*inputs), torch.device("cpu"))
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    with TensorMemoryTracker() as tracker:
        step(*inputs)
    return {"peak_rss_mib": rss, "peak_tensor_mib": tracker.peak / MIB, "step_s": seconds, "batch": batch,
            "memory_options": {k: v for k, v in vars(model.memory).items()}}


# -- child: axial against triangle attention ------------------------------------------------
def child_attention(kind: str, n: int) -> dict:
    from flash_genie.model.axial import AxialAttention
    from genie_tk import TriangleAttentionStartingNode

    torch.manual_seed(0)
    c, d, h = 128, 32, 4
    module = AxialAttention(c, d, h) if kind == "axial" else TriangleAttentionStartingNode(c, d, h)
    if kind == "triangle":
        module.backend = "torch"  # genie-tk's memory-efficient backend, its automatic row chunks
    z = torch.randn(1, n, n, c, requires_grad=True)
    mask = torch.ones(1, n, n)

    def run():  # axial attention in chunks of 64 rows, as the training step runs it
        module(z, mask, chunk_size=64 if kind == "axial" else None).square().mean().backward()

    run()  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    with TensorMemoryTracker() as tracker:
        run()
    return {"seconds": sorted(times)[1], "peak_tensor_mib": tracker.peak / MIB}


# -- parent ---------------------------------------------------------------------------------
def _child(args: list[str]) -> dict:
    env = {**os.environ, **MMAP_ENV, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        return {"status": "error", "reason": done.stderr.strip()[-1500:]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def fit_exponent(lengths: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(length)."""
    if len(lengths) < 2:
        return None
    xs, ys = [math.log(v) for v in lengths], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def run(args) -> dict:
    linear_lengths = args.linear_lengths or ([64, 128, 256] if args.quick else [512, 1024, 2048])
    quadratic_lengths = args.quadratic_lengths or ([32, 64, 128] if args.quick else [256, 512, 1024])
    attention_n = [32, 64, 96] if args.quick else [128, 256, 384]
    small = ["--small"] if args.quick else []
    # Every finished row is appended to a journal, so an interrupted run continues (--resume).
    journal = args.out / f"{results.stem('approx_modes_cpu', args.quick)}.partial.jsonl"
    done = {}
    if args.resume and journal.exists():
        for line in journal.read_text().splitlines():
            row = json.loads(line)
            done[(row.get("mode") or row.get("module"), row.get("length") or row.get("n"))] = row
    journal.parent.mkdir(parents=True, exist_ok=True)

    def measure(key, make_row):
        if key in done:
            print("    (journal)", done[key], flush=True)
            return done[key]
        row = make_row()
        print("   ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        with journal.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return row

    seeds = [name + AS_WRITTEN for name in SEED_CONFIGS]
    plan = [*((m, linear_lengths) for m in (*seeds, *LINEAR)), *((m, quadratic_lengths) for m in QUADRATIC)]
    if args.modes:
        unknown = set(args.modes) - {m for m, _ in plan}
        if unknown:
            raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {[m for m, _ in plan]}")
        plan = [(m, lengths) for m, lengths in plan if m in args.modes]
    steps = []
    for name, lengths in plan:
        for length in lengths:
            print(f"training step: {name!r} at L={length} ...", flush=True)
            row = measure((name, length), lambda name=name, length=length: {
                "mode": name, "length": length, **_child(["--child-step", name, "--length", str(length), *small])})
            steps.append(row)
            if row["status"] != "ok":
                break  # longer chains will not fit either
    attention = []
    for kind in ("triangle", "axial") if not args.no_attention else ():
        for n in attention_n:
            attention.append(measure((kind, n), lambda kind=kind, n=n: {
                "module": kind, "n": n, **_child(["--child-attention", kind, "--length", str(n)])}))
    parameters = {}
    for name in MODES:
        with torch.device("meta"):
            model = Denoiser.from_config(mode_config(name, 128, args.quick))
        parameters[name] = parameter_report(model)
    return {"schema": SCHEMA, "environment": _environment(source()),
            "config": {"architecture": "small (--quick)" if args.quick else "Genie defaults", "batch": 1,
                       "command": " ".join(["python benchmarks/approx_modes.py", *(args.argv or [])]),
                       "dtype": "float32", "memory_options": {k: v for k, v in vars(options()).items()},
                       "malloc_env": MMAP_ENV},
            "training_step": steps, "attention": attention, "parameters": parameters,
            "summary": summary(steps, attention)}


def summary(steps: list[dict], attention: list[dict]) -> dict:
    out: dict = {"training_step_exponent": {}, "attention_exponent": {}}
    for mode in dict.fromkeys(r["mode"] for r in steps):
        ok = [r for r in steps if r["mode"] == mode and r["status"] == "ok"]
        lengths = [r["length"] for r in ok]
        out["training_step_exponent"][mode] = {
            "lengths": lengths,
            "peak_rss": fit_exponent(lengths, [r["peak_rss_mib"] for r in ok]),
            "peak_tensor": fit_exponent(lengths, [r["peak_tensor_mib"] for r in ok]),
            "time": fit_exponent(lengths, [r["step_s"] for r in ok]),
        }
    for kind in ("triangle", "axial"):
        ok = [r for r in attention if r["module"] == kind and r["status"] == "ok"]
        ns = [r["n"] for r in ok]
        out["attention_exponent"][kind] = {"n": ns, "time": fit_exponent(ns, [r["seconds"] for r in ok]),
                                           "peak_tensor": fit_exponent(ns, [r["peak_tensor_mib"] for r in ok])}
    return out


def _fmt(v, digits=0):
    return "—" if v is None else f"{v:,.{digits}f}"


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"### Approximate modes: {env['device'].get('name', 'CPU')} "
             f"(torch {env.get('torch')}, commit {env['commit'].get('hash', '?')[:10]})", "",
             f"`{doc['config'].get('command', 'python benchmarks/approx_modes.py')}`", "",
             f"One training step (forward + backward), float32, {doc['config']['architecture']}. The seed "
             "configurations *(as written)* run as a user runs them: their own batch size, loss and memory "
             "defaults, nothing added. Every other mode runs at B=1 with the exact memory options on top "
             "(genie-tk torch backend, IPA and transition in chunks of 64 rows, every layer checkpointed). "
             "Peak = resident-set growth of a fresh process (tensor-level peak in brackets).", "",
             "| mode | B | L | peak MiB | step s |", "|---|---:|---:|---:|---:|"]
    for r in doc["training_step"]:
        if r["status"] == "ok":
            lines.append(f"| {r['mode']} | {r.get('batch', 1)} | {r['length']} | {_fmt(r['peak_rss_mib'])} "
                         f"({_fmt(r['peak_tensor_mib'])}) | {_fmt(r['step_s'], 1)} |")
        else:
            lines.append(f"| {r['mode']} | | {r['length']} | failed: {r['reason'].splitlines()[-1][:80]} | — |")
    lines += ["", "Growth exponent fitted on log(peak) against log(L) (1 = linear, 2 = quadratic):", "",
              "| mode | lengths | peak (RSS) | peak (tensors) | time |", "|---|---|---:|---:|---:|"]
    for mode, e in doc["summary"]["training_step_exponent"].items():
        lines.append(f"| {mode} | {', '.join(map(str, e['lengths']))} | {_fmt(e['peak_rss'], 2)} | "
                     f"{_fmt(e['peak_tensor'], 2)} | {_fmt(e['time'], 2)} |")
    lines += ["", "Axial against triangle attention (one module, C=128, 4 heads of 32, forward + backward):", "",
              "| module | N | time s | peak tensors MiB |", "|---|---:|---:|---:|"]
    for r in doc["attention"]:
        if r["status"] == "ok":
            lines.append(f"| {r['module']} | {r['n']} | {r['seconds']:.3f} | {_fmt(r['peak_tensor_mib'])} |")
    for kind, e in doc["summary"]["attention_exponent"].items():
        lines.append(f"\n{kind}: time ∝ N^{_fmt(e['time'], 2)}, memory ∝ N^{_fmt(e['peak_tensor'], 2)}")
    lines += ["", "| mode | parameters | without sharing | state dict MiB |", "|---|---:|---:|---:|"]
    for mode, p in doc["parameters"].items():
        lines.append(f"| {mode} | {p['parameters']:,} | {p['parameters_without_sharing']:,} | "
                     f"{p['state_dict_bytes'] / MIB:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small architecture and lengths (about a minute)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="directory for the JSON and markdown")
    ap.add_argument("--linear-lengths", type=int, nargs="+", help="lengths of the linear modes (512 1024 2048)")
    ap.add_argument("--quadratic-lengths", type=int, nargs="+", help="lengths of the quadratic ones (256 512 1024)")
    ap.add_argument("--resume", action="store_true", help="reuse the rows of an interrupted run's journal")
    ap.add_argument("--modes", nargs="+", help="only these training-step rows (names as in the table)")
    ap.add_argument("--no-attention", action="store_true", help="skip the axial-against-triangle module rows")
    ap.add_argument("--child-step", help=argparse.SUPPRESS)
    ap.add_argument("--child-attention", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.child_step:
        print(json.dumps(child_step(args.child_step, args.length, args.small)))
        return 0
    if args.child_attention:
        print(json.dumps(child_attention(args.child_attention, args.length)))
        return 0
    doc = run(args)
    results.write(doc, markdown(doc), args.out, results.stem("approx_modes_cpu", args.quick))
    (args.out / f"{results.stem('approx_modes_cpu', args.quick)}.partial.jsonl").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
