"""Randomized linear algebra: sketch operators, randomized SVD and weight factorizations."""

from ._random import as_generator, layer_generator, random_signs
from .cqrrpt import cqrrpt, qrcp, rank_threshold
from .lowrank import asvd_factors, sketch_factors, sketch_weight, svd_factors, whitening
from .lstsq import sketched_lstsq
from .rsvd import rsvd
from .sketch import (
    SKETCHES, CountSketch, GaussianSketch, SketchOperator, SparseSignSketch, SRHTSketch, countsketch, gaussian,
    make_sketch, sparse_sign, srht,
)

__all__ = [
    "as_generator", "layer_generator", "random_signs", "rsvd", "sketch_factors", "sketch_weight",
    "svd_factors", "asvd_factors", "whitening",
    "SKETCHES", "CountSketch", "GaussianSketch", "SRHTSketch", "SketchOperator", "SparseSignSketch", "countsketch",
    "cqrrpt", "gaussian", "make_sketch", "qrcp", "rank_threshold", "sketched_lstsq", "sparse_sign", "srht",
]
