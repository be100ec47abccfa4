"""Randomized linear algebra: sketch operators, randomized SVD and weight factorizations."""

from ._random import as_generator, layer_generator, random_signs
from .lowrank import asvd_factors, sketch_factors, sketch_weight, svd_factors, whitening
from .rsvd import rsvd

__all__ = [
    "as_generator", "layer_generator", "random_signs", "rsvd", "sketch_factors", "sketch_weight",
    "svd_factors", "asvd_factors", "whitening",
]
