"""``torch.ops.panther``: custom ops with pure-PyTorch fallbacks and optional native kernels."""

from . import attention, linear
from . import conv2d  # panther::lowrank_conv2d, panther::sketched_conv2d
from . import linalg  # panther::fwht, panther::sparse_sketch(_t)
from ._extension import extension_loaded, kernel_info, load_extension
from .attention import performer_attention
from .linear import lowrank_linear, sketch_concat, sketched_linear

load_extension()

__all__ = [
    "extension_loaded", "kernel_info", "linear", "load_extension", "lowrank_linear", "sketch_concat",
    "sketched_linear",
    "attention", "performer_attention",
]
