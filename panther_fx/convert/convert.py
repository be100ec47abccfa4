"""Eager module swap: replace the layers a policy selects by trainable panther modules.

The decisions, factorizations and report rows come from the same code as the ``panther`` backend
(:func:`panther_fx.passes.plan_linear`); only the destination differs (``nn.Parameter`` factors in modules
instead of constants in a graph). Module types are dispatched through :data:`CONVERTERS`, a dict from an
exact module type to a converter function, so other layer kinds are added with one entry each.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence, overload

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..linalg import layer_generator
from ..nn.attention import RandMultiheadAttention
from ..nn.conv import LowRankConv2d, SKConv2d
from ..nn.linear import LowRankLinear, SKLinear
from ..passes import FactorCache, plan_conv2d, plan_linear
from ..policy import Decision, Policy, PolicyError, exact_pattern, load_policy
from ..report import LayerReport, Report

__all__ = ["CONVERTERS", "ConversionError", "ConvertContext", "Converted", "applied_policy", "convert",
           "convertible_layers"]

POLICY_ATTR = "panther_policy"
"""Attribute of the root module where :func:`convert` leaves the layers it rewrote, as the policy that
rebuilds them (:func:`applied_policy`; read by ``save``)."""


class ConversionError(PolicyError):
    """A policy rule names a module that cannot be converted. The message names the layer and the rule."""


@dataclass
class Converted:
    """A converter's answer: the replacement module (None keeps the original), its decision and report row."""

    module: nn.Module | None
    decision: Decision | None = None
    report: LayerReport | None = None


@dataclass
class ConvertContext:
    """What converters share: the policy, a factor cache, calibration batches and tied-parameter owners."""

    policy: Policy
    calibration: Any = None
    cache: FactorCache = field(default_factory=FactorCache)
    owners: dict[int, list[tuple[str, int]]] = field(default_factory=dict)  # id(param) -> [(path, id(module))]
    uncalibrated: list[str] = field(default_factory=list)  # asvd layers of [defaults] left dense: no Gram matrix

    def rule_error(self, decision: Decision, module: nn.Module, why: str) -> ConversionError:
        rule = self.policy.rules[decision.rule_index - 1]
        return ConversionError(f"{self.policy.source}: rule {rule.index} (match = {rule.match!r}) selects "
                               f"{decision.path!r} ({type(module).__name__}) for method {decision.method!r}, "
                               f"but it cannot be converted: {why}")


Converter = Callable[[ConvertContext, str, nn.Module], Converted]

_CALIBRATE = "convert(..., calibration=panther_fx.calibration.calibrate(model, batches))"


def _warn_uncalibrated(ctx: ConvertContext) -> None:
    """One warning for all [defaults] asvd layers left dense (a rule naming asvd raises instead): without it
    a policy whose only method is asvd converts nothing, silently."""
    paths = ctx.uncalibrated
    if paths:
        shown = ", ".join(map(repr, paths[:4])) + (", ..." if len(paths) > 4 else "")
        warnings.warn(f"{ctx.policy.source}: [defaults] method = 'asvd' left {len(paths)} "
                      f"layer{'s' if len(paths) > 1 else ''} dense ({shown}): no calibration Gram matrix; pass "
                      f"{_CALIBRATE}", UserWarning, stacklevel=3)


def _named_by_rule(decision: Decision) -> bool:
    return decision.rule_index is not None and decision.method != "dense"


def _names_exactly(ctx: ConvertContext, decision: Decision) -> bool:
    """Whether the rule that decided ``decision`` spells out its layer's path. A glob (``**``, ``*.**``: what
    the tuner writes for groups) only covers the layers it can; a layer it cannot factorize stays dense with a
    reason. A rule that names the layer itself asks for something impossible, which is an error."""
    return _named_by_rule(decision) and ctx.policy.rules[decision.rule_index - 1].match == decision.path


def _tied(owners: dict[int, list[tuple[str, int]]], module: nn.Module) -> list[str]:
    """Parameters of other modules that are ``module.weight``: converting it would untie them. (The same
    module reachable at two paths is not a tie: it is converted once and stays shared.)"""
    return [p for p, owner in owners.get(id(module.weight), []) if owner != id(module)]


def _tied_why(tied: list[str]) -> str:
    return f"its weight is shared with {', '.join(map(repr, tied))}; converting it would untie them"


OUT_PROJ_WHY = "it is nn.MultiheadAttention's out_proj, whose weight MHA reads directly (use op = 'attention')"


def _subclass_why(module: nn.Module) -> str:
    base = "nn.Conv2d" if isinstance(module, nn.Conv2d) else "nn.Linear"
    return (f"{type(module).__name__} subclasses {base} and may compute something else in forward; register a "
            "converter in CONVERTERS")


def convert_linear(ctx: ConvertContext, path: str, module: nn.Module) -> Converted:
    """nn.Linear -> :class:`LowRankLinear` (svd, asvd) or :class:`SKLinear` (sketch) per the policy."""
    plan = plan_linear(path, module.weight, ctx.policy, ctx.cache, calibration=ctx.calibration)
    decision = plan.decision
    if not decision.rewrites:
        O, I = module.weight.shape
        wanted = ctx.policy.decide(path, "linear", in_features=I, out_features=O)
        if wanted.method == "asvd":  # plan_linear turned it dense: no calibration Gram matrix for this layer
            if decision.rule_index is not None:
                raise ctx.rule_error(wanted, module, f"{decision.reason} ({_CALIBRATE})")
            ctx.uncalibrated.append(path)  # [defaults]: warned once for all such layers after the walk
    if plan.factors is None:
        return Converted(None, decision, plan.report)
    tied = _tied(ctx.owners, module)
    if tied:
        why = _tied_why(tied)
        if _names_exactly(ctx, decision):
            raise ctx.rule_error(decision, module, why)
        return Converted(None, decision, _dense_row(plan.report, why))
    bias = None if module.bias is None else module.bias.detach()
    if decision.method == "sketch":
        f = plan.factors
        new = SKLinear.from_factors(f["S1"], f["S2"], f["U1"], f["U2"], bias)
        factor_params = (new.S1s, new.S2s)
    else:
        new = LowRankLinear.from_factors(plan.factors["A"], plan.factors["B"], bias)
        factor_params = (new.A, new.B)
    for p in factor_params:  # frozen layers stay frozen
        p.requires_grad_(module.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    return Converted(new.train(module.training), decision, plan.report)


def convert_conv2d(ctx: ConvertContext, path: str, module: nn.Module) -> Converted:
    """nn.Conv2d -> :class:`LowRankConv2d` (svd) or :class:`SKConv2d` (sketch), geometry and bias kept."""
    plan = plan_conv2d(path, module.weight, ctx.policy, ctx.cache, groups=module.groups)
    if plan.factors is None:
        return Converted(None, plan.decision, plan.report)
    tied = _tied(ctx.owners, module)
    if tied:
        why = _tied_why(tied)
        if _names_exactly(ctx, plan.decision):
            raise ctx.rule_error(plan.decision, module, why)
        return Converted(None, plan.decision, _dense_row(plan.report, why))
    new = (SKConv2d if plan.decision.method == "sketch" else LowRankConv2d).from_factors(module, plan.factors)
    for name, p in new.named_parameters():  # frozen layers stay frozen
        p.requires_grad_((module.bias if name == "bias" else module.weight).requires_grad)
    return Converted(new.train(module.training), plan.decision, plan.report)


def convert_mha(ctx: ConvertContext, path: str, module: nn.Module) -> Converted:
    """nn.MultiheadAttention -> :class:`RandMultiheadAttention` (Performer) with the same projections; the
    features are seeded per layer from the policy seed and the path, as in the backend."""
    decision = ctx.policy.decide(path, "attention")
    shape = (module.num_heads, module.head_dim)
    if not decision.rewrites:
        return Converted(None, decision, LayerReport(path, "attention", "dense", shape, "dense", reason=decision.reason))
    try:
        new = RandMultiheadAttention.from_dense(module, num_features=decision.features, kernel=decision.kernel,
                                                seed=layer_generator(decision.seed, path))
    except ValueError as e:
        if _named_by_rule(decision):
            raise ctx.rule_error(decision, module, str(e)) from None
        return Converted(None, decision, LayerReport(path, "attention", "dense", shape, "dense", reason=str(e)))
    dense_params = dict(module.named_parameters())
    for name, p in new.named_parameters():  # frozen layers stay frozen, parameter by parameter
        if name in dense_params:
            p.requires_grad_(dense_params[name].requires_grad)
    row = LayerReport(path, "attention", "performer", shape, "rewritten", reason=f"kernel={decision.kernel}",
                      rank=decision.features)
    return Converted(new, decision, row)


def _dense_row(row: LayerReport, reason: str) -> LayerReport:
    n = row.params_before
    return LayerReport(row.path, row.op, "dense", row.shape, "dense", reason=reason, params_before=n, params_after=n)


def _plan(ctx: ConvertContext, path: str, module: nn.Module):
    if isinstance(module, nn.Conv2d):
        return plan_conv2d(path, module.weight, ctx.policy, ctx.cache, groups=module.groups)
    return plan_linear(path, module.weight, ctx.policy, ctx.cache, calibration=ctx.calibration)


def _refuse_layer(ctx: ConvertContext, path: str, module: nn.Module, why: str) -> Converted:
    """Report a Linear / Conv2d that stays dense although the policy selects it; an error if a rule names it."""
    plan = _plan(ctx, path, module)
    if _names_exactly(ctx, plan.decision):
        raise ctx.rule_error(plan.decision, module, why)
    if plan.factors is None:
        return Converted(None, plan.decision, plan.report)
    return Converted(None, plan.decision, _dense_row(plan.report, why))


def refuse_mha_linear(ctx: ConvertContext, path: str, module: nn.Module) -> Converted:
    """``nn.MultiheadAttention.out_proj``: MHA reads its weight directly, so it cannot be swapped alone."""
    return _refuse_layer(ctx, path, module, OUT_PROJ_WHY)


def refuse_layer_subclass(ctx: ConvertContext, path: str, module: nn.Module) -> Converted:
    """A subclass of nn.Linear / nn.Conv2d without its own converter: its forward may compute something else."""
    return _refuse_layer(ctx, path, module, _subclass_why(module))


CONVERTERS: dict[type[nn.Module], Converter] = {
    nn.Linear: convert_linear,
    nn.Conv2d: convert_conv2d,
    nn.MultiheadAttention: convert_mha,
    NonDynamicallyQuantizableLinear: refuse_mha_linear,
}
"""Exact module type -> converter. Subclasses are not converted implicitly: their ``forward`` may differ."""


def _naming_rule(policy: Policy, path: str):
    """The first rule that spells out ``path`` for a non-dense method, unless an earlier matching ``dense``
    rule protects it. A module without a converter that a rule names this way is an error; one a glob merely
    covers (a container, an activation, a user block) is walked into."""
    for rule in policy.rules:
        if not rule.matches(path):
            continue
        if rule.settings.get("method", policy.defaults.get("method")) == "dense":
            return None
        if rule.match == path:
            return rule
    return None


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, int]]]:
    owners: dict[int, list[tuple[str, int]]] = {}
    for path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{path}.{name}" if path else name, id(module)))
    return owners


def convertible_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, str | None]]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` (subclasses included) as ``(path, module, op, why)``:
    ``why`` is None for a layer that :func:`convert` factorizes when a policy selects it, else the reason it
    stays dense (MHA's out_proj, a subclass, a weight tied to another module). :func:`panther_fx.tune`
    searches exactly the layers without a ``why``, so every policy it writes converts."""
    owners = _parameter_owners(model)
    layers = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        converter = CONVERTERS.get(type(module))
        if converter is refuse_mha_linear:
            why = OUT_PROJ_WHY
        elif converter not in (convert_linear, convert_conv2d):
            why = _subclass_why(module)
        else:
            tied = _tied(owners, module)
            why = _tied_why(tied) if tied else None
        layers.append((path, module, "conv2d" if isinstance(module, nn.Conv2d) else "linear", why))
    return layers


def _fused_path_intact(layer: nn.TransformerEncoderLayer) -> bool:
    attn = layer.self_attn
    return (type(attn) is nn.MultiheadAttention and type(attn.out_proj) is NonDynamicallyQuantizableLinear
            and type(layer.linear1) is nn.Linear and type(layer.linear2) is nn.Linear)


def disable_fused_paths(model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """Turn off PyTorch's fused inference paths where a panther module replaced a layer they read.

    In eval mode without grad, ``nn.TransformerEncoderLayer`` calls one fused kernel with ``linear1.weight``,
    ``self_attn.in_proj_weight``, ... read directly (an AttributeError once those are factored), and
    ``nn.TransformerEncoder`` packs padded input into a nested tensor, which the Performer cannot take.
    ``activation_relu_or_gelu = 0`` is the per-layer switch (it only picks the fused kernel's activation) and
    ``use_nested_tensor = False`` the encoder's. Returns ``(module, attribute, old value)`` for each change."""
    changed = []
    altered = {id(m) for m in model.modules()
               if isinstance(m, nn.TransformerEncoderLayer) and not _fused_path_intact(m)}
    for module in model.modules():
        if id(module) in altered and module.activation_relu_or_gelu:
            changed.append((module, "activation_relu_or_gelu", module.activation_relu_or_gelu))
        elif (isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False)
              and any(id(layer) in altered for layer in module.layers)):
            changed.append((module, "use_nested_tensor", True))
    for module, attr, _ in changed:
        setattr(module, attr, 0 if attr == "activation_relu_or_gelu" else False)
    return changed


def _refuse_if_named(ctx: ConvertContext, path: str, module: nn.Module) -> None:
    rule = _naming_rule(ctx.policy, path)
    if rule is not None:
        supported = ", ".join(sorted(t.__name__ for t in CONVERTERS))
        op = "" if rule.op is None else f", op = {rule.op!r}"
        hint = f"; to cover the layers inside it, match '{path}.**'" if next(module.children(), None) else ""
        raise ConversionError(f"{ctx.policy.source}: rule {rule.index} (match = {rule.match!r}{op}) selects "
                              f"{path!r} ({type(module).__name__}), which convert cannot turn into a panther "
                              f"module (it converts: {supported}){hint}")


def _walk(ctx: ConvertContext, parent: nn.Module, prefix: str, done: dict[int, nn.Module | None],
          report: Report, decisions: list[Decision]) -> None:
    # _modules, not named_children(): that skips a module already seen under this parent, which would leave a
    # second name for a converted layer (Sequential(lin, act, lin), self.b = self.a) dense and still in use.
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if id(child) in done:  # a module reachable at two paths is converted once and stays shared
            if done[id(child)] is not None:
                setattr(parent, name, done[id(child)])
            continue
        converter = CONVERTERS.get(type(child))
        if converter is None and isinstance(child, (nn.Linear, nn.Conv2d)):
            converter = refuse_layer_subclass
        result = converter(ctx, path, child) if converter is not None else Converted(None)
        if converter is None:
            _refuse_if_named(ctx, path, child)
        done[id(child)] = result.module
        if result.decision is not None:
            decisions.append(result.decision)
        if result.report is not None:
            report.append(result.report)
        if result.module is not None:
            setattr(parent, name, result.module)
        else:
            _walk(ctx, child, path, done, report, decisions)


@overload
def convert(model: nn.Module, policy: Any, *, calibration: Any = ..., inplace: Literal[True] = ...) -> Report: ...
@overload
def convert(model: nn.Module, policy: Any, *, calibration: Any = ...,
            inplace: Literal[False]) -> tuple[nn.Module, Report]: ...


def convert(model: nn.Module, policy: Any, *, calibration: Any = None,
            inplace: bool = True) -> Report | tuple[nn.Module, Report]:
    """Swap the layers ``policy`` selects for panther modules whose factors are ``nn.Parameter``s.

    ``policy``: TOML path, dict or :class:`~panther_fx.Policy` (the same as the backend's ``policy``
    option); ``calibration``: the per-layer input Gram matrices for ``asvd`` that
    :func:`panther_fx.calibration.calibrate` returns, as for the backend.
    Returns the per-layer :class:`~panther_fx.Report`; with ``inplace=False`` the model is deep-copied first
    and ``(converted_copy, report)`` is returned, the original left untouched. The layers rewritten so far, by
    this and earlier calls, are remembered on the root module as the policy that rebuilds them
    (``model.panther_policy``, see :func:`applied_policy`) for :func:`panther_fx.save`.

    Raises :class:`ConversionError` (a ``PolicyError``) when a rule names a module it cannot convert.
    """
    if type(model) in CONVERTERS:
        raise ValueError(f"convert swaps submodules in place; wrap the bare {type(model).__name__} in a container "
                         "(e.g. nn.Sequential) or build the panther module with its from_dense")
    policy = load_policy(policy)
    target = model if inplace else copy.deepcopy(model)
    ctx = ConvertContext(policy, calibration=calibration, owners=_parameter_owners(target))
    report, decisions = Report(), []
    with torch.no_grad():
        _walk(ctx, target, "", {}, report, decisions)
    disable_fused_paths(target)
    _warn_uncalibrated(ctx)
    if policy.rules:
        policy.warn_unused(decisions)
    setattr(target, POLICY_ATTR, applied_policy(getattr(target, POLICY_ATTR, None), decisions))
    return report if inplace else (target, report)


def applied_policy(previous: Policy | None, decisions: Sequence[Decision]) -> Policy:
    """The layers :func:`convert` has rewritten, as a policy that rebuilds exactly them from the dense model:
    ``previous`` (an earlier convert's) plus one exact-path rule per rewritten layer with its resolved
    settings (integer rank, ``force``), every other layer dense.

    :func:`~panther_fx.save` stores it, so :func:`~panther_fx.load` needs neither the user's policies (after
    two converts the model carried only the last) nor defaults that may change, nor calibration: an asvd
    layer is rebuilt as svd of the same rank, whose factors the saved ones then replace.
    """
    rules = list(previous.to_dict()["rule"]) if previous is not None else []
    for d in decisions:
        if d.rewrites:
            rules.append({"match": exact_pattern(d.path), "op": d.op, **_resolved_settings(d)})
    return Policy.from_dict({"defaults": {"method": "dense"}, "rule": rules}, source="<converted layers>")


def _resolved_settings(d: Decision) -> dict[str, Any]:
    if d.method == "performer":
        return {"method": "performer", "features": d.features, "kernel": d.kernel, "seed": d.seed}
    fixed = {"force": True, "min_features": 0}  # rebuilt whatever the break-even or size rules say
    if d.method == "sketch":
        return {"method": "sketch", "num_terms": d.num_terms, "low_rank": d.low_rank, "seed": d.seed, **fixed}
    return {"method": "svd", "rank": d.rank, **fixed}
