"""Row-chunked evaluation that recomputes in backward: exact, O(chunk) activation memory.

:func:`chunked` evaluates ``fn`` on slices of its row inputs and keeps, for
backward, only the inputs: each chunk is recomputed in backward and
differentiated on its own, and the gradients of the row inputs are written
into their slices of one buffer, those of the shared inputs and of ``params``
summed. A chunk's intermediates therefore live only while that chunk runs, in
the forward and in the backward. The arithmetic of every chunk is that of the
unchunked call restricted to its rows, so the result equals the plain call
(up to the order of a sum for ``reduce="sum"``).

``fn`` must be deterministic (no dropout inside): backward recomputes it.
Under autocast the recomputation runs in the forward's autocast state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Values per block of an ``"auto"`` chunk (``resolve_chunk``): 2**22, 16 MiB in float32.
AUTO_BLOCK = 1 << 22


def resolve_chunk(chunk_size: int | str | None, per_row: int) -> int | None:
    """Rows per chunk: ``chunk_size`` itself, or for ``"auto"`` as many rows as keep one
    block of a ``per_row``-values-per-row intermediate within :data:`AUTO_BLOCK` values
    (at least 1): a block of fixed size, so the chunked memory does not grow with the rows."""
    if chunk_size != "auto":
        return chunk_size
    return max(1, AUTO_BLOCK // max(1, per_row))


def spans(n: int, step: int) -> list[tuple[int, int]]:
    """``[(0, step), (step, 2·step), ..., (·, n)]``."""
    return [(i, min(i + step, n)) for i in range(0, n, max(1, step))]


def chunked(
    fn: Callable[..., torch.Tensor],
    rows: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor] = (),
    params: Sequence[torch.Tensor] = (),
    *,
    chunk_size: int,
    dim: int = 1,
    reduce: str = "cat",
) -> torch.Tensor:
    """``fn(*row_chunks, *shared)`` over chunks of ``chunk_size`` rows along ``dim``.

    Args:
        fn: maps row slices (each ``rows[i].narrow(dim, i0, i1 - i0)``) and the
            ``shared`` tensors to one tensor.
        rows: tensors sliced along ``dim`` (all of the same length there).
        shared: tensors every chunk sees whole.
        params: parameters ``fn`` reads from its module (not passed to it): they
            receive gradients.
        chunk_size: rows per chunk (``>= 1``).
        reduce: ``"cat"`` (the chunk outputs have rows along ``dim`` and are
            concatenated) or ``"sum"`` (the chunk outputs are added).

    Without autograd recording (inference) this is a plain loop.
    """
    if reduce not in ("cat", "sum"):
        raise ValueError(f"reduce must be 'cat' or 'sum', got {reduce!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows, shared, params = tuple(rows), tuple(shared), tuple(params)
    tensors = (*rows, *shared, *params)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Chunked.apply(fn, len(rows), len(shared), chunk_size, dim, reduce, *tensors)
    return _loop(fn, rows, shared, chunk_size, dim, reduce)


def _loop(fn, rows, shared, chunk_size, dim, reduce):
    n = rows[0].shape[dim]
    out = None
    for i0, i1 in spans(n, chunk_size):
        part = fn(*(t.narrow(dim, i0, i1 - i0) for t in rows), *shared)
        if reduce == "sum":
            out = part if out is None else out + part
            continue
        if out is None:
            shape = list(part.shape)
            shape[dim] = n
            out = part.new_empty(shape)
        out.narrow(dim, i0, i1 - i0).copy_(part)
    return out


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_rows, n_shared, chunk_size, dim, reduce, *tensors):
        rows, shared = tensors[:n_rows], tensors[n_rows : n_rows + n_shared]
        device = tensors[0].device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        ctx.fn, ctx.n_rows, ctx.n_shared = fn, n_rows, n_shared
        ctx.chunk_size, ctx.dim, ctx.reduce = chunk_size, dim, reduce
        ctx.save_for_backward(*tensors)
        return _loop(fn, rows, shared, chunk_size, dim, reduce)

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        n_rows, n_shared, dim = ctx.n_rows, ctx.n_shared, ctx.dim
        rows, shared, params = tensors[:n_rows], tensors[n_rows : n_rows + n_shared], tensors[n_rows + n_shared :]
        enabled, dtype, device = ctx.autocast
        row_grads = [torch.empty_like(t) if t.requires_grad else None for t in rows]
        other_grads: list[torch.Tensor | None] = [None] * (n_shared + len(params))
        for i0, i1 in spans(rows[0].shape[dim], ctx.chunk_size):
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                row_in = [t.narrow(dim, i0, i1 - i0).detach().requires_grad_(t.requires_grad) for t in rows]
                shared_in = [t.detach().requires_grad_(t.requires_grad) for t in shared]
                out = ctx.fn(*row_in, *shared_in)
            wrt = [t for t in (*row_in, *shared_in, *params) if t.requires_grad]
            g = grad.narrow(dim, i0, i1 - i0) if ctx.reduce == "cat" else grad
            found = iter(torch.autograd.grad(out, wrt, g, allow_unused=True))
            for k, t in enumerate(row_in):
                if t.requires_grad:
                    gk = next(found)
                    target = row_grads[k].narrow(dim, i0, i1 - i0)
                    if gk is None:
                        target.zero_()
                    else:
                        target.copy_(gk)
            for k, t in enumerate((*shared_in, *params)):
                if t.requires_grad:
                    gk = next(found)
                    if gk is not None:
                        other_grads[k] = gk if other_grads[k] is None else other_grads[k] + gk
        return (None, None, None, None, None, None, *row_grads, *other_grads)
