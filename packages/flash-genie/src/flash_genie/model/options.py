"""Memory options of the denoiser: how it runs, never what it computes.

Every option is exact: the outputs and gradients are those of the plain model (the
tests compare them in float64). They trade memory for recomputation:

* ``pair_stack_backend``: genie-tk backend of the triangle modules (``None``: genie-tk's
  choice, ``GENIE_TK_BACKEND`` or ``auto``). ``torch`` trains with one autograd node per
  triangle module that keeps its input (and the tri-mul contraction) only; ``reference``
  is plain autograd, Genie's own memory profile.
* ``checkpointing``: ``none``, ``all`` (every pair-stack layer and structure layer is
  recomputed in backward) or ``auto`` (the fewest layers that let the step fit
  ``memory_budget``, chosen per batch shape by :func:`flash_genie.planner.checkpoint_policy`).
* ``ipa_chunk_size``: IPA in chunks of query rows, recomputed in backward, so it never
  holds more than ``chunk · N`` pair logits and point differences (``[B, chunk, N, H, 3·Pq]``:
  with Genie's ``Pq = 4``, 12 values per pair and head, more than the pair tensor's 128 per
  pair at 12 heads). ``"auto"``: rows chosen per call for a fixed-size block
  (:func:`~flash_genie.model.chunking.resolve_chunk`).
* ``sparse_chunk_size``: rows per chunk of the sparse mode's ``k²``-sized operations
  (triangle multiplication and attention on the neighbour graph, IPA over the neighbours);
  ``"auto"`` (the default) picks them for a fixed-size block. The sparse operations are plain
  PyTorch on the graph: ``pair_stack_backend`` does not apply to them; their pair transition
  is chunked by ``pair_transition_chunk_size``, like the dense one.
* ``pair_transition_chunk_size``: the pair transition in chunks of rows, recomputed in
  backward (its hidden layer is 4× the pair width).
* ``triangle_attention_chunk_size``: rows per chunk of genie-tk's attention (``None``:
  genie-tk's automatic size).
* ``inplace`` (dense pairs): residual updates are added into the freshly computed update tensor
  rather than into a third one, and the pair mask is applied in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from flash_genie.config import Config

CHECKPOINTING = ("none", "auto", "all")
PAIR_BACKENDS = ("torch", "reference", "tk")


@dataclass(frozen=True)
class MemoryOptions:
    """See the module docstring. The defaults are the plain model."""

    pair_stack_backend: str | None = None
    checkpointing: str = "none"
    memory_budget: int | None = None  # bytes; None: what the device has
    ipa_chunk_size: int | str | None = None  # rows, "auto" or None
    pair_transition_chunk_size: int | None = None
    triangle_attention_chunk_size: int | None = None
    inplace: bool = False
    sparse_chunk_size: int | str = "auto"

    def __post_init__(self):
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.pair_stack_backend is not None and self.pair_stack_backend not in PAIR_BACKENDS:
            raise ValueError(f"pair_stack_backend must be None or one of {PAIR_BACKENDS}, "
                             f"got {self.pair_stack_backend!r}")
        for name in ("ipa_chunk_size", "pair_transition_chunk_size", "triangle_attention_chunk_size",
                     "sparse_chunk_size"):
            value = getattr(self, name)
            auto = name in ("ipa_chunk_size", "sparse_chunk_size")
            if value is None and name == "sparse_chunk_size":
                raise ValueError("sparse_chunk_size must be >= 1 or 'auto', got None")
            if value is not None and not (auto and value == "auto") and (not isinstance(value, int) or value < 1):
                expected = "None, 'auto' or an integer >= 1" if auto else "None or an integer >= 1"
                raise ValueError(f"{name} must be {expected}, got {value!r}")

    @classmethod
    def from_config(cls, config: Config) -> MemoryOptions:
        """The ``memory`` section of a config (0 means off / automatic)."""
        m = config.memory
        return cls(
            pair_stack_backend=None if m["pair_stack_backend"] == "auto" else m["pair_stack_backend"],
            checkpointing=m["checkpointing"],
            memory_budget=m["memory_budget"] or None,
            ipa_chunk_size=m["ipa_chunk_size"] or None,
            pair_transition_chunk_size=m["pair_transition_chunk_size"] or None,
            triangle_attention_chunk_size=m["triangle_attention_chunk_size"] or None,
            inplace=m["inplace"],
            sparse_chunk_size=m["sparse_chunk_size"] or "auto",
        )

    def for_approximate_pairs(self, explicit: Iterable[str] = ()) -> MemoryOptions:
        """The options an approximate pair mode (factorized, sparse or both) runs with: IPA in
        ``auto`` chunks and every layer checkpointed, each unless its config key is in
        ``explicit`` (the keys the user set; the planner does not model these modes, so
        ``activationCheckpointing auto`` also checkpoints every layer in them). Without chunked IPA its
        ``[B, N, N, H, 3·Pq]`` point differences make the step quadratic; without
        checkpointing the step is linear but each layer keeps its internals (``O(r²·C)``
        values per residue in the factorized layer, ``O(k·C)`` several times over in the sparse
        one), several times the checkpointed peak."""
        changes = {}
        if "ipaChunkSize" not in explicit and self.ipa_chunk_size is None:
            changes["ipa_chunk_size"] = "auto"
        if "activationCheckpointing" not in explicit and self.checkpointing == "none":
            changes["checkpointing"] = "all"
        return replace(self, **changes)

    @classmethod
    def long_sequence(cls, **changes) -> MemoryOptions:
        """flash-genie's long-sequence configuration: genie-tk's memory-efficient
        backend, chunked IPA and pair transition, in-place residuals, adaptive
        checkpointing (``changes`` override any field)."""
        base = cls(pair_stack_backend="torch", checkpointing="auto", ipa_chunk_size=32,
                   pair_transition_chunk_size=32, inplace=True)
        return replace(base, **changes)

    def to_config(self) -> dict[str, object]:
        """The ``memory`` keys (file names) that reproduce these options."""
        return {
            "pairStackBackend": self.pair_stack_backend or "auto",
            "activationCheckpointing": self.checkpointing,
            "memoryBudget": self.memory_budget or 0,
            "ipaChunkSize": self.ipa_chunk_size or 0,
            "pairTransitionChunkSize": self.pair_transition_chunk_size or 0,
            "triangleAttentionChunkSize": self.triangle_attention_chunk_size or 0,
            "inplaceResidual": self.inplace,
            **({} if self.sparse_chunk_size == "auto" else {"sparseChunkSize": self.sparse_chunk_size}),
        }
