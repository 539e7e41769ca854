"""The ``flash-genie`` command: ``train``, ``sample``, ``evaluate``, ``data build``, ``check-parallel``, ``plan``.

A thin layer: each subcommand parses its arguments and calls the library
(:mod:`flash_genie.training`, :mod:`flash_genie.sampling`, :mod:`flash_genie.eval`,
:mod:`flash_genie.data`). Errors a user can fix are printed as one line and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flash_genie.config import Config, ConfigError
from flash_genie.data import DatasetError, StructureError
from flash_genie.eval import DesignabilityUnavailable, TMalignUnavailable
from flash_genie.parallel import check as parallel_check

# Small enough to train on 2 CPU cores in a few minutes, on the built-in PDB chains.
QUICKSTART = """\
name quickstart
maximumNumResidues 64
minimumNumResidues 50
singleFeatureDimension 64
pairFeatureDimension 32
positionalEmbeddingDimension 32
timestepEmbeddingDimension 32
relativePositionK 16
numPairTransformLayers 2
triangularMultiplicativeHiddenDimension 32
pairTransitionN 2
numStructureLayers 3
ipaHiddenDimension 16
ipaNumHeads 4
ipaNumQkPoints 4
ipaNumVPoints 4
numTimesteps 1000
schedule cosine
batchSize 8
learningRate 1e-3
warmupSteps 50
gradientClipVal 1.0
maximumSteps 400
checkpointEverySteps 100
precision auto
dataset builtin
"""
QUICKSTART_SAMPLES = {"lengths": [50, 64], "num": 4}


def _train(args) -> int:
    from flash_genie.sampling import generate, write_backbones
    from flash_genie.training import Trainer

    quick = args.config is None
    config = Config.from_text(QUICKSTART, source="<quickstart preset>") if quick else Config.from_file(args.config)
    overrides = {}
    if args.max_steps is not None:
        overrides["maximumSteps"] = args.max_steps
    if args.dataset is not None:
        overrides["dataset"] = args.dataset
    config = config.replace(**overrides) if overrides else config
    out = Path(args.out or ("runs/quickstart" if quick else f"runs/{config['name'] or 'flash-genie'}"))
    trainer = Trainer(config, out, device=args.device, progress=not args.no_progress)
    main = trainer.dist.is_main  # under torchrun, rank 0 reports and samples
    if main:
        grid = f" × {trainer.dist.grid.describe()}" if trainer.dist.enabled else ""
        print(f"training {config['name']!r}: {trainer.max_steps} steps on {trainer.device}{grid} "
              f"({trainer.precision}), {len(trainer.indices)} chains; output in {out}")
        _describe_model(trainer.model)
    try:
        trainer.fit(resume=args.resume)
    finally:
        trainer.dist.close()
    if not main:
        return 0
    print(f"checkpoint: {trainer.checkpoint_dir / 'final.pt'}; metrics: {out / 'metrics.jsonl'}; "
          f"loss curve: {out / 'loss.png'}")
    if quick and not args.no_sample:
        backbones = generate(trainer.model, config, QUICKSTART_SAMPLES["lengths"], QUICKSTART_SAMPLES["num"],
                             device=trainer.device, progress=not args.no_progress)
        samples = write_backbones(backbones, out / "samples", title="flash-genie quickstart")
        _report(samples)
    return 0


def _describe_model(model) -> None:
    """Parameter count, and the approximate modes when any is on (layer sharing: the count
    without it and the size of the weights)."""
    from flash_genie.model.approx import parameter_report

    report = parameter_report(model)
    line = f"model: {report['parameters']:,} parameters"
    if not model.approx.exact:
        line += f"; approximate modes: {model.approx.describe()}"
    if model.approx.compression:
        line += (f" ({report['parameters_without_sharing']:,} without sharing; weights "
                 f"{report['state_dict_bytes'] / 2**20:.1f} MiB)")
    print(line)


def _sample(args) -> int:
    from flash_genie.sampling import generate, load_model, write_backbones

    if args.checkpoint is None:  # the built-in model
        from flash_genie.pretrained import load_builtin

        if args.config or args.ema:
            raise ValueError("--config and --ema apply to a CHECKPOINT; without one the built-in model "
                             "(its own config, EMA weights) is used")
        model, config = load_builtin(device=args.device)
        print(f"built-in model ({config['name']}): {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{config['numTimesteps']} timesteps")
    else:
        model, config = load_model(args.checkpoint, args.config, ema=args.ema, device=args.device)
    if args.chunk_size:  # long chains: chunked IPA, pair transition and triangle attention
        from dataclasses import replace

        size = args.chunk_size
        model.set_memory_options(replace(model.memory, ipa_chunk_size=size, pair_transition_chunk_size=size,
                                         triangle_attention_chunk_size=size))
    backbones = generate(model, config, args.lengths, args.num, noise_scale=args.noise_scale, seed=args.seed,
                         batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                         precision=args.precision)
    out = write_backbones(backbones, args.out, title=f"flash-genie sample, noise scale {args.noise_scale}")
    print(f"wrote {len(backbones)} backbones to {out / 'pdbs'} (PDB) and {out / 'coords'} (Genie text)")
    if not args.no_evaluate:
        _report(out)
    return 0


def _report(folder: Path, reference: str | None = None, overwrite: bool = True, **options) -> None:
    """``evaluate_directory`` on ``folder`` (its ``pdbs/`` when there is one) into ``folder/evaluation``;
    ``options`` go to it."""
    from flash_genie.eval import evaluate_directory

    folder = Path(folder)
    pdbs = folder / "pdbs" if (folder / "pdbs").is_dir() else folder
    report = evaluate_directory(pdbs, reference=reference, out=folder / "evaluation", overwrite=overwrite, **options)
    print(report)
    print(f"evaluation: {folder / 'evaluation'}")


def _evaluate(args) -> int:
    folder = Path(args.directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of sampled structures")
    if args.designability:
        from flash_genie.eval import run_designability
        from flash_genie.eval.report import read_samples

        pdbs = folder / "pdbs" if (folder / "pdbs").is_dir() else folder
        chains, _ = read_samples(pdbs)
        out = run_designability({c.name: c.ca for c in chains}, folder / "designability.csv",
                                proteinmpnn_dir=args.proteinmpnn_dir, device=args.device)
        print(f"designability: {out}")
        return 0
    _report(folder, args.reference, overwrite=args.overwrite, mpnn_sequences=args.mpnn_sequences,
            reference_per_bin=args.reference_per_bin, seed=args.seed)
    return 0


def _data_build(args) -> int:
    from flash_genie.data import build_dataset

    dedup = args.dedup
    if dedup == "none":
        dedup = None
    elif dedup != "exact":
        dedup = float(dedup)
    report = build_dataset(args.src, args.out, min_length=args.min_length, max_length=args.max_length,
                           max_gap=None if args.max_gap <= 0 else args.max_gap, gap_mode=args.gap_mode,
                           dedup=dedup, limit=args.limit, seed=args.seed, overwrite=args.overwrite)
    print(report)
    return 0


def _check_parallel(args) -> int:
    return parallel_check.launch(args.nproc, args, timeout_s=args.timeout)


def _plan(args) -> int:
    import torch

    from flash_genie.config import parse_bytes
    from flash_genie.model import Denoiser
    from flash_genie.planner import format_plan, plan

    config = Config.from_file(args.config) if args.config else Config()
    with torch.device("meta"):  # shapes only: no weights are allocated
        model = Denoiser.from_config(config)
    if model.approx.pair_mode != "dense" or model.approx.axial_attention:
        # The planner's counts are those of the dense pair stack (layer sharing changes only the
        # weights, which the parameter count below carries); planning this config as dense would
        # be wrong by orders of magnitude.
        print(f"{config['name'] or config.source}: {model.approx.describe()}: the planner models the dense "
              "pair stack (and layer sharing) only, not this approximate mode; measure its training step "
              "with benchmarks/approx_modes.py instead", file=sys.stderr)
        return 2
    parameters = sum(p.numel() for p in model.parameters())
    budget = parse_bytes(args.memory)
    candidates, chosen = plan(model.dims, parameters, args.length, args.batch, budget, precision=args.precision,
                              chunk_size=args.chunk_size)
    print(f"{config['name'] or 'Genie defaults'}: {parameters:,} parameters")
    print(format_plan(candidates, chosen, args.length, args.batch, budget))
    return 0 if chosen is not None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flash-genie", description="Genie protein backbone diffusion, long-sequence edition.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (no CONFIG: the quick start on the built-in data)")
    p.add_argument("config", nargs="?", help="Genie-format configuration file")
    p.add_argument("--out", help="run directory (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--max-steps", type=int, help="override maximumSteps")
    p.add_argument("--dataset", help="override dataset: 'builtin' or a dataset built with 'data build'")
    p.add_argument("--no-sample", action="store_true", help="quick start: skip sampling and evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = sub.add_parser("sample", help="sample backbones (no CHECKPOINT: the built-in trained model)")
    p.add_argument("checkpoint", nargs="?",
                   help="flash-genie checkpoint, or an original Genie .ckpt with --config (default: the built-in model)")
    p.add_argument("--config", help="configuration file (needed for original Genie checkpoints)")
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="chain lengths to sample")
    p.add_argument("--num", type=int, default=5, help="backbones per length")
    p.add_argument("--noise-scale", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a flash-genie checkpoint")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast the denoiser (bf16: half the activation memory, faster on GPUs)")
    p.add_argument("--chunk-size", type=int, default=0,
                   help="rows per chunk of IPA, pair transition and triangle attention (long chains; 0: off)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-evaluate", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_sample)

    p = sub.add_parser("evaluate", help="evaluate sampled structures against real chains")
    p.add_argument("directory", help="folder of sampled PDB/mmCIF or Genie coordinate files")
    p.add_argument("--reference", help="dataset of real chains (default: the built-in set)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation")
    p.add_argument("--mpnn-sequences", type=int, default=1,
                   help="ProteinMPNN designs per structure for the designability proxy mpnn_nll (0: off)")
    p.add_argument("--reference-per-bin", type=int, default=8,
                   help="real chains per 32-residue length bin that holds samples (the reference line)")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of reference chains and the designs")
    p.add_argument("--designability", action="store_true",
                   help="self-consistency with ProteinMPNN + ESMFold (ESMFold installed separately; see the README)")
    p.add_argument("--proteinmpnn-dir",
                   help="ProteinMPNN checkout (or set PROTEINMPNN_DIR; default: the proteinmpnn package)")
    p.add_argument("--device", default="cuda", help="device for ESMFold")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("check-parallel", help="distributed training (DDP, sequence parallelism) against one "
                       "process: outputs and gradients of one training step")
    p.add_argument("--nproc", type=int, default=2, help="local processes, started with torchrun's launcher")
    parallel_check.arguments(p)
    p.add_argument("--timeout", type=float, default=600, help="seconds before the processes are stopped")
    p.set_defaults(run=_check_parallel)

    p = sub.add_parser("plan", help="predict a training step's peak memory per configuration and propose the "
                       "cheapest exact one that fits")
    p.add_argument("--length", type=int, required=True, help="padded chain length L")
    p.add_argument("--batch", type=int, default=1, help="chains per step B")
    p.add_argument("--memory", default="80GiB", help="memory budget, e.g. 80GiB, 24GB")
    p.add_argument("--config", help="Genie-format configuration (default: Genie's defaults, scope_l_128's model)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--chunk-size", type=int, default=64, help="rows per chunk of IPA and the pair transition")
    p.set_defaults(run=_plan)

    p = sub.add_parser("data", help="datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    b = data_sub.add_parser("build", help="build a dataset from structures")
    b.add_argument("src", help="folder of PDB/mmCIF files, a ProMod3 StructureDB, an npz of chains or a Genie data folder")
    b.add_argument("--out", required=True, help="dataset folder to create")
    b.add_argument("--min-length", type=int, default=40)
    b.add_argument("--max-length", type=int, default=1024)
    b.add_argument("--max-gap", type=float, default=4.2, help="Cα–Cα step (Å) that counts as a break; 0 disables")
    b.add_argument("--gap-mode", choices=("split", "drop"), default="split")
    b.add_argument("--dedup", default="exact", help="'exact', 'none' or a sequence identity in [0.8, 1]")
    b.add_argument("--limit", type=int, help="keep a random subset of at most this many chains")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(run=_data_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DatasetError, StructureError, DesignabilityUnavailable, TMalignUnavailable,
            FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"flash-genie {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
