"""Sketched ``nn`` modules whose forward calls ``torch.ops.panther`` ops (training, saving, export)."""

from .linear import LowRankLinear, SKLinear
from .conv import LowRankConv2d, SKConv2d
from .attention import RandMultiheadAttention
