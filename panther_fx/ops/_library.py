"""Definition of the panther ops: schema, Python body, fake kernel, autograd formula.

``torch.library.custom_op`` runs a Python autograd wrapper on every call: for ``panther::lowrank_linear`` on a CPU
(torch 2.13) it doubled a one-token forward (22 against 11 µs) and a forward+backward (322 against 155 µs;
``benchmarks/call_overhead.py``), and on a GPU it is host time in front of every launch. The ops are therefore
defined with ``Library.define``: the Python body is the CompositeExplicitAutograd kernel (the reference, and the
fallback on every device), the extension adds native CPU/CUDA kernels and, for the linear and attention ops, C++
autograd kernels (csrc/autograd.cpp), so that a call of those stays in C++. The Python autograd formula is
registered for every op the extension gave no autograd kernel (the conv and sketch ops, and all ops when the
extension is not built or is disabled with ``PANTHER_NO_EXT=1``).

The extension is loaded before any op is defined (``panther_fx/ops/__init__.py``): the dispatcher keeps its
registrations until the schemas arrive, and :func:`register_autograd` can then see them.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["check_no_double_backward", "define_op", "register_autograd"]

_LIB = torch.library.Library("panther", "FRAGMENT")


def define_op(schema: str, body: Callable, fake: Callable) -> torch._ops.OpOverloadPacket:
    """Define ``panther::<schema>`` with ``body`` as its default kernel and ``fake`` for tracing; returns
    ``torch.ops.panther.<name>``."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, body, "CompositeExplicitAutograd")
    torch.library.register_fake(f"panther::{name}", fake, lib=_LIB)
    return getattr(torch.ops.panther, name)


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """The Python autograd formula of ``panther::<name>``, unless the extension registered a C++ one."""
    qualname = f"panther::{name}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)


def check_no_double_backward(name: str) -> None:
    """The backward ops have no derivatives of their own: refuse ``create_graph=True`` with a clear error
    (the C++ autograd kernels raise the same one)."""
    torch._check(not torch.is_grad_enabled(), lambda: f"panther::{name}: double backward (create_graph=True) "
                 "is not supported")
