"""Explicit, reproducible randomness: generators from seeds, never the global RNG."""

from __future__ import annotations

import zlib

import torch

__all__ = ["as_generator", "layer_generator", "random_signs"]


def as_generator(seed_or_generator: int | torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator``: the one given, or a new one seeded with ``seed_or_generator`` (0 for None)."""
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator(device=device).manual_seed(int(seed_or_generator or 0))


def layer_generator(seed: int, path: str) -> torch.Generator:
    """A CPU generator for one layer: the policy seed mixed with a stable hash of the module path, so
    layers get different draws and a run is reproducible across processes (``hash()`` is salted)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63))


def random_signs(shape: tuple[int, ...], *, generator: torch.Generator, scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries ±scale with probability 1/2 each, drawn on the generator's device then moved."""
    bits = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (bits.to(dtype).mul_(2).sub_(1).mul_(scale)).to(device)
