"""Rewrite ``linear`` nodes whose module the policy selects into ``panther.lowrank_linear`` (svd, asvd) or
``panther.sketched_linear`` (sketch), with factors computed once from the real weight."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..linalg import asvd_factors, layer_generator, sketch_factors, sketch_weight, svd_factors, whitening
from ..policy import Decision, Policy, factored_params
from ..report import LayerReport
from .common import FactorCache, RewriteContext, example_value, foreign_weight, module_path, without_autocast
from .speed import NOT_MEASURED, check_speed_on

__all__ = ["LINEAR_TARGETS", "LinearPlan", "factorize_linear", "plan_linear", "relative_error", "rewrite_linear"]

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def factorize_linear(weight: torch.Tensor, decision: Decision, gram: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Factors of an (O, I) weight for ``decision``: {A, B} for svd and asvd (which needs the layer's input
    Gram matrix XᵀX (I, I), see :func:`panther_fx.calibration.calibrate`), {S1, S2, U1, U2} for sketch."""
    if decision.method == "asvd":
        if gram is None:
            raise ValueError(f"factorize_linear: method 'asvd' for {decision.path!r} needs its input Gram matrix")
        A, B = asvd_factors(weight, gram, decision.rank, damping=decision.damping)
        return {"A": A, "B": B}
    generator = layer_generator(decision.seed, decision.path)
    if decision.method == "svd":
        A, B = svd_factors(weight, decision.rank, oversample=decision.oversample, n_iter=decision.n_iter,
                           generator=generator)
        return {"A": A, "B": B}
    if decision.method == "sketch":
        S1, S2, U1, U2 = sketch_factors(weight, decision.num_terms, decision.low_rank, generator=generator)
        return {"S1": S1, "S2": S2, "U1": U1, "U2": U2}
    raise ValueError(f"factorize_linear: no factorization for method {decision.method!r}")


def dense_from_factors(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (O, I) weight that linear factors represent."""
    if "A" in factors:
        return factors["A"].float() @ factors["B"].float()
    return sketch_weight(*(factors[k].float() for k in ("S1", "S2", "U1", "U2")))


def relative_error(weight: torch.Tensor, factors: dict[str, torch.Tensor], gram: torch.Tensor | None = None,
                   damping: float | None = None) -> float:
    """‖W - Ŵ‖_F / ‖W‖_F; with ``gram`` = XᵀX the activation-weighted ‖(W - Ŵ) S‖_F / ‖W S‖_F, S Sᵀ = XᵀX + λI
    (the error on the calibration inputs, which is what asvd minimizes; ``damping`` sets λ as in
    :func:`~panther_fx.linalg.whitening`)."""
    if gram is None:
        W = weight.detach().float()
        return (torch.linalg.matrix_norm(W - dense_from_factors(factors)) / torch.linalg.matrix_norm(W)).item()
    W = weight.detach().double()
    S = whitening(gram.to(W.device), damping=damping)
    diff = (W - dense_from_factors(factors).double()) @ S
    return (torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(W @ S)).item()


def _layer_gram(path: str, calibration: Any) -> torch.Tensor | None:
    """The input Gram matrix of ``path`` from ``calibration`` (the dict :func:`~panther_fx.calibration.calibrate`
    returns), or None."""
    if calibration is None:
        return None
    if not isinstance(calibration, Mapping):
        raise TypeError(f"calibration must be the dict of input Gram matrices returned by "
                        f"panther_fx.calibration.calibrate(model, batches), got {type(calibration).__name__}")
    return calibration.get(path)


def _gram_key(gram: torch.Tensor | None) -> tuple:
    """A cheap content fingerprint, so a factorization cached for one calibration is not reused for another."""
    if gram is None:
        return ()
    g = gram.detach()
    return (tuple(g.shape), g.trace().item(), g.sum().item(), g.abs().sum().item())


def _linear_args(node: fx.Node):
    names = ("input", "weight", "bias")
    args = list(node.args) + [node.kwargs.get(n) for n in names[len(node.args):]]
    return args[0], args[1], args[2] if len(args) > 2 else None


@dataclass
class LinearPlan:
    """What the policy makes of one linear weight: the decision, its factors (None when it stays dense)
    and the report row. Shared by the graph pass, :func:`panther_fx.convert` and ``panther-fx inspect``."""

    decision: Decision
    factors: dict[str, torch.Tensor] | None
    report: LayerReport
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None


def _dense_plan(decision: Decision, O: int, I: int, speedup: float | None = None) -> LinearPlan:
    row = LayerReport(decision.path, "linear", "dense", (O, I), "dense", reason=decision.reason, params_before=O * I,
                      params_after=O * I, speedup=speedup)
    return LinearPlan(decision, None, row)


def plan_linear(path: str, weight: torch.Tensor, policy: Policy, cache: FactorCache, *,
                calibration: Any = None) -> LinearPlan:
    """Decide and factorize the (O, I) ``weight`` of the linear layer at ``path``."""
    O, I = weight.shape
    decision = policy.decide(path, "linear", in_features=I, out_features=O)
    gram = _layer_gram(path, calibration) if decision.method == "asvd" else None
    if decision.method == "asvd" and gram is None:
        why = ("method 'asvd' needs calibration: options={'calibration': calibrate(model, batches)}"
               if calibration is None else "method 'asvd': the calibration has no Gram matrix for this layer")
        decision = replace(decision, method="dense", reason=why)
    if not decision.rewrites:
        return _dense_plan(decision, O, I)
    key = (decision.method, decision.rank, decision.num_terms, decision.low_rank, decision.oversample,
           decision.n_iter, decision.seed, decision.damping, path, *_gram_key(gram))
    compute = partial(factorize_linear, decision=decision, gram=gram)
    try:
        factors = cache.get(weight, key, compute)
    except ValueError as e:  # e.g. asvd's whitening of a singular Gram matrix: say which layer and rule
        raise ValueError(f"{policy.source}: {decision.origin}: layer {path!r}: {e}") from e
    if not all(torch.isfinite(t).all() for t in factors.values()):
        return _dense_plan(replace(decision, method="dense", reason=f"{decision.method} factors of the weight "
                                   "are not finite (a weight with Inf/NaN, or an overflow): left dense"), O, I)
    after = factored_params(decision.method, I, O, rank=decision.rank, num_terms=decision.num_terms,
                            low_rank=decision.low_rank)
    rank = decision.rank if decision.method != "sketch" else 2 * decision.num_terms * decision.low_rank
    with without_autocast(weight):
        rel_error = relative_error(weight, factors, gram, decision.damping)
    row = LayerReport(path, "linear", decision.method, (O, I), "rewritten", rank=rank, params_before=O * I,
                      params_after=after, flop_ratio=after / (O * I), rel_error=rel_error)
    return LinearPlan(decision, factors, row, compute)


def _linear_op(method: str, factors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    if method == "sketch":
        return lambda x: torch.ops.panther.sketched_linear(x, factors["S1"], factors["S2"], factors["U1"],
                                                           factors["U2"], bias)
    return lambda x: torch.ops.panther.lowrank_linear(x, factors["A"], factors["B"], bias)


def _speed_checked(plan: LinearPlan, example: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> LinearPlan:
    """``plan`` after the policy's ``min_speedup`` check (:mod:`panther_fx.passes.speed`)."""
    speedup, reason = check_speed_on(plan.decision, example, lambda x: F.linear(x, weight, bias),
                                     _linear_op(plan.decision.method, plan.factors, bias), weight.device)
    if reason is not None:
        return _dense_plan(replace(plan.decision, method="dense", reason=reason), *weight.shape, speedup=speedup)
    note = None if speedup is not None else NOT_MEASURED
    return replace(plan, report=replace(plan.report, speedup=speedup, reason=note))


def rewrite_linear(ctx: RewriteContext) -> None:
    graph = ctx.gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        path = module_path(node)
        x, w, b = _linear_args(node)
        weight = ctx.real_value(w)
        if weight is None or weight.dim() != 2:  # e.g. weight_norm's g·v/‖v‖
            computed = example_value(w)
            ctx.keep_dense(path, "linear", computed if computed is not None and computed.dim() == 2 else None,
                           "weight is computed in the graph, not a parameter")
            continue
        # e.g. a tied output head F.linear(h, self.embed.weight): inspect and convert, which see nn.Linear modules,
        # leave it alone, and a rule on the owner could not protect it
        foreign = foreign_weight(node, w, path, torch.nn.Linear, "F.linear")
        if foreign is not None:
            ctx.report.append(LayerReport(path, "linear", "dense", tuple(weight.shape), "dense", reason=foreign))
            continue
        plan = plan_linear(path, weight, ctx.policy, ctx.cache, calibration=ctx.calibration)
        if plan.factors is not None and plan.decision.min_speedup is not None:
            plan = _speed_checked(plan, example_value(x), weight, ctx.real_value(b))
        ctx.record(plan.decision, plan.report, weight)
        if plan.factors is None:
            continue
        ctx.check_trainable(path, weight)
        with graph.inserting_before(node):
            nodes = ctx.factor_nodes(path, weight, plan.factors, plan.compute)
            if plan.decision.method == "sketch":
                op = torch.ops.panther.sketched_linear.default
                new = graph.call_function(op, (x, nodes["S1"], nodes["S2"], nodes["U1"], nodes["U2"], b))
            else:
                op = torch.ops.panther.lowrank_linear.default
                new = graph.call_function(op, (x, nodes["A"], nodes["B"], b))
        ctx.replace_node(node, new)
