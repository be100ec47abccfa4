"""Sketched ``nn`` modules whose forward calls ``torch.ops.panther`` ops (training, saving, export)."""

from .linear import LowRankLinear, SKLinear
from .conv import LowRankConv2d, SKConv2d
from .attention import RandMultiheadAttention

__all__ = ["LowRankConv2d", "LowRankLinear", "RandMultiheadAttention", "SKConv2d", "SKLinear"]
