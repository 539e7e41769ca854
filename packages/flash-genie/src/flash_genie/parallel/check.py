"""``flash-genie check-parallel``: distributed training here against one process.

:func:`launch` starts ``python -m torch.distributed.run --standalone --nproc-per-node N -m
flash_genie.parallel.check ...`` (torchrun's own launcher, a free local port); each process
then runs :func:`main`, which builds a small model with dropout on, identical on every rank,
and compares, in the chosen dtype:

* ``pair stack``: the sequence-parallel pair stack against :class:`PairTransformNet`;
* ``structure (IPA)``: the sequence-parallel structure net against :class:`StructureNet`;
* ``training step``: ``accumulate`` micro-batches per data rank through DDP over all ranks
  (``no_sync`` on all but the last) against one process accumulating every rank's
  micro-batches. After the first micro-batch it also checks that DDP sent nothing and that the
  gradients are still this data rank's own.

Each figure is a maximum over ranks of ``max|parallel - single| / max|single|``: for the
outputs per tensor, for the gradients over all parameters' gradients taken as one vector
(and per input). The exit status is 1 when one exceeds the tolerance (default 1e-9 in
float64, 1e-5 in float32), 0 otherwise.
Started under ``torchrun`` by hand, the module runs over any rendezvous, several nodes
included: ``torchrun --nnodes 2 --nproc-per-node 8 ... -m flash_genie.parallel.check --sp 8``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from flash_genie.config import Config
from flash_genie.diffusion import genie_loss, make_schedule, q_sample
from flash_genie.model import Denoiser, Rigid
from flash_genie.model.rigid import quaternion_to_rotation
from flash_genie.parallel.comm import SequenceShard
from flash_genie.parallel.grid import ProcessGrid, init_distributed, resolve_backend
from flash_genie.parallel.model import NoisePredictor
from flash_genie.parallel.pair_stack import pair_stack
from flash_genie.parallel.structure import structure_net

DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOLERANCE = {"float64": 1e-9, "float32": 1e-5}

# Small, with every part of the model on: two pair layers with triangle attention, two
# structure blocks (weights reused), Genie's dropout rates.
MODEL = """\
singleFeatureDimension 16
pairFeatureDimension 8
positionalEmbeddingDimension 8
timestepEmbeddingDimension 8
relativePositionK 4
numPairTransformLayers 2
includeTriangularAttention True
triangularMultiplicativeHiddenDimension 6
triangularAttentionHiddenDimension 4
triangularAttentionNumHeads 2
pairTransitionN 2
numStructureLayers 2
numStructureBlocks 2
ipaHiddenDimension 4
ipaNumHeads 2
ipaNumQkPoints 2
ipaNumVPoints 3
numTimesteps 100
"""


def _max_abs(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (the plain difference where ``expected`` is 0)."""
    diff = _max_abs(actual.detach() - expected.detach())
    scale = _max_abs(expected)
    return diff / scale if scale > 0 else diff


def _worst(pairs) -> float:
    """``max|actual - expected| / max|expected|`` over a set of gradients taken as one vector.

    Per tensor the ratio can be meaningless: the gradient of a bias added to every logit of a
    softmax row is zero up to rounding.
    """
    pairs = list(pairs)
    scale = max((_max_abs(e) for _, e in pairs), default=0.0)
    diff = max((_max_abs(a.detach() - e) for a, e in pairs), default=0.0)
    return diff / scale if scale > 0 else diff
def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def _model(dtype: torch.dtype, device: torch.device, seed: int) -> Denoiser:
    """The check's model: Genie's initialisation, then every weight moved off its initial
    value, so zero-initialised output layers and gates do not make the comparison trivial."""
    torch.manual_seed(seed)
    model = Denoiser.from_config(Config.from_text(MODEL)).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.train()


def _mask(batch: int, length: int, device) -> torch.Tensor:
    """Prefix masks: chain ``b`` has ``length - 3b`` residues (at least 3), so padding is tested."""
    lengths = torch.tensor([max(3, length - 3 * b) for b in range(batch)], device=device)
    return (torch.arange(length, device=device)[None] < lengths[:, None]).float()


def _chains(batch: int, length: int, dtype, device, generator) -> torch.Tensor:
    """Random-walk Cα traces with 3.8 Å steps, centred: ``[B, N, 3]``."""
    steps = torch.randn(batch, length, 3, generator=generator, dtype=dtype)
    x = torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=1)
    return (x - x.mean(dim=1, keepdim=True)).to(device)


def _sum_over(tensors, group) -> None:
    """Sum each tensor over ``group`` in place (nothing to do without one)."""
    if group is None:
        return
    for t in tensors:
        dist.all_reduce(t, group=group)


def check_pair_stack(model: Denoiser, shard: SequenceShard, batch: int, seed: int) -> tuple[float, float]:
    """Outputs and gradients (parameters, input) of the pair stack, split over ``shard``."""
    net = model.pair_transform_net
    param = next(net.parameters())
    g = torch.Generator().manual_seed(seed)
    c_p, n = net.net[0].pair_transition.layer_norm.normalized_shape[0], shard.n
    p = torch.randn(batch, n, n, c_p, generator=g, dtype=param.dtype).to(param.device)
    weight = torch.randn(p.shape, generator=g, dtype=param.dtype).to(param.device)
    mask1 = _mask(batch, n, param.device).to(param.dtype)
    pair_mask = mask1[:, :, None] * mask1[:, None, :]

    net.zero_grad()
    p_ref = p.clone().requires_grad_()
    torch.manual_seed(seed + 1)
    out_ref = net(p_ref, pair_mask)
    (out_ref * weight).sum().backward()
    ref_grads = _grads(net)

    net.zero_grad()
    rows = shard.rows
    p_rows = p[:, rows].clone().requires_grad_()
    torch.manual_seed(seed + 1)
    out = pair_stack(net, p_rows, pair_mask[:, rows], shard)
    (out * weight[:, rows]).sum().backward()  # the ranks' losses add up to the single-process one
    grads = _grads(net)
    _sum_over(grads.values(), shard.group)
    outputs = relative_difference(out, out_ref[:, rows])
    gradients = max(_worst((grads[k], ref_grads[k]) for k in grads),
                    relative_difference(p_rows.grad, p_ref.grad[:, rows]))
    return outputs, gradients


def _random_frames(batch: int, n: int, dtype, device, generator) -> Rigid:
    """Random rotations at the residues of a random chain (points far apart would leave the
    IPA's point term saturated and its gradients at rounding level)."""
    quat = torch.randn(batch, n, 4, generator=generator, dtype=dtype)
    rots = quaternion_to_rotation(quat / quat.norm(dim=-1, keepdim=True))
    return Rigid(rots.to(device), _chains(batch, n, dtype, device, generator))


def check_structure(model: Denoiser, shard: SequenceShard, batch: int, seed: int) -> tuple[float, float]:
    """Outputs (frames) and gradients (parameters, inputs) of the structure net (IPA), split."""
    net = model.structure_net
    param = next(net.parameters())
    dtype, device, n = param.dtype, param.device, shard.n
    ipa = net.net[0].ipa
    c_s, c_p = ipa.linear_q.in_features, ipa.linear_b.in_features
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, n, c_s, generator=g, dtype=dtype).to(device)
    p = torch.randn(batch, n, n, c_p, generator=g, dtype=dtype).to(device)
    frames = _random_frames(batch, n, dtype, device, g)
    w_rots = torch.randn(frames.rots.shape, generator=g, dtype=dtype).to(device)
    w_trans = torch.randn(frames.trans.shape, generator=g, dtype=dtype).to(device)
    mask = _mask(batch, n, device).to(dtype)

    def loss(out: Rigid, rows=slice(None)):
        return (out.rots * w_rots[:, rows]).sum() + (out.trans * w_trans[:, rows]).sum()

    net.zero_grad()
    s_ref, p_ref = s.clone().requires_grad_(), p.clone().requires_grad_()
    torch.manual_seed(seed + 1)
    out_ref = net(s_ref, p_ref, frames, mask)
    loss(out_ref).backward()
    ref_grads = _grads(net)

    net.zero_grad()
    rows = shard.rows
    s_rows, p_rows = s[:, rows].clone().requires_grad_(), p[:, rows].clone().requires_grad_()
    local = Rigid(frames.rots[:, rows], frames.trans[:, rows])
    torch.manual_seed(seed + 1)
    out = structure_net(net, s_rows, p_rows, local, mask, shard)
    loss(out, rows).backward()
    grads = _grads(net)
    _sum_over(grads.values(), shard.group)
    outputs = max(relative_difference(out.rots, out_ref.rots[:, rows]),
                  relative_difference(out.trans, out_ref.trans[:, rows]))
    gradients = max(_worst((grads[k], ref_grads[k]) for k in grads),
                    relative_difference(s_rows.grad, s_ref.grad[:, rows]),
                    relative_difference(p_rows.grad, p_ref.grad[:, rows]))
    return outputs, gradients


class _Calls:
    count = 0


def _counting_allreduce(calls: _Calls, bucket):
    """A DDP communication hook: count the call, then all-reduce as DDP does by default."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls.count += 1
    return allreduce_hook(None, bucket)


def check_training_step(model: Denoiser, grid: ProcessGrid, length: int, batch: int, accumulate: int,
                        seed: int) -> tuple[float, float, str]:
    """One optimizer step's gradients with DDP (and sequence parallelism) against one process.

    Returns ``(outputs, gradients, note)``; ``note`` is empty unless the accumulation
    micro-steps misbehaved (DDP communicated, or the gradients were not this rank's own).
    """
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    schedule = make_schedule(model.n_timestep, "cosine", dtype=dtype, device=device)

    def micro_batch(data_rank: int, step: int):
        g = torch.Generator().manual_seed(seed + 1000 * data_rank + step)
        x0 = _chains(batch, length, dtype, device, g)
        mask = _mask(batch, length, device).to(dtype)
        timesteps = torch.randint(0, model.n_timestep, (batch,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g, dtype=dtype).to(device)
        xt, noise = q_sample(x0, timesteps, mask, schedule, noise=noise)
        return xt, timesteps, mask, noise

    def run(predict, data_rank: int, step: int, scale: float):
        xt, timesteps, mask, noise = micro_batch(data_rank, step)
        torch.manual_seed(seed + 7919 * data_rank + step)  # dropout: one stream per micro-batch
        eps = predict(xt, timesteps, mask)
        loss = genie_loss(eps, noise, mask)
        (loss * scale).backward()
        return eps.detach(), loss.detach()

    # One process: this data rank's first micro-batch alone, then every micro-batch of the step.
    model.zero_grad()
    run(model.predict_noise, grid.data_rank, 0, 1 / accumulate)
    first_grads = _grads(model)
    model.zero_grad()
    ref_out = {}
    for d in range(grid.dp):
        for m in range(accumulate):
            ref_out[d, m] = run(model.predict_noise, d, m, 1 / (accumulate * grid.dp))
    ref_grads = _grads(model)

    # Distributed: DDP over all ranks averages the data ranks' gradients and the sequence
    # ranks' shares in one all-reduce.
    model.zero_grad()
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(NoisePredictor(model, grid.seq_group), device_ids=device_ids)
    calls = _Calls()
    ddp.register_comm_hook(calls, _counting_allreduce)
    outputs = gradients = 0.0
    note = ""
    for m in range(accumulate):
        sync = m == accumulate - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            eps, loss = run(ddp, grid.data_rank, m, 1 / accumulate)
        ref_eps, ref_loss = ref_out[grid.data_rank, m]
        outputs = max(outputs, relative_difference(eps, ref_eps), relative_difference(loss, ref_loss))
        if m == 0 and not sync:
            # Nothing sent, and the gradients are this data rank's own (its sequence ranks'
            # shares summed here by hand), not yet averaged with the other data ranks'.
            if calls.count:
                note = f"DDP communicated {calls.count} times during an accumulation micro-step"
            own = _grads(model)
            _sum_over(own.values(), grid.seq_group)
            gradients = _worst((v / grid.sp, first_grads[k]) for k, v in own.items())
    if not calls.count:
        note = note or "DDP never all-reduced"
    gradients = max(gradients, _worst((v, ref_grads[k]) for k, v in _grads(model).items()))
    return outputs, gradients, note


def arguments(parser: argparse.ArgumentParser) -> None:
    """The options :func:`main` and ``flash-genie check-parallel`` share."""
    parser.add_argument("--sp", type=int, help="sequence-parallel size (default: all processes)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: nccl on GPUs, gloo on CPUs")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float64")
    parser.add_argument("--length", type=int, default=21, help="residues (odd by default: uneven blocks)")
    parser.add_argument("--batch", type=int, default=2, help="chains per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per data rank")
    parser.add_argument("--tolerance", type=float, help="largest relative difference accepted "
                        "(default 1e-9 in float64, 1e-5 in float32)")
    parser.add_argument("--seed", type=int, default=0)


def _device(backend: str) -> torch.device:
    if backend == "nccl" or (backend == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    """The per-process check (run under torchrun); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m flash_genie.parallel.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(parser)
    args = parser.parse_args(argv)
    device = _device(args.backend)
    backend = resolve_backend(args.backend, device)
    init_distributed(backend, timeout_s=300)
    try:
        grid = ProcessGrid.create(args.sp or dist.get_world_size())
        shard = SequenceShard.of(args.length, grid.seq_group)
        model = _model(DTYPES[args.dtype], device, args.seed)
        results = {
            "pair stack": check_pair_stack(model, shard, args.batch, args.seed),
            "structure (IPA)": check_structure(model, shard, args.batch, args.seed),
        }
        *step, note = check_training_step(model, grid, args.length, args.batch, args.accumulate, args.seed)
        results["training step"] = tuple(step)
        worst = torch.tensor([v for pair in results.values() for v in pair], dtype=torch.float64)
        failed = torch.tensor([1.0 if note else 0.0], dtype=torch.float64)
        if backend == "nccl":
            worst, failed = worst.to(device), failed.to(device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        tolerance = TOLERANCE[args.dtype] if args.tolerance is None else args.tolerance
        ok = bool(worst.max() <= tolerance) and not failed.item()
        if grid.rank == 0:
            sizes = "+".join(map(str, shard.sizes))
            print(f"flash-genie check-parallel: {grid.describe()}, {backend}, {args.dtype}, "
                  f"{args.length} residues (rows {sizes}), batch {args.batch}, "
                  f"{args.accumulate} micro-batches per data rank", flush=True)
            print(f"{'check':<18} {'outputs':>12} {'gradients':>12}   (max relative difference)")
            values = worst.tolist()
            for i, name in enumerate(results):
                print(f"{name:<18} {values[2 * i]:>12.3e} {values[2 * i + 1]:>12.3e}")
            if note:
                print(f"accumulation: {note}")
            verdict = "OK" if ok else "FAILED"
            print(f"tolerance {tolerance:.0e}: {verdict}", flush=True)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


def launch(nproc: int, args: argparse.Namespace, timeout_s: float | None = None) -> int:
    """Run :func:`main` with the options of :func:`arguments` in ``args`` in ``nproc`` local
    processes, with torchrun's launcher (a free local port). Returns their exit status
    (``124`` after ``timeout_s`` seconds, when the processes are stopped).

    Raises ``ValueError`` for a layout that cannot work (``sp`` not dividing ``nproc``...).
    """
    sp = nproc if args.sp is None else args.sp
    if nproc < 1 or sp < 1 or nproc % sp:
        raise ValueError(f"--sp {sp} must divide --nproc {nproc} (both >= 1)")
    if args.length < sp:
        raise ValueError(f"--length {args.length} leaves a sequence rank without residues (--sp {sp})")
    if args.tolerance is not None and args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}")
    worker = [f"--sp={sp}"]
    for name in ("backend", "dtype", "length", "batch", "accumulate", "tolerance", "seed"):
        if getattr(args, name) is not None:
            worker.append(f"--{name}={getattr(args, name)}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "flash_genie.parallel.check", *worker]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124


if __name__ == "__main__":
    sys.exit(main())
