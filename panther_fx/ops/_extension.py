"""Loading of the native extension ``panther_fx._C`` and a report of which kernels are active.

The extension only adds ``TORCH_LIBRARY_IMPL(panther, CPU | CUDA | Autograd, m)`` kernels to ops whose schema
and pure-PyTorch fallback are defined in Python, so every op exists with or without it. ``PANTHER_NO_EXT=1``
skips loading it (the fallback bodies then run everywhere).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__all__ = ["load_extension", "extension_loaded", "kernel_info"]

_state = {"loaded": False, "error": None}


def load_extension() -> bool:
    """Import ``panther_fx._C`` once; return whether its kernels are registered."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    if os.environ.get("PANTHER_NO_EXT") == "1":
        _state["error"] = "disabled by PANTHER_NO_EXT=1"
        return False
    if importlib.util.find_spec("panther_fx._C") is None:
        _state["error"] = "not built"
        warnings.warn("panther_fx: the native extension is not built; using the PyTorch reference ops. "
                      "Build it with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)
        return False
    try:
        from panther_fx import _C  # noqa: F401  (static initializers register the kernels)
    except ImportError as e:  # built, but for another torch or with a missing symbol
        _state["error"] = str(e)
        warnings.warn(f"panther_fx: the native extension failed to load ({e}); using the PyTorch reference "
                      "ops. Rebuild it with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)
        return False
    _state["loaded"] = True
    return True


def extension_loaded() -> bool:
    return _state["loaded"]


def _panther_ops() -> list[str]:
    """Public ``panther::`` ops (helpers named ``_...`` are left out)."""
    names = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("panther::")]
    return sorted(name for name in names if not name.split("::", 1)[1].startswith("_"))


def _native_kernels(name: str) -> dict[str, bool]:
    """Whether the CPU / CUDA kernel and the autograd kernel of op ``name`` are native code (registered from a
    C++/CUDA source file).

    A kernel registered from Python (``custom_op(device_types=...)``, ``register_kernel``, ``register_autograd``)
    or the Python body as the default backend kernel does not count.
    """
    found = {"cpu": False, "cuda": False, "autograd": False}
    keys = {"CPU": "cpu", "CUDA": "cuda", "Autograd[alias]": "autograd"}
    for line in torch._C._dispatch_dump(name).splitlines():
        key, sep, rest = line.partition(": registered at ")
        if sep and key in keys:
            path = rest.split(" ::", 1)[0].rsplit(":", 1)[0]
            found[keys[key]] = not path.endswith(".py")
    return found


def kernel_info() -> dict:
    """Which ``torch.ops.panther`` ops have native CPU/CUDA kernels, plus torch, CUDA and device facts.

    Keys: extension ("loaded" or why not), extension_cuda (the build carries CUDA kernels), torch,
    cuda_runtime (torch's CUDA version or None), cuda_available, device, tf32_matmul,
    ops {name: {cpu, cuda, autograd}}.
    """
    cuda = torch.cuda.is_available()
    return {
        "extension": "loaded" if _state["loaded"] else f"not loaded ({_state['error']})",
        "extension_cuda": _state["loaded"] and torch._C._dispatch_has_kernel("panther::_cuda_fused_limits"),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "tf32_matmul": _tf32_matmul(),
        "ops": {name.split("::", 1)[1]: _native_kernels(name) for name in _panther_ops()},
    }


def _tf32_matmul() -> bool:
    """Whether fp32 CUDA matmuls may run in TF32. Once ``fp32_precision`` has been set, torch refuses to read
    the legacy ``allow_tf32`` ("mix of the legacy and new APIs"), so the new setting is read where it is set."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    return precision == "tf32" if precision != "none" else torch.backends.cuda.matmul.allow_tf32
