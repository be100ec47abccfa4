"""Seeded initialisation shared by the panther modules.

Draws happen on the generator's device (the CPU for an integer seed) and are then moved, so a seed gives the
same layer on every device, and a CPU generator can initialise a CUDA layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_int
from ..linalg import as_generator

Seed = int | torch.Generator | None


def seeded_generator(seed: Seed) -> torch.Generator:
    """The generator for ``seed``; None draws a seed from the default generator (honours torch.manual_seed)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return as_generator(seed)


def uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator, *, device, dtype) -> Tensor:
    """U(±bound) of ``shape``, drawn on the generator's device, returned on ``device``."""
    return torch.empty(shape, dtype=dtype, device=generator.device).uniform_(-bound, bound, generator=generator).to(device)


def check_sizes(where: str, **sizes) -> None:
    """Raise a ValueError naming ``where`` unless every size (a rank, num_terms, low_rank) is an integer >= 1."""
    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{where}: {name}={value!r} must be an integer >= 1")
