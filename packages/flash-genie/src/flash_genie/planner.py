"""Memory planner: peak memory of a training step per configuration, and the cheapest exact
configuration that fits a budget.

The model counts, per residue pair (``B·N²`` of them), the values each part of the
denoiser keeps for backward and the largest working set of each part's backward, as
the code of :mod:`flash_genie.model` and genie-tk's backends allocates them (the
counts below cite the tensors). A training step's peak is the larger of two moments:

* **structure backward begins**: everything the pair stack kept, the structure
  layers' own saves (IPA's logits and point differences unless chunked or
  checkpointed), the largest IPA backward working set and the pair gradient;
* **the last pair layer's backward** (the later layers are the same, and earlier ones
  keep less): the pair features, every earlier layer's output and, for layers that
  are not checkpointed, their internals; this layer's internals (recomputed if
  checkpointed) and the largest working set among its updates; the incoming gradient.

Plus what does not scale with ``N²``: parameter gradients, the weights and Adam's two
moments (``include_optimizer``), genie-tk's fixed-size attention chunks, per-residue
tensors. The terms were checked against allocations measured with
:class:`flash_genie.memtrack.TensorMemoryTracker` for each option on two architectures
(Genie's, and one with triangle attention and other widths) in float32 and bfloat16
autocast; :func:`flash_genie.memtrack` describes the measurement, ``benchmarks/model_memory.py``
compares predictions with measured peaks.

Element sizes: the pair stream (the residual tensor, its gradient, LayerNorm outputs)
is kept in the parameters' dtype; under bf16/fp16 autocast the other activations (linear
and matmul outputs) take 2 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from flash_genie.model.options import MemoryOptions

GIB = 2**30
_ATT_CHUNK = 1 << 20  # genie-tk's attention chunk: 2**20 logits (torch_backend._CHUNK_ELEMENTS)
_TRIMUL_MIN = 1 << 22  # genie-tk's tri-mul node: rows per chunk hold at least 2**22 values


@dataclass(frozen=True)
class Estimate:
    """Predicted peak of one training step (forward + backward) in bytes, with its parts.

    ``activations`` is the part that a measurement of the step's growth over a process
    that already holds the model and inputs sees (saved activations, working sets,
    parameter gradients); ``peak`` adds the weights and optimizer state when asked for.
    """

    peak: int
    activations: int
    parts: Mapping[str, int] = field(default_factory=dict)
    phase: str = ""
    checkpoint: tuple[int, int] = (0, 0)


def _dim(dims: Mapping[str, object], name: str) -> int:
    return int(dims[name])  # type: ignore[arg-type]


def _layer_terms(dims, opts: MemoryOptions, n: int, batch: int, act: int, stream: int) -> tuple[float, float]:
    """One pair-stack layer: ``(internal, work)``: bytes per pair it keeps for backward
    besides its input and output, and bytes of its largest backward working set."""
    c, ch, t = _dim(dims, "c_p"), _dim(dims, "c_hidden_mul"), _dim(dims, "pair_transition_n")
    ht, dt = _dim(dims, "n_head_tri"), _dim(dims, "c_hidden_tri_att")
    pairs = batch * n * n
    reference = opts.pair_stack_backend == "reference"
    # genie-tk's torch backend runs the plain computation (the reference's memory) on
    # small working sets (torch_backend.plain; the tk/triton kernels are modelled as torch).
    from genie_tk import torch_backend

    big = max(4, stream)
    trimul_plain = reference or pairs * max(2 * ch, c) * big <= torch_backend.PLAIN_BYTES[
        "triangle_multiplicative_update_grad"]
    att_plain = reference or pairs * n * ht * big <= torch_backend.PLAIN_BYTES["triangle_attention_layer"]
    internal = 0.0
    work = []
    if dims["include_mul_update"]:
        # Two residual sums (stream) and, per update, the torch node's contraction x (act);
        # plain autograd (reference) keeps LN_in(z), both projections, their gated product,
        # a and b (permuted copies), x, LN_out(x), the output projection and gate.
        internal += 2 * c * stream
        if trimul_plain:
            internal += 2 * ((3 * c + 8) * stream + 8 * ch * act)
            work.append((4 * ch + 2 * c) * stream * pairs)
        else:
            internal += 2 * ch * act
            # Backward: a, b, d x, d z and a row chunk's temporaries (torch_backend._trimul_backward).
            rows = _trimul_rows(batch, n, c, ch)
            work.append(((3 * ch + c) + rows / n * (16 * ch + 4 * c)) * stream * pairs)
    if dims["include_tri_att"]:
        # Two residual sums; genie-tk keeps the [B, H, N, N] bias and the mask bias per
        # module. The reference keeps the whole [B, N, H, N, N] softmax.
        internal += 2 * c * stream
        if att_plain:
            internal += 2 * ((c + 7 * ht * dt) * act + (ht * n + ht + 1) * stream)
            work.append((2 * ht * n + c) * stream * pairs)
        else:
            internal += 2 * (ht + 1) * stream
            # Backward: d z, the incoming gradient, d bias, and per row chunk four
            # logits-sized buffers plus the chunk's projections and their gradients.
            rows = max(1, min(n, _ATT_CHUNK // max(1, batch * ht * n * n)))
            chunk = (4 * rows * ht * n + rows * 12 * ht * dt) * batch * n * stream
            work.append(3 * c * stream * pairs + chunk)
    if opts.pair_transition_chunk_size is None:
        # LayerNorm output (stream) and the ReLU output (act); backward holds the ReLU
        # output's gradient twice (matmul, threshold) and the masked incoming gradient.
        internal += c * stream + t * c * act
        work.append((2 * t * c * act + c * stream) * pairs)
    else:
        rows = min(n, opts.pair_transition_chunk_size)
        work.append((c * stream + rows / n * (4 * t * c * act + 4 * c * stream)) * pairs)
    return internal, max(work)


def _trimul_rows(batch: int, n: int, c: int, ch: int) -> int:
    """Rows per chunk of genie-tk's tri-mul node (``torch_backend._trimul_rows``)."""
    budget = max(_TRIMUL_MIN, batch * n * n * c // 2)
    return max(1, min(n, budget // max(1, batch * n * (6 * ch + 4 * c))))


def _ipa_terms(dims, opts: MemoryOptions, n: int, batch: int, act: int, stream: int) -> tuple[float, float]:
    """One IPA call: ``(saved, work)``: bytes per pair kept for backward, bytes of its
    backward working set."""
    h, pq, c = _dim(dims, "n_head_ipa"), _dim(dims, "n_qk_point"), _dim(dims, "c_p")
    pairs = batch * n * n
    # Point differences [B, I, J, H, 3·Pq] (global frame: stream dtype), their squared
    # norms, the pair bias, logits and softmax (H each).
    saved = (3 * pq + 5) * h * stream
    work = (6 * pq + 4) * h * stream
    if opts.ipa_chunk_size is None:
        return saved, work * pairs
    rows = min(n, opts.ipa_chunk_size)
    # A chunk's recomputation and backward, plus the gradient of its pair rows (whole [B, N, N, C]).
    return 0.0, (rows / n * (saved + work + 2 * c * act) + c * stream) * pairs


def estimate(
    dims: Mapping[str, object],
    options: MemoryOptions,
    batch: int,
    length: int,
    *,
    dtype: torch.dtype = torch.float32,
    param_dtype: torch.dtype = torch.float32,
    checkpoint: tuple[int, int] | None = None,
    parameters: int = 0,
    include_optimizer: bool = False,
) -> Estimate:
    """Predicted peak memory of one training step of a denoiser with ``dims``.

    Args:
        dims: the architecture (``Denoiser.dims`` or ``Config.model``).
        options: memory options; ``checkpointing="auto"`` is resolved here unless
            ``checkpoint`` gives ``(pair layers, structure layer calls)`` to recompute.
        batch, length: ``B`` chains padded to ``N = length``.
        dtype: the compute dtype (``torch.bfloat16``/``float16`` for autocast).
        param_dtype: the parameters' dtype (the pair stream's).
        parameters: the model's parameter count (their gradients, and with
            ``include_optimizer`` the weights and Adam's two moments, are counted).
        include_optimizer: add the weights and Adam's two moments.
    """
    n_pair = _dim(dims, "n_pair_transform_layer")
    n_struct = _dim(dims, "n_structure_layer") * _dim(dims, "n_structure_block")
    if checkpoint is None:
        if options.checkpointing == "all":
            checkpoint = (n_pair, n_struct)
        elif options.checkpointing == "none":
            checkpoint = (0, 0)
        else:
            budget = options.memory_budget or device_memory(None)
            checkpoint = _fewest_checkpoints(dims, options, batch, length, budget, dtype, param_dtype, parameters)
    k_pair, k_struct = min(checkpoint[0], n_pair), min(checkpoint[1], n_struct)
    stream = torch.finfo(param_dtype).bits // 8
    act = torch.finfo(dtype).bits // 8
    n, c = length, _dim(dims, "c_p")
    pairs = batch * n * n
    internal, layer_work = _layer_terms(dims, options, n, batch, act, stream)
    ipa_saved, ipa_work = _ipa_terms(dims, options, n, batch, act, stream)

    # Pair features: p0 (stream), distances, pair mask, relative-position indices (int64).
    features = (c * stream + 2 * stream + 8) * pairs
    outputs = n_pair * c * stream * pairs  # each layer's output (the next one's input)
    kept_internal = (n_pair - k_pair) * internal * pairs
    struct_saved = (n_struct - k_struct) * ipa_saved * pairs
    grad = c * stream * pairs  # the pair gradient arriving
    struct_phase = features + outputs + kept_internal + struct_saved + ipa_work + grad
    pair_phase = 0.0
    if n_pair:
        earlier = max(0, n_pair - 1 - k_pair) if k_pair < n_pair else 0
        pair_phase = (features + outputs - c * stream * pairs + earlier * internal * pairs
                      + internal * pairs + layer_work + grad)
    top = max(struct_phase, pair_phase)

    p_bytes = torch.finfo(param_dtype).bits // 8
    # Per-residue tensors: single features, frames, IPA projections, and per structure call
    # the concatenated IPA output (H·(C + 4·Pv + c_p) values per residue, kept for linear_out).
    h = _dim(dims, "n_head_ipa")
    width = h * (_dim(dims, "c_hidden_ipa") + 4 * _dim(dims, "n_v_point") + c) + 8 * _dim(dims, "c_s")
    fixed = {"parameter gradients": parameters * p_bytes,
             "per-residue tensors": batch * n * (n_struct + 2) * width * stream}
    activations = int(top + sum(fixed.values()))
    parts = {
        "pair features and layer outputs": int(features + outputs),
        "pair-layer internals kept": int(kept_internal),
        "structure saves": int(struct_saved),
        "largest backward working set": int(top - features - outputs - kept_internal - struct_saved),
        **fixed,
    }
    peak = activations
    if include_optimizer:
        parts["weights and Adam moments"] = 3 * parameters * p_bytes
        peak += parts["weights and Adam moments"]
    phase = "structure backward" if struct_phase >= pair_phase else "last pair layer's backward"
    return Estimate(peak, activations, parts, phase, (k_pair, k_struct))


def _fewest_checkpoints(dims, options, batch, length, budget, dtype, param_dtype, parameters) -> tuple[int, int]:
    """The fewest checkpointed layers (pair layers first: they hold the most) whose
    predicted peak, weights and optimizer state included, fits ``budget``; everything
    checkpointed if nothing fits."""
    n_pair = _dim(dims, "n_pair_transform_layer")
    n_struct = _dim(dims, "n_structure_layer") * _dim(dims, "n_structure_block")
    for plan in [(k, 0) for k in range(n_pair + 1)] + [(n_pair, k) for k in range(1, n_struct + 1)]:
        e = estimate(dims, options, batch, length, dtype=dtype, param_dtype=param_dtype, checkpoint=plan,
                     parameters=parameters, include_optimizer=True)
        if e.peak <= budget:
            return plan
    return n_pair, n_struct


_POLICY_CACHE: dict[tuple, tuple[int, int]] = {}


def checkpoint_policy(dims, options: MemoryOptions, batch: int, length: int, *,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                      parameters: int = 0) -> tuple[int, int]:
    """``(pair layers, structure layer calls)`` to checkpoint for a batch shape under the
    ``auto`` policy: the fewest that fit ``options.memory_budget`` (default: what
    ``device`` has). Cached per shape."""
    budget = options.memory_budget or device_memory(device)
    key = (tuple(sorted(dims.items())), replace(options, memory_budget=budget), batch, length, dtype, parameters)
    if key not in _POLICY_CACHE:
        _POLICY_CACHE[key] = _fewest_checkpoints(dims, options, batch, length, budget, dtype, torch.float32,
                                                 parameters)
    return _POLICY_CACHE[key]


def device_memory(device: torch.device | str | None) -> int:
    """Bytes a step may use: the GPU's total memory, or the memory the system has
    available for a CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GIB


def format_bytes(n: float) -> str:
    """``1.23 GiB``-style text."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def step_flops(dims: Mapping[str, object], options: MemoryOptions, batch: int, length: int,
               checkpoint: tuple[int, int] = (0, 0)) -> float:
    """Approximate FLOPs of one training step (forward, backward as twice the forward,
    and every recomputation the options imply): the planner's measure of cost."""
    n, c, ch, t = length, _dim(dims, "c_p"), _dim(dims, "c_hidden_mul"), _dim(dims, "pair_transition_n")
    ht, dt = _dim(dims, "n_head_tri"), _dim(dims, "c_hidden_tri_att")
    h, ci = _dim(dims, "n_head_ipa"), _dim(dims, "c_hidden_ipa")
    pq, pv = _dim(dims, "n_qk_point"), _dim(dims, "n_v_point")
    pairs = batch * n * n
    projections = 2 * pairs * c * 4 * ch
    trimul = projections + 2 * pairs * n * ch + 2 * pairs * ch * c + 2 * pairs * c * c
    attention = 2 * pairs * c * (4 * ht * dt + ht) + 4 * pairs * n * ht * dt + 2 * pairs * ht * dt * c
    transition = 4 * pairs * t * c * c
    layer = transition + (2 * trimul if dims["include_mul_update"] else 0) + (
        2 * attention if dims["include_tri_att"] else 0)
    ipa = 2 * pairs * h * (2 * ci + 3 * pq + 3 * pv + c)
    n_pair = _dim(dims, "n_pair_transform_layer")
    n_struct = _dim(dims, "n_structure_layer") * _dim(dims, "n_structure_block")
    total = 3 * (n_pair * layer + n_struct * ipa)
    recompute = 0.0
    if options.pair_stack_backend != "reference":
        # genie-tk's nodes recompute the tri-mul projections and the attention in backward
        recompute += n_pair * ((2 * projections if dims["include_mul_update"] else 0)
                               + (2 * attention if dims["include_tri_att"] else 0))
    if options.pair_transition_chunk_size is not None:
        recompute += n_pair * transition
    if options.ipa_chunk_size is not None:
        recompute += n_struct * ipa
    recompute += checkpoint[0] * layer + checkpoint[1] * ipa
    return total + recompute


@dataclass(frozen=True)
class Candidate:
    """One configuration of :func:`plan`: its options, precision, predicted peak (weights
    and optimizer state included), compute relative to flash-genie's default
    (``cost``; ``None`` for the reference backend, which is the oracle, not a fast path)."""

    name: str
    options: MemoryOptions
    precision: str
    estimate: Estimate
    cost: float | None
    fits: bool
    budget: int

    def config_keys(self) -> dict[str, object]:
        """Config keys (file names) that select this configuration."""
        keys = {**self.options.to_config(), "precision": self.precision}
        del keys["memoryBudget"]
        if any(self.estimate.checkpoint):
            keys["activationCheckpointing"] = "auto"
            keys["memoryBudget"] = self.budget
        return keys


def plan(dims: Mapping[str, object], parameters: int, length: int, batch: int, budget: int, *,
         precision: str = "bf16", chunk_size: int = 64) -> tuple[list[Candidate], Candidate | None]:
    """Configurations from everything off to everything on, each with its predicted peak
    (weights, gradients and Adam state included); returns them and the first (cheapest)
    flash-genie configuration that fits ``budget``.

    Rows: Genie's own (everything off: genie-tk's plain ``reference`` backend, float32) and
    the same in ``precision``; then flash-genie's default pair stack (genie-tk's ``auto``
    backend: its ``tk`` kernels where they run, its memory-efficient ``torch`` backend
    elsewhere; both keep the same for backward) with in-place residuals; then, in order of
    extra compute, IPA in chunks, the pair transition in chunks, and checkpointed pair
    layers one more at a time. ``precision`` is ``fp32``, ``bf16`` or ``fp16``.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n_pair = _dim(dims, "n_pair_transform_layer")
    off = MemoryOptions(pair_stack_backend="reference")
    default = MemoryOptions(inplace=True)
    ipa = replace(default, ipa_chunk_size=chunk_size)
    chunks = replace(ipa, pair_transition_chunk_size=chunk_size)
    ladder = [("Genie: everything off, fp32", off, "fp32", (0, 0))]
    if precision != "fp32":
        ladder.append((f"everything off, {precision}", off, precision, (0, 0)))
    ladder += [
        ("flash-genie pair stack, in-place residuals", default, precision, (0, 0)),
        (f"+ IPA in chunks of {chunk_size} rows", ipa, precision, (0, 0)),
        (f"+ pair transition in chunks of {chunk_size} rows", chunks, precision, (0, 0)),
    ]
    ladder += [(f"+ checkpoint {k} of {n_pair} pair layers", chunks, precision, (k, 0)) for k in range(1, n_pair + 1)]
    base = step_flops(dims, default, batch, length)
    candidates: list[Candidate] = []
    for name, options, prec, ckpt in ladder:
        e = estimate(dims, options, batch, length, dtype=dtype if prec == precision else torch.float32,
                     checkpoint=ckpt, parameters=parameters, include_optimizer=True)
        if ckpt[0] and e.peak >= candidates[-1].estimate.peak:
            continue  # checkpointing the last layer too saves nothing: its backward is the peak
        cost = None if options is off else step_flops(dims, options, batch, length, ckpt) / base
        candidates.append(Candidate(name, options, prec, e, cost, e.peak <= budget, budget))
    chosen = next((c for c in candidates if c.cost is not None and c.fits), None)
    return candidates, chosen


def format_plan(candidates: list[Candidate], chosen: Candidate | None, length: int, batch: int,
                budget: int) -> str:
    """The table ``flash-genie plan`` prints."""
    lines = [f"training step at B={batch}, L={length}; budget {format_bytes(budget)} "
             "(weights, gradients and Adam state included)",
             "", f"{'configuration':52s} {'peak':>12s}  {'fits':4s}  {'compute':>7s}"]
    for c in candidates:
        cost = "-" if c.cost is None else f"{c.cost:.2f}x"
        lines.append(f"{c.name:52s} {format_bytes(c.estimate.peak):>12s}  {'yes' if c.fits else 'no':4s}  {cost:>7s}")
    lines += ["", "compute: FLOPs of the step, recomputation included, relative to flash-genie's pair stack", ""]
    if chosen is None:
        lines.append("nothing fits: reduce the batch or the length, or spread the step over GPUs "
                     "(sequence parallelism, flash_genie.parallel)")
        return "\n".join(lines)
    lines.append(f"proposed: {chosen.name} ({format_bytes(chosen.estimate.peak)}; the peak comes during the "
                 f"{chosen.estimate.phase})")
    lines.append("config keys:")
    lines += [f"  {k} {v}" for k, v in chosen.config_keys().items()]
    lines.append("where it goes: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in chosen.estimate.parts.items()))
    return "\n".join(lines)
