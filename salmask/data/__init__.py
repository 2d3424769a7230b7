"""Datasets for saliency-guided training: cached saliency over image folders, a built-in synthetic dataset
with true object masks, ImageNet-100 and Fashion-MNIST."""

from salmask.data._fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, FashionMNIST, read_idx
from salmask.data._imagenet100 import IMAGENET100_CLASSES, build_imagenet100, read_val_labels
from salmask.data._saliency_dataset import SaliencyDataset, SaliencyImageFolder
from salmask.data._synthetic import SHAPE_CLASSES, SyntheticShapes

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMAGENET100_CLASSES",
    "SHAPE_CLASSES",
    "FashionMNIST",
    "SaliencyDataset",
    "SaliencyImageFolder",
    "SyntheticShapes",
    "build_imagenet100",
    "read_idx",
    "read_val_labels",
]
