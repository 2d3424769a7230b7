"""Weighted k-nearest-neighbour evaluation of an encoder, the monitor of InstDisc and MoCo."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from salmask._validation import check_bool, check_callable, check_int, check_positive, check_tensor
from salmask.distributed import all_gather, get_world_size

__all__ = ["extract_features", "knn_predict", "knn_top1"]


def _check_loader(loader: Any, name: str) -> None:
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes, Tensor)):
        raise TypeError(
            f"{name} must be a DataLoader (an iterable of (images, labels) batches), got {type(loader).__name__}"
        )


def _with_progress(loader: Iterable[Any]) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return loader
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc="features", unit="batch", file=sys.stderr, dynamic_ncols=True)


def _first_tensor(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("the loader must yield (images, labels) batches")
    images, labels = batch[0], batch[1]
    if isinstance(images, (tuple, list)):
        # (image, saliency) items: the saliency is not needed to compute features.
        images = images[0]
    return images, torch.as_tensor(labels)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    channels_last: bool = False,
    autocast: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """L2-normalised features and labels of every image a loader serves, in the dataset's order.

    The encoder runs in eval mode without gradient (its previous mode is restored afterwards). Under
    ``torch.distributed`` each rank encodes its share and the shares are gathered; the loader must then use
    a :class:`~torch.utils.data.DistributedSampler` with ``shuffle=False``, whose padding is removed, so
    every rank returns the features of the whole dataset, once each, in order.

    Args:
        encoder: maps ``(B, 3, H, W)`` images to ``(B, D)`` features.
        loader: yields ``(images, labels)`` (or ``((images, saliency), labels)``) batches.
        device: where to run; default the encoder's device.
        transform: applied to each batch of images on the device before the encoder, e.g.
            :class:`~salmask.HighPassFilter` for an encoder pretrained on high-pass filtered views.
        channels_last: convert batches to channels-last memory format (for a channels-last encoder).
        autocast: run the encoder under ``torch.autocast`` on ``device``'s type.
        progress: show a progress bar of the batches on stderr (when tqdm is installed); pass it on one rank.

    Returns:
        ``(features, labels)``: ``(N, D)`` float32 unit vectors and ``(N,)`` int64 labels, on ``device``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from salmask.ssl import extract_features
        >>> data = TensorDataset(torch.randn(5, 3, 4, 4), torch.arange(5))
        >>> features, labels = extract_features(nn.Flatten(), DataLoader(data, batch_size=2))
        >>> features.shape, features.norm(dim=1).allclose(torch.ones(5)), labels.tolist()
        (torch.Size([5, 48]), True, [0, 1, 2, 3, 4])
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    _check_loader(loader, "loader")
    check_callable(transform, "transform")
    check_bool(channels_last, "channels_last")
    check_bool(autocast, "autocast")
    check_bool(progress, "progress")
    world_size = get_world_size()
    sampler = getattr(loader, "sampler", None)
    if world_size > 1 and (not isinstance(sampler, DistributedSampler) or sampler.shuffle):
        raise ValueError(
            "under torch.distributed the loader must use a DistributedSampler with shuffle=False, so that the "
            "ranks' shares can be put back in the dataset's order"
        )
    if device is None:
        parameter = next(encoder.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    try:
        for batch in _with_progress(loader) if progress else loader:
            images, targets = _first_tensor(batch)
            images = images.to(device, non_blocking=True)
            if transform is not None:
                images = transform(images)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=autocast):
                output = encoder(images)
            features.append(F.normalize(output.float(), dim=1))
            labels.append(targets.to(device))
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("the loader served no batch; the dataset is empty")
    features_tensor, labels_tensor = torch.cat(features), torch.cat(labels).long()
    if world_size > 1:
        # DistributedSampler deals index i to rank i % world_size: interleave the ranks' shares back into
        # the padded dataset order, then drop the padding.
        total = len(sampler.dataset)
        features_tensor = all_gather(features_tensor)
        labels_tensor = all_gather(labels_tensor)
        per_rank = features_tensor.shape[0] // world_size
        features_tensor = features_tensor.view(world_size, per_rank, -1).transpose(0, 1).flatten(0, 1)
        labels_tensor = labels_tensor.view(world_size, per_rank).t().reshape(-1)
        features_tensor, labels_tensor = features_tensor[:total], labels_tensor[:total]
    return features_tensor, labels_tensor


@torch.no_grad()
def knn_predict(
    features: Tensor,
    bank_features: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores: each of the ``k`` most similar bank entries votes ``exp(cos / T)``.

    The rule of InstDisc (Wu et al., 2018), used as MoCo's monitor: cosine similarity between unit
    features, the ``k`` nearest neighbours, each weighted by ``exp(similarity / temperature)``, scores
    summed per class. Each query's weights are divided by the weight of its nearest neighbour,
    ``exp(max similarity / T)``, which leaves its ranking of the classes as it is but keeps every weight
    in ``[0, 1]``: the scores never overflow, whatever ``T > 0`` (at ``T = 0.01`` the plain weights
    overflow float32 and every class would tie at infinity). As ``T`` goes to 0 the vote becomes the
    class of the nearest neighbour. Queries are processed ``chunk_size`` at a time, so memory stays at
    ``chunk_size x len(bank)`` similarities whatever the number of queries.

    Args:
        features: ``(N, D)`` L2-normalised query features.
        bank_features: ``(M, D)`` L2-normalised features of the labelled bank (the training set).
        bank_labels: ``(M,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        k: neighbours per query (200); capped at ``M``.
        temperature: T of the weights (0.1), any positive number.
        chunk_size: queries per block.

    Returns:
        ``(N, num_classes)`` class scores, relative to each query's nearest neighbour (its best class
        scores at least 1); ``argmax(1)`` is the prediction.

    Raises:
        TypeError: a tensor argument is not a tensor of the right dtype, or a number of the wrong type.
        ValueError: mismatched shapes, an empty bank, or labels outside ``[0, num_classes)``.

    Example:
        >>> import torch
        >>> from salmask.ssl import knn_predict
        >>> bank = torch.eye(3)
        >>> knn_predict(torch.eye(3), bank, torch.tensor([0, 1, 1]), 2, k=1).argmax(1).tolist()
        [0, 1, 1]
    """
    check_tensor(features, "features", ndim=2, floating=True)
    check_tensor(bank_features, "bank_features", ndim=2, floating=True)
    if features.shape[1] != bank_features.shape[1]:
        raise ValueError(
            f"features and bank_features must be (N, D) and (M, D), got {tuple(features.shape)} and "
            f"{tuple(bank_features.shape)}"
        )
    check_tensor(bank_labels, "bank_labels")
    if bank_labels.is_floating_point() or bank_labels.is_complex() or bank_labels.dtype == torch.bool:
        raise TypeError(f"bank_labels must be an integer tensor, got dtype {bank_labels.dtype}")
    if bank_labels.shape != bank_features.shape[:1]:
        raise ValueError(f"bank_labels must be ({bank_features.shape[0]},), got {tuple(bank_labels.shape)}")
    for name, value in (("num_classes", num_classes), ("k", k), ("chunk_size", chunk_size)):
        check_int(value, name, minimum=1)
    check_positive(temperature, "temperature")
    if bank_features.shape[0] == 0:
        raise ValueError("the feature bank is empty")
    low, high = int(bank_labels.min()), int(bank_labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"bank_labels must lie in [0, {num_classes}), got values from {low} to {high}; pass the number of "
            "classes of the bank's dataset"
        )
    k = min(k, bank_features.shape[0])
    per_class = bank_features.shape[0] / num_classes
    if k > per_class:
        # MoCo's k=200 suits ImageNet's 1,300 images per class; with fewer, most of the k votes come from other
        # classes whatever the features, and the score says more about k than about the encoder.
        warnings.warn(
            f"knn_predict: k={k} neighbours, but the bank holds {per_class:.0f} images per class on average: most "
            f"votes come from other classes; use k below {per_class:.0f}",
            UserWarning,
            stacklevel=2,
        )
    bank_labels = bank_labels.to(features.device).long()
    scores = []
    for chunk in features.split(chunk_size):
        similarity = chunk @ bank_features.t()
        top_similarity, top_index = similarity.topk(k, dim=1)
        # In float64, where any positive temperature is representable (a float32 T could round to 0): the
        # nearest neighbour's weight is exactly 1, the others in [0, 1].
        below_nearest = top_similarity.double() - top_similarity[:, :1].double()
        weights = (below_nearest / temperature).exp().to(similarity.dtype)
        votes = torch.zeros(chunk.shape[0], num_classes, device=features.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(
    encoder: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    **extract_options: Any,
) -> float:
    """Top-1 accuracy (percent) of weighted kNN: the training images are the bank, validation the queries.

    Args:
        encoder: the base encoder (features before any projection head).
        train_loader: the labelled bank, without random augmentation.
        val_loader: the images to classify.
        num_classes: number of classes.
        k: neighbours (200).
        temperature: weight temperature (0.1).
        chunk_size: queries per block in :func:`knn_predict`.
        **extract_options: ``device``, ``transform``, ``channels_last``, ``autocast``, ``progress`` for
            :func:`extract_features`.

    Returns:
        Top-1 accuracy in percent, the same on every rank.
    """
    _check_loader(train_loader, "train_loader")
    _check_loader(val_loader, "val_loader")
    bank_features, bank_labels = extract_features(encoder, train_loader, **extract_options)
    features, labels = extract_features(encoder, val_loader, **extract_options)
    scores = knn_predict(
        features, bank_features, bank_labels, num_classes, k=k, temperature=temperature, chunk_size=chunk_size
    )
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()
