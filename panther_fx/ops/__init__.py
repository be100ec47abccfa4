"""``torch.ops.panther``: custom ops with pure-PyTorch fallbacks and optional native kernels."""

from ._extension import extension_loaded, kernel_info, load_extension

# Before the ops are defined: whether the extension registered a C++ autograd kernel for an op decides whether
# its Python autograd formula is registered (ops/_library.py).
load_extension()

from . import attention, linear  # noqa: E402
from . import conv2d  # noqa: E402  (panther::lowrank_conv2d, panther::sketched_conv2d)
from . import linalg  # noqa: E402  (panther::fwht, panther::sparse_sketch(_t))
from .attention import performer_attention  # noqa: E402
from .linear import lowrank_linear, sketch_concat, sketched_linear  # noqa: E402

__all__ = [
    "extension_loaded", "kernel_info", "linear", "load_extension", "lowrank_linear", "sketch_concat",
    "sketched_linear",
    "attention", "performer_attention",
]
