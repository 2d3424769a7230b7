"""Rank helpers and all-gathers that also run in a single process.

Every function here works whether or not :mod:`torch.distributed` is available and whether or not a
process group has been initialised: without one, the world is a single process of rank 0 and the gathers
return their input. Code that uses them therefore runs unchanged on a laptop, under ``torchrun`` and
under DDP.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "all_gather_with_grad",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
]


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when started by ``torchrun`` and return this rank's device.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the default process group is created with NCCL on GPUs and
    gloo on CPUs, and each process takes the GPU of its ``LOCAL_RANK``. In a single process nothing is
    initialised, so the same script runs unchanged on a laptop.

    Args:
        device: ``"auto"`` (a GPU when one is available), ``"cuda"`` or ``"cpu"``.

    Returns:
        The device this process should use.

    Raises:
        ValueError: if ``device`` is not one of the three names, or is ``"cuda"`` without a CUDA device.

    Example:
        >>> from salmask.distributed import init_distributed
        >>> init_distributed("cpu")
        device(type='cpu')
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def is_distributed() -> bool:
    """Whether a default process group exists, so that collectives can be called.

    Returns:
        ``True`` when :mod:`torch.distributed` is built in and its default process group is
        initialised, ``False`` otherwise (including builds without distributed support).

    Example:
        >>> from salmask.distributed import is_distributed
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process in the default process group, 0 without one.

    Example:
        >>> from salmask.distributed import get_rank
        >>> get_rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default process group, 1 without one.

    Example:
        >>> from salmask.distributed import get_world_size
        >>> get_world_size()
        1
    """
    return dist.get_world_size() if is_distributed() else 1


def _check_tensor(tensor: Any, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension to concatenate along, got a scalar")


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dimension 0, in rank order, without gradient.

    Every rank must pass a tensor of the same shape, dtype and device type (``DistributedSampler`` gives
    every rank the same number of samples, so per-step batches agree). The result is detached: use it for
    things that take no gradient, such as the keys entering a :class:`~salmask.MomentumQueue`.

    Args:
        tensor: local tensor, shaped ``(N, ...)``.

    Returns:
        Tensor shaped ``(world_size * N, ...)`` whose block ``r`` is rank ``r``'s tensor. Without a process
        group, ``tensor`` itself, detached.

    Raises:
        TypeError: if ``tensor`` is not a tensor.
        ValueError: if ``tensor`` is a scalar.

    Example:
        >>> import torch
        >>> from salmask.distributed import all_gather
        >>> all_gather(torch.arange(3)).tolist()
        [0, 1, 2]
    """
    _check_tensor(tensor, "tensor")
    world_size = get_world_size()
    if world_size == 1:
        return tensor.detach()
    # all_gather needs contiguous input; the output blocks are fresh buffers, so the caller's tensor is
    # never written to.
    tensor = tensor.detach().contiguous()
    blocks = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(blocks, tensor)
    return torch.cat(blocks, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own block."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.block_size = tensor.shape[0]
        tensor = tensor.contiguous()
        blocks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(blocks, tensor)
        return torch.cat(blocks, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        # Each rank's loss depends on every rank's block, so the gradient for the local block is the sum
        # over ranks of the gradients they computed for it. Summing here (rather than keeping only the
        # local loss's share) is what makes DDP's gradient averaging give the gradient of the global mean
        # loss; keeping only the local share would silently drop the cross-rank terms.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.block_size
        return grad[start : start + ctx.block_size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dimension 0, keeping gradient for the local block.

    The result is shaped ``(world_size * N, ...)`` with rank ``r``'s tensor in block ``r``. In backward,
    the local block receives the sum, over all ranks, of the gradient each rank's loss sends to that block
    (the other blocks are other processes' activations and get no gradient here; their own processes
    account for them). Under DDP, which averages parameter gradients across ranks, this yields the
    gradient of the mean of the per-rank losses: the same as one process computing the mean loss over the
    whole global batch. Every rank must call it with the same shape, and every rank
    must run backward through it (it is a collective in both directions).

    Args:
        tensor: local tensor, shaped ``(N, ...)``.

    Returns:
        The gathered tensor; without a process group, ``tensor`` itself (so gradient flows unchanged).

    Raises:
        TypeError: if ``tensor`` is not a tensor.
        ValueError: if ``tensor`` is a scalar.

    Example:
        >>> import torch
        >>> from salmask.distributed import all_gather_with_grad
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> all_gather_with_grad(x).sum().backward()
        >>> x.grad.tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    _check_tensor(tensor, "tensor")
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)
