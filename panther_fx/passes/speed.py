"""The policy key ``min_speedup``: time a layer dense and rewritten at compile time, keep the faster.

When a decision carries ``min_speedup``, the graph pass runs the dense op and the panther op on a random input
of the layer's input shape (its dtype and device; for dynamic dims the example shape Dynamo traced with), under
``torch.no_grad()``, interleaved, and compares medians (CUDA events on CUDA). The layer stays dense with the
measured figures in its report row unless dense_ms / op_ms >= min_speedup. The input comes from a local
generator: the global RNG is not touched.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..policy import Decision

__all__ = ["SPEED_WARMUP", "SPEED_REPEATS", "NOT_MEASURED", "check_speed", "check_speed_on", "example_shape",
           "median_ms", "random_input"]

NOT_MEASURED = "min_speedup not checked: the input shape is unknown"

SPEED_WARMUP = 2
SPEED_REPEATS = 7


def example_shape(meta: Any) -> tuple[int, ...] | None:
    """The concrete shape of a node's example value (a dynamic dim by the size Dynamo traced with), or None."""
    if not isinstance(meta, torch.Tensor):
        return None
    shape = []
    for size in meta.shape:
        if isinstance(size, torch.SymInt):
            hint = size.node.hint
            if hint is None:
                return None
            size = hint
        shape.append(int(size))
    return tuple(shape)


def random_input(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = SPEED_WARMUP,
              repeats: int = SPEED_REPEATS) -> dict[str, float]:
    """Median milliseconds of each function, run interleaved (one call of each per round) after ``warmup``
    rounds; CUDA events on CUDA. Also the timer of benchmarks/attention.py."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_once_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def check_speed(decision: Decision, dense: Callable[[], object], op: Callable[[], object], device: torch.device,
                inputs: str) -> tuple[float, str | None]:
    """(measured dense / op speedup, why the layer stays dense or None) for ``decision.min_speedup``;
    ``inputs`` describes what was timed, for the reason."""
    with torch.no_grad():
        ms = median_ms({"dense": dense, "op": op}, device)
    speedup = ms["dense"] / ms["op"]
    if speedup >= decision.min_speedup:
        return speedup, None
    return speedup, (f"measured {speedup:.2f}x dense < min_speedup = {decision.min_speedup:g} ({decision.origin}): "
                     f"op {ms['op']:.3f} ms, dense {ms['dense']:.3f} ms on {inputs} {device}")


def describe(shape: Sequence[int], dtype: torch.dtype) -> str:
    return f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"


def check_speed_on(decision: Decision, example: torch.Tensor | None, dense: Callable[[torch.Tensor], object],
                   op: Callable[[torch.Tensor], object], device: torch.device) -> tuple[float | None, str | None]:
    """:func:`check_speed` for a layer with one input, timed on a random tensor of ``example``'s shape;
    (None, None) when that shape is unknown."""
    shape = example_shape(example)
    if shape is None:
        return None, None
    x = random_input(shape, example.dtype, device)
    return check_speed(decision, lambda: dense(x), lambda: op(x), device, f"input {describe(shape, example.dtype)}")
