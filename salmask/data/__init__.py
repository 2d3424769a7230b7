"""Datasets for saliency-guided training: images served together with their cached saliency maps."""

from salmask.data._saliency_dataset import SaliencyDataset, SaliencyImageFolder

__all__ = ["SaliencyDataset", "SaliencyImageFolder"]
