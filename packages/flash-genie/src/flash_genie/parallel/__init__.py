"""Distributed training on ``torch.distributed``: data parallelism (DDP), sequence
parallelism for the pair stack and the structure net, and the check that they are exact.

Processes are started by ``torchrun`` (one node or several); :func:`init_distributed` reads
its environment. The ``world = data × sequence`` ranks form a :class:`ProcessGrid`: the
ranks of a sequence group see the same batch and split its residues, the data ranks see
different batches.

Sequence parallelism (FastFold's Dynamic Axial Parallelism): each rank of a sequence group
holds a block of rows of the ``[B, N, N, C]`` pair tensor, ``[B, N/sp, N, C]``; the
operations that need the other axis switch to rows of the transpose with one all-to-all
(:mod:`flash_genie.parallel.pair_stack`), and the structure net splits its query residues
(:mod:`flash_genie.parallel.structure`). ``N`` need not be a multiple of ``sp``: blocks are
uneven (:func:`split_sizes`), nothing is padded.

Gradients: every collective has its adjoint as backward (:mod:`flash_genie.parallel.comm`),
so each rank's gradient of a shared weight is its share; averaging over all ranks (which
DDP over the default group does) sums the sequence ranks' shares of a replica's loss and
averages the data replicas at once. A sequence-parallel step then has the single-process
step's outputs and gradients (``flash-genie check-parallel`` measures both).
"""

from flash_genie.parallel.comm import (
    SequenceShard,
    all_reduce_sum,
    gather_rows,
    row_gathered_product,
    split_sizes,
    transpose_rows,
)
from flash_genie.parallel.grid import ProcessGrid, init_distributed, resolve_backend
from flash_genie.parallel.model import NoisePredictor, sequence_parallel_forward
from flash_genie.parallel.pair_stack import pair_stack
from flash_genie.parallel.structure import structure_net

__all__ = [
    "NoisePredictor",
    "ProcessGrid",
    "SequenceShard",
    "all_reduce_sum",
    "gather_rows",
    "init_distributed",
    "pair_stack",
    "resolve_backend",
    "row_gathered_product",
    "sequence_parallel_forward",
    "split_sizes",
    "structure_net",
    "transpose_rows",
]
