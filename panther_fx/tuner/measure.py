"""Applying a candidate policy to a working copy of the model, and measuring what it costs.

Candidates are applied by an eager module swap through :func:`panther_fx.passes.plan_linear` and
:func:`~panther_fx.passes.plan_conv2d` (the matcher and factorization code paths the backend uses), with
factorizations cached across trials, and undone after each trial so one working copy serves the whole search.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import ops  # noqa: F401  (registers torch.ops.panther.*)
from ..batches import call_model
from ..convert import convertible_layers
from ..convert.convert import disable_fused_paths
from ..nn.conv import LowRankConv2d, SKConv2d
from ..passes import ConvPlan, FactorCache, LinearPlan, plan_conv2d, plan_linear
from ..policy import Policy
from ..report import LayerReport, Report

__all__ = ["FactoredLinear", "applied", "Costs", "measure_costs", "latency_ms", "peak_memory_bytes", "plan_layer"]

LATENCY_WARMUP = 2
LATENCY_REPEATS = 7


class FactoredLinear(nn.Module):
    """A Linear whose weight is replaced by factors: ``panther.lowrank_linear`` (svd: A (O, r), B (r, I))
    or ``panther.sketched_linear`` (sketch: S1, S2, U1, U2). Factors are buffers; the bias is shared."""

    def __init__(self, method: str, factors: Mapping[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.method = method
        for name, tensor in factors.items():
            self.register_buffer(name, tensor, persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "sketch":
            return torch.ops.panther.sketched_linear(x, self.S1, self.S2, self.U1, self.U2, self.bias)
        return torch.ops.panther.lowrank_linear(x, self.A, self.B, self.bias)


_FACTORED = (FactoredLinear, LowRankConv2d, SKConv2d)


def plan_layer(path: str, module: nn.Module, policy: Policy, cache: FactorCache) -> LinearPlan | ConvPlan:
    """The backend's plan for a Linear or Conv2d layer under ``policy`` (decision, factors, report row)."""
    if isinstance(module, nn.Conv2d):
        return plan_conv2d(path, module.weight, policy, cache, groups=module.groups)
    return plan_linear(path, module.weight, policy, cache)


def _factored(module: nn.Module, plan: LinearPlan | ConvPlan) -> nn.Module:
    if isinstance(plan, ConvPlan):
        return (SKConv2d if plan.decision.method == "sketch" else LowRankConv2d).from_factors(module, plan.factors)
    return FactoredLinear(plan.decision.method, plan.factors, module.bias)


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, name) that holds it: a layer may sit under several names."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, name))
    return places


@contextlib.contextmanager
def applied(model: nn.Module, policy: Policy, cache: FactorCache) -> Iterator[Report]:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` the policy rewrites for a :class:`FactoredLinear` /
    :class:`~panther_fx.nn.LowRankConv2d` / :class:`~panther_fx.nn.SKConv2d`; yield the per-layer report (all
    Linear and Conv2d layers); restore the original modules on exit, also on Ctrl-C.

    Layers :func:`panther_fx.convert` would leave dense (MHA's out_proj, subclasses, tied weights) stay dense
    here too, with its reason, so a trial measures the model that converting its policy gives."""
    report = Report()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    fused: list[tuple[nn.Module, str, object]] = []
    places = _places(model)
    try:
        for path, module, op, why in convertible_layers(model):
            if why is not None:
                n = module.weight.numel()
                report.append(LayerReport(path, op, "dense", tuple(module.weight.shape), "dense", reason=why,
                                          params_before=n, params_after=n))
                continue
            plan = plan_layer(path, module, policy, cache)
            report.append(plan.report)
            if plan.factors is None:
                continue
            if not path:
                raise ValueError(f"the model itself is an {type(module).__name__}: wrap it in a module to tune it")
            factored = _factored(module, plan)
            for parent, name in places[id(module)]:  # every name of a shared layer, as convert does
                parent._modules[name] = factored
                swapped.append((parent, name, module))
        fused = disable_fused_paths(model)
        yield report
    finally:
        for module, attr, value in reversed(fused):
            setattr(module, attr, value)
        for parent, name, module in reversed(swapped):
            parent._modules[name] = module


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_ms(model: nn.Module, example_inputs: Any, *, warmup: int = LATENCY_WARMUP,
               repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time of one forward over ``example_inputs`` on the model's device, after warm-up."""
    device = _device(model)
    for _ in range(warmup):
        call_model(model, example_inputs)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call_model(model, example_inputs)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by dispatched ops and still alive; records the peak.

    CPU tensors have no allocator statistics, so every op's outputs are counted once per storage and
    dropped when the storage dies (checked after each op). Temporaries inside a single op are not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # outputs that alias an input (views of weights or of inputs) allocate nothing
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = (storage._weak_ref(), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        for key, (ref, nbytes) in list(self.live.items()):
            if torch.UntypedStorage._expired(ref):
                torch.UntypedStorage._free_weak_ref(ref)
                del self.live[key]
                self.current -= nbytes
        return out


@torch.no_grad()
def peak_memory_bytes(model: nn.Module, example_inputs: Any) -> int:
    """Weight bytes of ``model`` (parameters and buffers) plus the peak activation bytes of one forward.

    On CUDA the activation peak comes from the allocator (``max_memory_allocated`` above the resident
    baseline); on CPU from :class:`_LiveBytes`."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}
    weights = sum(tensors.values())
    device = _device(model)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call_model(model, example_inputs)
        _sync(device)
        return weights + torch.cuda.max_memory_allocated(device) - base
    tracker = _LiveBytes()
    with tracker:
        call_model(model, example_inputs)
    peak = tracker.peak
    for ref, _ in tracker.live.values():
        torch.UntypedStorage._free_weak_ref(ref)
    return weights + peak


@dataclass(frozen=True)
class Costs:
    """Costs of one candidate: all parameters (factors counted as parameters), the weight parameters of the
    Linear and Conv2d layers (biases excluded), median latency (ms) and peak memory (bytes); latency and memory
    are None without example inputs."""

    params: int
    layer_params: int
    latency_ms: float | None
    memory_bytes: int | None


def measure_costs(model: nn.Module, report: Report, example_inputs: Any) -> Costs:
    """Costs of ``model`` with candidate modules in place; ``report`` is what :func:`applied` yielded."""
    params = sum(p.numel() for p in model.parameters())
    params += sum(b.numel() for m in model.modules() if isinstance(m, _FACTORED) for b in m.buffers(recurse=False))
    layers = report.params()[1]
    if example_inputs is None:
        return Costs(params, layers, None, None)
    return Costs(params, layers, latency_ms(model, example_inputs), peak_memory_bytes(model, example_inputs))
