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
  holds more than ``chunk · N`` pair logits.
* ``pair_transition_chunk_size``: the pair transition in chunks of rows, recomputed in
  backward (its hidden layer is 4× the pair width).
* ``triangle_attention_chunk_size``: rows per chunk of genie-tk's attention (``None``:
  genie-tk's automatic size).
* ``inplace``: residual updates are added into the freshly computed update tensor
  rather than into a third one, and the pair mask is applied in place.
"""

from __future__ import annotations

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
    ipa_chunk_size: int | None = None
    pair_transition_chunk_size: int | None = None
    triangle_attention_chunk_size: int | None = None
    inplace: bool = False

    def __post_init__(self):
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.pair_stack_backend is not None and self.pair_stack_backend not in PAIR_BACKENDS:
            raise ValueError(f"pair_stack_backend must be None or one of {PAIR_BACKENDS}, "
                             f"got {self.pair_stack_backend!r}")
        for name in ("ipa_chunk_size", "pair_transition_chunk_size", "triangle_attention_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")

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
        )

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
        }
