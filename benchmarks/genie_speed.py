"""flash-genie against the original Genie code, side by side, one CPU thread.

Both models are built for the same architecture and hold the same weights (flash-genie's
``state_dict`` loaded into the original's ``Denoiser``, strict); their calls alternate
in one process, ``reps`` of each, and the ratio of the fastest calls (CPU time of the
calling thread, ``time.thread_time``: the time a shared machine's other work takes from
the thread is not counted) is reported with the median of the per-pair ratios.

Cases, per architecture (``genie``: Genie's published defaults, ``Config()``; ``builtin``:
``flash_genie/pretrained/builtin.config`` with the shipped weights) and length ``L``:

* ``inference``: one noise prediction; flash-genie ``predict_noise`` under
  ``torch.inference_mode`` (how its sampler calls it) against the original's
  ``xt - Denoiser(T(compute_frenet_frames(xt), xt), s, mask).trans`` under ``torch.no_grad``;
* ``training``: one training step's forward and backward (train mode): flash-genie's
  ``training_loss(...).backward()`` against the original's Frenet frames, denoiser and
  ``rmsd`` loss ``.backward()`` (as ``benchmarks/model_memory.py`` runs it), same noise and
  timesteps;
* ``sampler_step``: one reverse step of Genie's 1,000-step sampler on ``B`` chains of
  ``L`` residues padded to ``maximumNumResidues`` (as both samplers pad): the original's
  ``Genie.p`` exactly as its ``p_sample_loop`` calls it (autograd on: its sampling script
  sets no ``no_grad``), and again under ``torch.no_grad``; flash-genie's step as
  ``flash_genie.sample`` runs it (inference mode, the padding trimmed: see its
  ``trim_padding``), and with ``trim_padding=False``.

``--full-sample`` also runs flash-genie's whole 1,000-step sampler (``flash_genie.sample``)
for ``8`` backbones of 64 residues with the built-in model, and records its wall and CPU time.

The original comes from a checkout of aqlaboratory/genie (``--genie-source``, default
``/tmp/genie_orig``); without one the script says so and exits. Its Lightning base class
is replaced by a plain ``nn.Module`` when ``pytorch_lightning`` is not installed (only
``Genie.p`` and the schedule are used). Writes
``benchmarks/results/genie_speed_cpu_<date>.{json,md}``.

    python benchmarks/genie_speed.py --genie-source /tmp/genie_orig
    python benchmarks/genie_speed.py --archs builtin --lengths 64 --cases sampler_step --full-sample
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import types
from importlib.resources import files
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from genie_bench.env import environment  # noqa: E402

from flash_genie import Config, make_schedule, p_step, sample, training_loss  # noqa: E402
from flash_genie.model.denoiser import Denoiser  # noqa: E402
from flash_genie.sampling import load_model  # noqa: E402

CASES = ("inference", "training", "sampler_step")
BATCH = {64: 4, 128: 4, 256: 1}


def _import_original(source: str):
    if "pytorch_lightning" not in sys.modules:
        try:
            import pytorch_lightning  # noqa: F401
        except ImportError:  # only Genie.p and the schedule are used: a plain Module will do

            class LightningModule(nn.Module):
                device = property(lambda self: torch.device("cpu"))

            pl = types.ModuleType("pytorch_lightning")
            pl.core = types.ModuleType("pytorch_lightning.core")
            pl.core.LightningModule = LightningModule
            sys.modules["pytorch_lightning"], sys.modules["pytorch_lightning.core"] = pl, pl.core
    sys.path.insert(0, source)
    from genie.diffusion.genie import Genie
    from genie.model.model import Denoiser as GenieDenoiser
    from genie.utils.affine_utils import T
    from genie.utils.geo_utils import compute_frenet_frames
    from genie.utils.loss import rmsd

    return types.SimpleNamespace(Genie=Genie, Denoiser=GenieDenoiser, T=T, frames=compute_frenet_frames, rmsd=rmsd)


def models(arch: str, orig):
    """``(flash-genie model, original model, config)`` with the same weights."""
    if arch == "builtin":
        flash, config = load_model(files("flash_genie") / "pretrained" / "builtin.pt")
    else:
        config = Config()
        torch.manual_seed(0)
        flash = Denoiser.from_config(config)
        with torch.no_grad():  # zero-initialised output layers would make the outputs trivial
            for p in flash.parameters():
                p.add_(0.05 * torch.randn_like(p))
    original = orig.Denoiser(**config.denoiser_kwargs())
    original.load_state_dict(flash.state_dict(), strict=True)
    return flash.eval(), original.eval(), config


def _chains(batch: int, length: int, padded: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(batch, padded, 3, generator=g)
    x0 = torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=1)
    mask = torch.zeros(batch, padded)
    mask[:, :length] = 1
    x0 = (x0 - x0[:, :length].mean(dim=1, keepdim=True)) * mask[..., None]
    noise = torch.randn(batch, padded, 3, generator=g) * mask[..., None]
    return x0, mask, noise


def calls(case: str, flash, original, config, orig, length: int, batch: int) -> dict:
    schedule = make_schedule(config["numTimesteps"], config["schedule"])
    steps = torch.full((batch,), config["numTimesteps"] // 2, dtype=torch.long)
    if case in ("inference", "training"):
        x0, mask, noise = _chains(batch, length, length)
        xt = x0 + noise
        if case == "inference":
            def f_flash():
                with torch.inference_mode():
                    return flash.predict_noise(xt, steps, mask)

            def f_orig():
                with torch.no_grad():
                    return xt - original(orig.T(orig.frames(xt, mask), xt), steps, mask).trans

            return {"flash-genie": f_flash, "original": f_orig}

        def t_flash():
            flash.train()
            training_loss(flash, x0, mask, schedule, timesteps=steps, noise=noise).backward()
            flash.zero_grad(set_to_none=True)

        def t_orig():
            original.train()
            xs = schedule.sqrt_alphas_cumprod[steps].view(-1, 1, 1) * x0
            xs = xs + schedule.sqrt_one_minus_alphas_cumprod[steps].view(-1, 1, 1) * noise
            eps = xs - original(orig.T(orig.frames(xs, mask), xs), steps, mask).trans
            orig.rmsd(eps, noise, mask).backward()
            original.zero_grad(set_to_none=True)

        return {"flash-genie": t_flash, "original": t_orig}
    padded = config["maximumNumResidues"] or length
    x, mask, _ = _chains(batch, length, padded)
    genie = orig.Genie.__new__(orig.Genie)
    nn.Module.__init__(genie)
    genie.model = original
    genie.config = types.SimpleNamespace(diffusion={"n_timestep": config["numTimesteps"],
                                                    "schedule": config["schedule"]})
    genie.setup_schedule()
    ts = orig.T(orig.frames(x, mask), x)
    s = steps

    def o_step():  # as p_sample_loop calls it
        return genie.p(ts, s, mask, 0.6)

    def o_step_no_grad():
        with torch.no_grad():
            return genie.p(ts, s, mask, 0.6)

    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    keep = length

    def f_step():  # as flash_genie.sample runs a step: trimmed to the longest chain
        with torch.inference_mode():
            return p_step(flash, schedule, x[:, :keep], int(s[0]), mask[:, :keep], 0.6, z=z[:, :keep],
                          padded_length=padded if keep < padded else None)

    def f_step_padded():
        with torch.inference_mode():
            return p_step(flash, schedule, x, int(s[0]), mask, 0.6, z=z)

    return {"flash-genie": f_step, "flash-genie padded": f_step_padded, "original": o_step,
            "original no_grad": o_step_no_grad}


def measure(fns: dict, budget_s: float, max_reps: int) -> dict:
    names = list(fns)
    first = {}
    for name in names:
        start = time.thread_time()
        fns[name]()
        first[name] = time.thread_time() - start
    floor = 2 if sum(first.values()) > 10 else 3  # the largest cases: two of each
    reps = int(max(floor, min(max_reps, budget_s / max(1e-6, sum(first.values())))))
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            c, w = time.thread_time(), time.perf_counter()
            fns[name]()
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - w)
    row = {"reps": reps, "ms": {n: 1e3 * min(cpu[n]) for n in names},
           "ms_median": {n: 1e3 * statistics.median(cpu[n]) for n in names},
           "wall_ms_min": {n: 1e3 * min(wall[n]) for n in names}}
    base = "flash-genie"
    row["speedup"] = {n: row["ms"][n] / row["ms"][base] for n in names if n != base}
    row["speedup_median_of_pairs"] = {
        n: statistics.median(o / f for o, f in zip(cpu[n], cpu[base])) for n in names if n != base}
    return row


def full_sample(flash, config, num: int = 8, length: int = 64) -> dict:
    padded = config["maximumNumResidues"] or length
    mask = torch.zeros(num, padded)
    mask[:, :length] = 1
    schedule = make_schedule(config["numTimesteps"], config["schedule"])
    c, w = time.thread_time(), time.perf_counter()
    out = sample(flash, mask, schedule, 0.6, generator=torch.Generator().manual_seed(0))
    cpu, wall = time.thread_time() - c, time.perf_counter() - w
    steps = (out.x[:, 1:length] - out.x[:, : length - 1]).norm(dim=-1)
    return {"num": num, "length": length, "padded_to": padded, "steps": config["numTimesteps"],
            "wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(),
            "mean_ca_step": float(steps.mean())}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# flash-genie vs the original Genie code (CPU, one thread, fp32)", "",
        f"{env['date'][:10]} · commit `{(env['commit'] or {}).get('hash', '?')[:10]}` · torch {env['torch']} · "
        f"{env['device']['name']} · load {env['device']['load_avg_1min']:.1f}", "",
        f"Generated by `python benchmarks/genie_speed.py {' '.join(result['argv'])}` "
        f"({result['wall_s'] / 60:.1f} min{'' if result['complete'] else ', stopped early: the cases below are those it finished'}). Same architecture and weights; calls alternate in one process. "
        "`speedup` = original's time / flash-genie's (CPU time of the calling thread, fastest call; "
        "the median of per-pair ratios in brackets). Sampler step: B chains of L residues padded to "
        "maximumNumResidues; flash-genie as its sampler runs it (padding trimmed), the original's `Genie.p` as "
        "its `p_sample_loop` calls it (autograd on) and under `no_grad`.", "",
        "| arch | L | B | case | flash-genie ms | original ms | speedup | others |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        others = ", ".join(f"{n}: {r['ms'][n]:.4g} ms ({r['speedup'][n]:.2f}×)" for n in r["ms"]
                           if n not in ("flash-genie", "original"))
        lines.append(f"| {r['arch']} | {r['length']} | {r['batch']} | {r['case']} | {r['ms']['flash-genie']:.4g} | "
                     f"{r['ms']['original']:.4g} | {r['speedup']['original']:.2f}× "
                     f"({r['speedup_median_of_pairs']['original']:.2f}×) | {others or '–'} |")
    fs = result.get("full_sample")
    if fs:
        lines += ["", f"Full sampler, built-in model: {fs['num']} backbones of {fs['length']} residues "
                      f"(padded to {fs['padded_to']}), {fs['steps']} steps, {fs['threads']} thread(s): "
                      f"**{fs['wall_s']:.1f} s wall**, {fs['cpu_s']:.1f} s CPU; mean Cα–Cα step "
                      f"{fs['mean_ca_step']:.2f} Å."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genie-source", default="/tmp/genie_orig", help="a checkout of aqlaboratory/genie")
    ap.add_argument("--archs", nargs="+", default=["genie", "builtin"], choices=["genie", "builtin"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--batch", type=int, help="chains per call (default: 4, 1 at L=256)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--budget-s", type=float, default=6.0, help="CPU seconds of timing per case")
    ap.add_argument("--max-reps", type=int, default=15)
    ap.add_argument("--full-sample", action="store_true", help="also time flash-genie's whole sampler")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name")
    args = ap.parse_args(argv)
    if not (Path(args.genie_source) / "genie" / "model" / "model.py").is_file():
        print(f"skipped: no original Genie checkout at {args.genie_source} (pass --genie-source, a checkout "
              "of github.com/aqlaboratory/genie)")
        return None
    torch.set_num_threads(1)
    orig = _import_original(args.genie_source)
    start = time.perf_counter()
    result = {"environment": environment(torch.device("cpu")), "argv": sys.argv[1:] if argv is None else argv,
              "genie_source": args.genie_source, "results": []}
    stem = args.name or f"genie_speed_cpu_{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        flash, original, config = models(arch, orig)
        for length in args.lengths:
            limit = config["maximumNumResidues"]
            if limit is not None and length > limit:
                print(f"{arch}: L={length} is above maximumNumResidues {limit}; skipped")
                continue
            batch = args.batch or BATCH.get(length, 1)
            for case in args.cases:
                row = {"arch": arch, "length": length, "batch": batch, "case": case,
                       **measure(calls(case, flash, original, config, orig, length, batch),
                                 args.budget_s, args.max_reps)}
                result["results"].append(row)
                _save(result, args.out, stem, start)
                print(f"{arch:8s} L={length:4d} B={batch} {case:13s} flash {row['ms']['flash-genie']:.4g} ms  "
                      + "  ".join(f"{n} {v:.2f}x" for n, v in row["speedup"].items()), flush=True)
        if args.full_sample and arch == "builtin":
            result["full_sample"] = full_sample(flash, config)
            print(f"full sample: {result['full_sample']}", flush=True)
    result["complete"] = True
    _save(result, args.out, stem, start)
    print(markdown(result))
    return result


def _save(result: dict, out: Path, stem: str, start: float) -> None:
    """Write the result files (after every case: a run stopped early keeps what it measured,
    marked ``"complete": false``)."""
    result.setdefault("complete", False)
    result["wall_s"] = time.perf_counter() - start
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
