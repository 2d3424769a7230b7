"""MoCo's memory bank: a FIFO queue of key embeddings, saved with the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from salmask._defaults import QUEUE_SIZE
from salmask._validation import check_bool, check_int, check_tensor
from salmask.distributed import all_gather

__all__ = ["MomentumQueue", "check_queue_size"]


class MomentumQueue(nn.Module):
    """MoCo's FIFO memory bank of key embeddings, shaped ``(D, K)`` and saved in ``state_dict``.

    The keys and the write pointer are registered (persistent) buffers, so ``state_dict`` /
    ``load_state_dict`` carry them (a resumed run continues with the keys it had, not a fresh random
    queue) and ``.to(device)`` moves them: :attr:`keys`, ``(D, K)`` as MoCo's ``queue``, and
    :attr:`pointer`, ``(1,)`` as MoCo's ``queue_ptr``. Like MoCo, the queue starts as random unit
    columns; ranks that build it with different seeds agree after at most ``K / (world_size * B)`` steps
    (or at once, when the queue lives inside a DDP-wrapped module, whose buffers DDP broadcasts from
    rank 0).

    :meth:`enqueue` takes keys only (never hard negatives), gathers them from all ranks when a process
    group is initialised (rank order), and writes them after the newest keys; a batch that does not fit
    before the end wraps around to the start, so K need not be a multiple of the batch size.

    Args:
        dim: embedding size D.
        size: number of keys K (65536 in MoCo v2).
        gather_distributed: gather keys from all ranks before enqueueing (a no-op in one process).

    Example:
        >>> import torch
        >>> from salmask.ssl import MomentumQueue
        >>> queue = MomentumQueue(dim=4, size=5)
        >>> queue.enqueue(torch.ones(3, 4))
        >>> queue.enqueue(torch.full((3, 4), 2.0))  # two rows fill the end, one wraps to column 0
        >>> queue.keys[0].tolist(), int(queue.pointer)
        ([2.0, 1.0, 1.0, 2.0, 2.0], 1)
    """

    #: ``(D, K)`` keys, one per column, the oldest overwritten first.
    keys: torch.Tensor
    #: ``(1,)`` long, the column the next key is written to.
    pointer: torch.Tensor

    def __init__(self, dim: int, size: int = QUEUE_SIZE, *, gather_distributed: bool = True) -> None:
        super().__init__()
        self.dim = check_int(dim, "dim", minimum=1)
        self.size = check_int(size, "size", minimum=1)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        self.register_buffer("keys", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("pointer", torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, gather_distributed={self.gather_distributed}"

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write a batch of keys over the oldest ones.

        Args:
            keys: ``(B, D)`` key embeddings (normalised, as MoCo's are; stored as given, detached).
                Under ``torch.distributed`` every rank must call this with the same B.

        Raises:
            TypeError: ``keys`` is not a floating-point tensor.
            ValueError: ``keys`` is not ``(B, D)`` with this queue's D.
        """
        check_tensor(keys, "keys", ndim=2, floating=True)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, D) with D={self.dim}, got shape {tuple(keys.shape)}")
        if self.gather_distributed:
            keys = all_gather(keys)
        num_keys = keys.shape[0]
        if num_keys == 0:
            return
        keys = keys.detach().to(device=self.keys.device, dtype=self.keys.dtype)
        positions = (self.pointer + torch.arange(num_keys, device=self.keys.device)) % self.size
        if num_keys > self.size:
            # Only the newest K keys survive; writing older ones first would be overwritten anyway, and
            # index_copy_ with repeated indices has no defined winner.
            keys, positions = keys[-self.size :], positions[-self.size :]
        self.keys.index_copy_(1, positions, keys.t())
        self.pointer.add_(num_keys).remainder_(self.size)

    def negatives(self) -> torch.Tensor:
        """A detached copy of the queue, ``(D, K)``, safe to use as negatives before :meth:`enqueue`.

        Using :attr:`keys` directly is fine when the enqueue happens after ``backward``; MoCo enqueues
        inside ``forward``, which would modify a tensor autograd saved, so it copies, as this does.
        """
        return self.keys.detach().clone()


def check_queue_size(queue_size: int, num_images: int, batch_size: int) -> int:
    """Refuse a MoCo queue that holds the previous keys of the very images of a batch.

    The queue holds the keys of the last ``queue_size`` images seen. With ``num_images`` training images
    in batches of ``batch_size``, an image's key from the previous epoch is still queued when fewer than
    ``queue_size`` images came between: with a queue of ``num_images - batch_size`` keys or more, half of
    every batch (and more) finds its own earlier key among the negatives, and the loss pushes each image
    away from itself. MoCo's 65,536 keys suit ImageNet's 1.28 M images; a small data set needs a small
    queue (a quarter of the images keeps the share of a batch meeting its own key under 1/32).

    Args:
        queue_size: K, the number of queued keys.
        num_images: the training set's size, all ranks together.
        batch_size: the global batch size.

    Returns:
        ``queue_size``.

    Raises:
        ValueError: ``queue_size >= num_images - batch_size``; the message names the largest fitting queue.

    Example:
        >>> from salmask.ssl import check_queue_size
        >>> check_queue_size(4096, num_images=100_000, batch_size=256)
        4096
        >>> check_queue_size(1024, num_images=1024, batch_size=64)
        Traceback (most recent call last):
            ...
        ValueError: queue_size=1024 holds the keys of the last 1024 images, but the 1024 training images ...
    """
    check_int(queue_size, "queue_size", minimum=1)
    check_int(num_images, "num_images", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    if queue_size >= num_images - batch_size:
        raise ValueError(
            f"queue_size={queue_size} holds the keys of the last {queue_size} images, but the {num_images} "
            f"training images come round again every {num_images // batch_size} batches of {batch_size}: half "
            "of each batch and more would meet its own earlier key as a negative. Use a queue of at most "
            f"{max(1, num_images // 4)} keys (a quarter of the images), or more images"
        )
    return queue_size
