"""Collectives with autograd for sequence parallelism, over one process group.

The residues ``0..N-1`` are split over the ``W`` ranks of a group in contiguous, possibly
uneven blocks (:class:`SequenceShard`): the first ``N mod W`` ranks hold one row more. Every
collective here takes the shard, so uneven blocks need no padding of the model's tensors
(the communication buffers are flat and sized per peer), and every one is an
``autograd.Function`` whose backward is the adjoint collective:

* :func:`gather_rows`: all-gather of the row blocks; backward: reduce-scatter (sum).
* :func:`transpose_rows`: rows of ``z`` -> rows of ``zᵀ`` (one all-to-all); backward: the same.
* :func:`all_reduce_sum`: all-reduce (sum); backward: all-reduce (sum).
* :func:`row_gathered_product`: ``x_ij = Σ_k l_ik r_jk`` with the row blocks of ``r``
  broadcast one at a time; backward: broadcast again, and reduce each block's gradient (sum)
  to its owner.

Gradient convention: a gradient that reaches a tensor shared by the group (a weight, or an
input every rank holds whole) is this rank's share of it; the group's sum of the shares is
the gradient. A loss computed from gathered values is computed by every rank, so the sum
counts it ``W`` times: average over the group instead (DDP over all ranks does exactly that).

All collectives go through ``all_to_all_single``, ``broadcast``, ``reduce`` and
``all_reduce``, which gloo (CPU) and NCCL (GPU) both implement for uneven splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd import Function

__all__ = [
    "SequenceShard",
    "all_reduce_sum",
    "gather_rows",
    "row_gathered_product",
    "split_sizes",
    "transpose_rows",
]


def split_sizes(n: int, parts: int) -> list[int]:
    """Rows per rank when ``n`` rows are split over ``parts`` ranks: the first ``n mod parts``
    ranks get one more (``torch.tensor_split``'s rule)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(n, parts)
    return [base + (r < extra) for r in range(parts)]


@dataclass(frozen=True)
class SequenceShard:
    """How ``n`` residues are split over a process ``group``; this process is ``rank`` in it.

    ``group=None`` with ``world == 1`` is the trivial shard (everything local, no
    communication), which makes every function here the identity or its plain local form.
    """

    n: int
    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank {self.rank}, world {self.world}")
        if self.n < self.world:
            raise ValueError(f"cannot split {self.n} residues over {self.world} ranks: "
                             f"sequence parallelism needs at least one residue per rank")

    @classmethod
    def of(cls, n: int, group: dist.ProcessGroup | None) -> SequenceShard:
        """The shard of this process in ``group`` (``None``: the trivial shard)."""
        if group is None:
            return cls(n)
        return cls(n, dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def sizes(self) -> list[int]:
        return split_sizes(self.n, self.world)

    @property
    def offsets(self) -> list[int]:
        sizes = self.sizes
        return [sum(sizes[:r]) for r in range(self.world)]

    @property
    def rows(self) -> slice:
        """This rank's residues, ``[start, stop)``."""
        start = self.offsets[self.rank]
        return slice(start, start + self.sizes[self.rank])

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


def _all_to_all(shard: SequenceShard, sends: list[torch.Tensor], recv_shapes: list[tuple[int, ...]]):
    """Send ``sends[r]`` to rank ``r`` and return what each rank sent here, as ``recv_shapes``."""
    send = torch.cat([t.reshape(-1) for t in sends])
    counts = [math.prod(s) for s in recv_shapes]
    recv = send.new_empty(sum(counts))
    dist.all_to_all_single(recv, send, output_split_sizes=counts,
                           input_split_sizes=[t.numel() for t in sends], group=shard.group)
    return [part.view(shape) for part, shape in zip(recv.split(counts), recv_shapes)]


def _resized(t: torch.Tensor, dim: int, size: int) -> tuple[int, ...]:
    shape = list(t.shape)
    shape[dim] = size
    return tuple(shape)


class _GatherRows(Function):
    @staticmethod
    def forward(ctx, x, dim, shard):
        ctx.dim, ctx.shard = dim, shard
        parts = _all_to_all(shard, [x] * shard.world, [_resized(x, dim, n) for n in shard.sizes])
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        dim, shard = ctx.dim, ctx.shard
        blocks = list(grad.split(shard.sizes, dim))
        mine = blocks[shard.rank].shape
        return sum(_all_to_all(shard, blocks, [mine] * shard.world)), None, None


def gather_rows(x: torch.Tensor, dim: int, shard: SequenceShard) -> torch.Tensor:
    """Concatenate every rank's block of ``x`` along ``dim`` (its residue axis), in rank order.

    ``x`` has ``shard.sizes[rank]`` entries along ``dim``; the result has ``shard.n``. The
    gradient of this rank's block is the sum over ranks of their gradients for it.
    """
    if shard.world == 1:
        return x
    return _GatherRows.apply(x, dim % x.dim(), shard)


def _transpose_rows(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    offsets, sizes = shard.offsets, shard.sizes
    sends = [x.narrow(2, o, n).transpose(1, 2) for o, n in zip(offsets, sizes)]
    mine = sizes[shard.rank]
    shapes = [(x.shape[0], mine, n, *x.shape[3:]) for n in sizes]
    return torch.cat(_all_to_all(shard, sends, shapes), dim=2)


class _TransposeRows(Function):
    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        return _transpose_rows(x, shard)

    @staticmethod
    def backward(ctx, grad):
        # A transposition is its own inverse, and the adjoint of a permutation is its inverse.
        return _transpose_rows(grad, ctx.shard), None


def transpose_rows(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """This rank's rows of ``zᵀ`` from its rows of ``z`` (one all-to-all).

    ``x`` ``[B, I_r, N, *]`` holds rows ``shard.rows`` of a pair tensor ``z`` ``[B, N, N, *]``;
    the result ``[B, I_r, N, *]`` holds the same rows of ``zᵀ`` (``z`` with its two residue
    axes swapped), i.e. the columns ``shard.rows`` of ``z``. Applying it twice gives ``x`` back.
    """
    if shard.world == 1:
        return x.transpose(1, 2)
    return _TransposeRows.apply(x, shard)


class _AllReduceSum(Function):
    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        out = x.clone()
        dist.all_reduce(out, group=shard.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.shard.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The sum of ``x`` over the ranks of the group, on every rank."""
    if shard.world == 1:
        return x
    return _AllReduceSum.apply(x, shard)


def _contract(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x[b, i, j, c] = Σ_k left[b, i, k, c] · right[b, j, k, c]``."""
    return torch.einsum("bikc,bjkc->bijc", left, right)


def _block(right: torch.Tensor, src: int, shard: SequenceShard) -> torch.Tensor:
    """Rank ``src``'s block of the row-split ``right``, received by broadcast."""
    if src == shard.rank:
        buf = right.contiguous()
    else:
        buf = right.new_empty(_resized(right, 1, shard.sizes[src]))
    dist.broadcast(buf, src=shard.global_rank(src), group=shard.group)
    return buf


class _RowGatheredProduct(Function):
    @staticmethod
    def forward(ctx, left, right, shard):
        ctx.save_for_backward(left, right)
        ctx.shard = shard
        out = left.new_empty((left.shape[0], left.shape[1], shard.n, left.shape[-1]))
        with torch.autocast(left.device.type, enabled=False):
            for src, (o, n) in enumerate(zip(shard.offsets, shard.sizes)):
                out[:, :, o:o + n] = _contract(left, _block(right, src, shard))
        return out

    @staticmethod
    def backward(ctx, grad):
        left, right = ctx.saved_tensors
        shard = ctx.shard
        grad_left = torch.zeros_like(left)
        grad_right = None
        with torch.autocast(left.device.type, enabled=False):
            for src, (o, n) in enumerate(zip(shard.offsets, shard.sizes)):
                g = grad[:, :, o:o + n]
                grad_left += torch.einsum("bijc,bjkc->bikc", g, _block(right, src, shard))
                part = torch.einsum("bijc,bikc->bjkc", g, left).contiguous()
                dist.reduce(part, dst=shard.global_rank(src), group=shard.group)
                if src == shard.rank:
                    grad_right = part
        return grad_left, grad_right, None


def row_gathered_product(left: torch.Tensor, right: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """``x[b, i, j, c] = Σ_k left[b, i, k, c] · right[b, j, k, c]`` with ``right``'s rows split.

    ``left`` ``[B, I_r, N, C]`` and ``right`` ``[B, I_r, N, C]`` are this rank's rows; the
    result ``[B, I_r, N, C]`` holds rows ``shard.rows`` of ``x`` with every column ``j``.
    The blocks of ``right`` are broadcast one at a time and broadcast again in backward, so
    no rank ever holds all of ``right``: memory stays ``O(N²·C / W)``. Computed in the
    inputs' dtype (autocast off).
    """
    if shard.world == 1:
        with torch.autocast(left.device.type, enabled=False):
            return _contract(left, right)
    return _RowGatheredProduct.apply(left, right, shard)
