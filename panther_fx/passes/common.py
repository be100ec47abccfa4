"""What every graph pass needs: module paths of nodes, real values of placeholders, new constants on the
GraphModule, cached factorizations and the shared rewrite context."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from ..policy import Decision, Policy
from ..report import LayerReport, Report

__all__ = ["example_value", "module_path", "RewriteContext", "Factors", "FactorCache", "StaleFactorGuard",
           "TrainingRewriteError", "without_autocast"]

_ROOT = re.compile(r"^[LG]\['[^']*'\]\.?")
_INDEX = re.compile(r"\[(\d+)\]")


def example_value(node: Any) -> torch.Tensor | None:
    """The (fake) tensor Dynamo recorded for ``node``, or None (not a node, or not a tensor)."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced ``node``, relative to the compiled module.

    Dynamo records ``L['self'].encoder.layer.0.attention`` (the root name varies: ``L['self']``,
    ``L['fn']``, ``L['mod']``); the root is stripped and ``layer[0]`` normalised to ``layer.0``.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _INDEX.sub(r".\1", _ROOT.sub("", path))


# The root is the compiled module (L['self'], L['fn']), a closure's (L['m']) or a global (G['model']).
_STATE_SOURCE = re.compile(r"^[LG]\['[^']+'\]((?:\._modules\['[^']+'\])*)\._(?:parameters|buffers)\['[^']+'\]$")


def parameter_owner(node: Any) -> str | None:
    """Dotted path of the module that owns the parameter or buffer behind a placeholder (``L['self']._modules
    ['embed']._parameters['weight']`` -> ``embed``, ``''`` for the root), or None when the placeholder is not
    module state (an argument of the compiled function, a plain tensor attribute)."""
    grapharg = node.meta.get("grapharg") if isinstance(node, fx.Node) and node.op == "placeholder" else None
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    match = _STATE_SOURCE.match(name() if callable(name) else str(name)) if source is not None else None
    if match is None:
        return None
    return ".".join(re.findall(r"\['([^']+)'\]", match.group(1)))


def foreign_weight(node: fx.Node, weight_node: Any, path: str, layer: type, call: str) -> str | None:
    """Why the weight of ``node`` (a ``call`` such as ``F.linear`` at ``path``) is not the own weight of a
    ``layer`` module and must stay dense, or None.

    Factors are baked from a layer's weight: an argument of the compiled function changes from call to call
    (a refactorization per call, and a training error for a hypernetwork's output), and another module's
    parameter (a tied output head) cannot be protected by a rule on that module's path.
    """
    if not (isinstance(weight_node, fx.Node) and weight_node.op == "placeholder"):
        return None
    owner = parameter_owner(weight_node)
    if owner is None:
        return (f"{call} on an input of the compiled function, not a module's parameter or buffer: only "
                f"nn.{layer.__name__} layers are rewritten")
    caller = calling_module_type(node)
    if owner != path and not (caller and issubclass(caller, layer)):
        return (f"{call} on the parameter of {owner or '<root>'!r}, not of an nn.{layer.__name__} layer: only "
                f"nn.{layer.__name__} layers are rewritten")
    return None


def calling_module_type(node: fx.Node) -> type | None:
    """Class of the innermost module whose forward produced ``node``; None at the compiled callable's top level."""
    stack = node.meta.get("nn_module_stack")
    kind = list(stack.values())[-1][1] if stack else None
    return kind if isinstance(kind, type) else None


class TrainingRewriteError(RuntimeError):
    """A matched weight requires grad while grad mode is on: baked factors would silently stop training."""


def _state(weight: torch.Tensor) -> tuple:
    """What identifies a weight's values short of reading them: its storage, dtype, device and version counter.
    ``w.data = t`` and ``module.to(dtype)`` swap the storage without bumping ``_version``; writes through
    ``w.data`` bump a counter of their own and are not seen (docs/limitations.md)."""
    return weight.data_ptr(), weight.dtype, weight.device, _version(weight)


def _version(weight: torch.Tensor) -> int:
    # Inference tensors have no version counter, and cannot be changed outside inference mode anyway.
    return 0 if weight.is_inference() else weight._version


def without_autocast(weight: torch.Tensor) -> torch.autocast:
    """Autocast off on the weight's device, for factorizing it and measuring the error. The backend runs in
    the caller's context: under ``torch.autocast`` those matmuls would run in bf16 (a full-rank svd reported
    0.3% error instead of 1e-6), and the cached factors would then serve a later full-precision compile."""
    return torch.autocast(weight.device.type, enabled=False)


class Factors(dict):
    """A layer's factor tensors by name, and ``source``: the :func:`_state` of the weight whose factorization
    they hold now. Compiled graphs share one ``Factors`` through the cache, and a guard that refactors it in
    place for another weight updates ``source`` too, so every graph and the cache see whose factors they are."""

    def __init__(self, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        super().__init__(tensors)
        self.source = _state(weight)

    def holds(self, weight: torch.Tensor) -> bool:
        """Whether these are ``weight``'s factors (the per-call check: no state tuple is built)."""
        return weight.data_ptr() == self.source[0] and _version(weight) == self.source[3]


class FactorCache:
    """Factorizations keyed by (weight tensor, settings), valid while they hold that weight's factors: its
    storage, dtype, device and ``_version`` are unchanged and no guard has refactored them for another weight.
    Recompiles (dynamic shapes, train/eval flips) do not redo SVDs and a changed weight is refactored."""

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, weight: torch.Tensor, key: tuple, compute: Callable[[torch.Tensor], dict[str, torch.Tensor]]
            ) -> Factors:
        per_weight = self._entries.setdefault(weight, {})
        hit = per_weight.get(key)
        if hit is not None and hit.source == _state(weight):
            return hit
        with without_autocast(weight):
            per_weight[key] = Factors(compute(weight), weight)
        return per_weight[key]

    def clear(self) -> None:
        self._entries = WeakIdKeyDictionary()


@dataclass
class _Watched:
    path: str
    weight: torch.Tensor
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    factors: Factors  # the graph's buffers, shared with other graphs of the same weight through the cache
    input_index: Optional[int]  # the weight's position among the graph's inputs, when it is one


class StaleFactorGuard:
    """Refactors, into the same buffers, the factors of a weight that is not the one they were computed from.

    Two ways that happens: the weight changed after compilation (in place, or its storage was swapped), or
    Dynamo reuses the graph for another instance of the same module class (parameters are graph inputs,
    guarded on shape and dtype, not identity), which passes its own weights in as inputs. Compiled graphs take
    the factor buffers by reference (as static inputs under CUDA graphs), so updating them in place keeps the
    compiled code valid without a recompile.
    """

    def __init__(self) -> None:
        self._watched: list[_Watched] = []

    def watch(self, path: str, weight: torch.Tensor, compute, factors: Factors, input_index: Optional[int]) -> None:
        self._watched.append(_Watched(path, weight, compute, factors, input_index))

    def __bool__(self) -> bool:
        return bool(self._watched)

    def check(self, inputs: Sequence[Any]) -> None:
        """Before a call with the graph's runtime ``inputs``."""
        for w in self._watched:
            current = w.weight
            if w.input_index is not None and isinstance(inputs[w.input_index], torch.Tensor):
                current = inputs[w.input_index]
            # The per-call fast path (every forward): same storage and version. Another tensor (another instance's
            # weight, a swapped storage) and a dtype or device change all come with a new storage. The source is
            # the shared one: another graph may have refactored these buffers for its own weight meanwhile.
            if w.factors.holds(current):
                continue
            with torch.no_grad(), without_autocast(current):
                for name, value in w.compute(current).items():
                    w.factors[name].copy_(value)
            w.factors.source = _state(current)
            w.weight = current
            warnings.warn(f"panther: the weight of {w.path!r} is not the one its factors were computed from (it "
                          "changed after compilation, or the compiled graph runs another instance of the same "
                          "module class); they were recomputed. Training belongs in panther_fx.convert.",
                          RuntimeWarning, stacklevel=3)


@dataclass
class RewriteContext:
    """State shared by the passes over one Dynamo graph."""

    gm: fx.GraphModule
    example_inputs: Sequence[Any]
    policy: Policy
    cache: FactorCache
    allow_training: bool = False
    calibration: Any = None
    report: Report = field(default_factory=Report)
    decisions: list[Decision] = field(default_factory=list)
    guard: StaleFactorGuard = field(default_factory=StaleFactorGuard)
    _values: dict[fx.Node, Any] = field(default_factory=dict)
    _factor_nodes: dict[int, dict[str, fx.Node]] = field(default_factory=dict)
    _recorded: set[tuple[str, int]] = field(default_factory=set)
    _counter: int = 0

    def __post_init__(self) -> None:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self._values = dict(zip(placeholders, self.example_inputs))
        self._input_index = {id(v): i for i, v in enumerate(self.example_inputs) if isinstance(v, torch.Tensor)}

    def real_value(self, node: Any) -> torch.Tensor | None:
        """The real tensor behind a placeholder (a parameter or buffer of the model), else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            value = self._values.get(node)
            return value if isinstance(value, torch.Tensor) else None
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value = getattr(self.gm, node.target, None)
            return value if isinstance(value, torch.Tensor) else None
        return None

    def add_constant(self, hint: str, tensor: torch.Tensor) -> fx.Node:
        """Register ``tensor`` as a buffer of the GraphModule and return a ``get_attr`` node for it.

        aot_autograd asserts that every parameter or buffer of a Dynamo graph has an entry in
        ``gm._param_name_to_source``; the entry also marks the buffer static for CUDA graphs.
        """
        name = f"_panther_{re.sub(r'[^0-9a-zA-Z_]', '_', hint)}_{self._counter}"
        self._counter += 1
        self.gm.register_buffer(name, tensor)
        if hasattr(self.gm, "_param_name_to_source"):
            from torch._dynamo.source import ConstantSource

            self.gm._param_name_to_source[name] = ConstantSource(name)
        return self.gm.graph.get_attr(name)

    def factor_nodes(self, path: str, weight: torch.Tensor, factors: Factors,
                     compute: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, fx.Node]:
        """``get_attr`` nodes for a layer's factors, created at the current insertion point on first use.

        Layers that share a weight get the same cached factors and so share these nodes (one copy of the
        buffers); the guard refactors them in place if the weight changes after compilation.
        """
        if id(factors) not in self._factor_nodes:
            self._factor_nodes[id(factors)] = {name: self.add_constant(f"{path}_{name}", t)
                                               for name, t in factors.items()}
            self.guard.watch(path, weight, compute, factors, self._input_index.get(id(weight)))
        return self._factor_nodes[id(factors)]

    def replace_node(self, node: fx.Node, new: fx.Node) -> None:
        """Route every use of ``node`` to ``new`` (which inherits its meta: module stack, example value)."""
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def check_trainable(self, path: str, weight: torch.Tensor) -> None:
        """Refuse (or, with ``allow_training``, warn) to bake factors of a weight that is being trained."""
        if not (weight.requires_grad and torch.is_grad_enabled()):
            return
        message = (f"panther: layer {path!r} matches the policy but its weight requires grad and grad mode "
                   "is on. The backend bakes factors from frozen weights, so this layer would silently "
                   "stop training.")
        if not self.allow_training:
            raise TrainingRewriteError(
                message + " For inference call the model under torch.no_grad() / torch.inference_mode() "
                "or use model.requires_grad_(False); to train sketched layers use panther_fx.convert(model, "
                "policy); options={'allow_training': True} rewrites anyway with frozen factors.")
        warnings.warn(message + " allow_training=True: its factors are frozen.", UserWarning, stacklevel=2)

    def record(self, decision: Decision, entry: LayerReport, weight: torch.Tensor | None = None) -> None:
        """Add a layer's decision and report row; with ``weight``, a row only for its first call site (a layer
        called twice, or reachable at two paths, is one layer: its parameters count once)."""
        self.decisions.append(decision)
        if weight is not None:
            if (entry.op, id(weight)) in self._recorded:
                return
            self._recorded.add((entry.op, id(weight)))
        self.report.append(entry)

    def keep_dense(self, path: str, op: str, weight: torch.Tensor | None, reason: str) -> None:
        """A layer the pass sees but cannot rewrite: a dense row with ``reason``, its weight counted in the
        totals, and the rule that selects it counted as used (it did match a layer)."""
        if weight is None:  # nothing to count or to decide on
            self.report.append(LayerReport(path, op, "dense", (), "dense", reason=reason))
            return
        shape, size = tuple(weight.shape), weight.numel()
        decision = self.policy.decide(path, op, in_features=size // max(shape[0], 1), out_features=shape[0])
        self.record(replace(decision, method="dense", reason=reason),
                    LayerReport(path, op, "dense", shape, "dense", reason=reason, params_before=size,
                                params_after=size))
