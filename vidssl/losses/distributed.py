"""Cross-rank gathers for contrastive losses; identities when ``torch.distributed`` is not initialised.

* :func:`gather_with_grad` -- every rank's rows concatenated in rank order; the local slice keeps its graph and the
  gradient of every rank's loss w.r.t. this rank's rows is summed back to it (an all-reduce of the gradient, then this
  rank's slice: the intended semantics of ``torch.distributed.nn.functional.all_gather`` and SimCLR's
  ``GatherLayer``). The in-tree function is not used: it is deprecated, and on gloo (checked with PyTorch 2.14) its
  backward permutes the gradient when the incoming gradient is non-contiguous, as the transposed gradient of a
  ``query @ keys.T`` score matrix is (cf. pytorch/pytorch#120386 for the NCCL twin). Under DDP, whose gradient averaging
  divides by the world size, each rank computing the mean loss of its own rows against the gathered candidates then
  trains exactly like one process computing the mean loss over the concatenated batch.
* :func:`gather_no_grad` -- MoCo's ``concat_all_gather``: a detached copy, for keys, queues and memory-bank updates.

All ranks must pass tensors of the same shape (equal local batches; ``drop_last=True`` in the loader).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: the gradients of all ranks w.r.t. the gathered tensor are summed
    (all-reduce) and each rank keeps the slice of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (world * B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # (world * B, ...) own buffer for the reduce
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]  # (B, ...)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, differentiable.

    Args:
        x: ``(B, ...)`` this rank's rows.

    Returns:
        ``(world * B, ...)``, rank r's rows at ``[r * B, (r + 1) * B)``; ``x`` itself for one process.
    """
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without a graph (MoCo's ``concat_all_gather``).

    Args:
        x: ``(B, ...)``.

    Returns:
        ``(world * B, ...)`` detached, rank order; ``x.detach()`` for one process.
    """
    world = rank_and_world()[1]
    if world == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)  # (world * B, ...)


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from rank ``src``; a no-op for one process. Returns ``x``."""
    if rank_and_world()[1] > 1:
        dist.broadcast(x, src=src)
    return x
