"""Autocast for panther ops: behave like the ATen op they replace.

``torch.library.register_autocast`` casts to one fixed dtype, which would silently change precision
(bf16 autocast would run a op registered for fp16 in fp16). Linear, conv and attention run in the
*current* autocast dtype, so these kernels read it at call time.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_to_lower_precision"]

_LIB = torch.library.Library("panther", "IMPL")


def _cast(value, device_type: str, dtype: torch.dtype):
    # float64 is left alone, as ATen's autocast does (its is_eligible): a float64 layer stays float64.
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == device_type):
        return value.to(dtype)
    return value


def autocast_to_lower_precision(qualname: str, cast_args: int | None = None) -> None:
    """Under ``torch.autocast``, cast the op's floating inputs to the autocast dtype (as for aten.linear);
    only the first ``cast_args`` positional arguments when given (attention: q, k, v, as for SDPA)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, excluded=excluded, **kwargs):
            dtype = torch.get_autocast_dtype(device_type)
            n = len(args) if cast_args is None else cast_args
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*(_cast(a, device_type, dtype) if i < n else a for i, a in enumerate(args)), **kwargs)

        _LIB.impl(name, kernel, key, with_keyset=True)
