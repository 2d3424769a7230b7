"""Datasets for saliency-guided training: cached saliency over image folders, and a built-in synthetic dataset."""

from salmask.data._saliency_dataset import SaliencyDataset, SaliencyImageFolder
from salmask.data._synthetic import SHAPE_CLASSES, SyntheticShapes

__all__ = ["SHAPE_CLASSES", "SaliencyDataset", "SaliencyImageFolder", "SyntheticShapes"]
