"""Rewrite ``torch.conv2d`` (= ``F.conv2d``) nodes whose module the policy selects into
``panther.lowrank_conv2d`` (svd) or ``panther.sketched_conv2d`` (sketch), factors computed once from the
real kernel.

The policy sees a conv layer as a matrix of ``in_features = C/G·kh·kw`` by ``out_features = O``. Groups are
honoured exactly by factorizing each group's kernel on its own (see :mod:`panther_fx.linalg.conv`); the real
parameter count of that layout is checked against the dense kernel, since for the sketch it grows with G.
``padding_mode`` other than zeros appears in the graph as an ``F.pad`` feeding a conv with padding 0, so
rewriting the conv alone is exact. Transposed convolutions are reported and stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..linalg import layer_generator
from ..linalg.conv import (conv_sketch_factors, conv_svd_factors, conv_weight_from_lowrank,
                           conv_weight_from_sketch)
from ..ops.conv2d import conv_padding
from ..policy import Decision, Policy, factored_params
from ..report import LayerReport
from .common import FactorCache, RewriteContext, example_value, foreign_weight, module_path, without_autocast
from .speed import NOT_MEASURED, check_speed_on

__all__ = ["CONV2D_TARGETS", "ConvPlan", "conv2d_factored_params", "factorize_conv2d", "plan_conv2d",
           "rewrite_conv2d"]

CONV2D_TARGETS = (torch.conv2d,)  # torch.nn.functional.conv2d is the same builtin
TRANSPOSED_TARGETS = (torch.conv_transpose2d,)
_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_ARG_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def factorize_conv2d(weight: torch.Tensor, decision: Decision, groups: int = 1) -> dict[str, torch.Tensor]:
    """Factors of a (O, C/G, kh, kw) kernel for ``decision``: {V, U} for svd, {S1, U1} for sketch."""
    generator = layer_generator(decision.seed, decision.path)
    if decision.method == "svd":
        V, U = conv_svd_factors(weight, decision.rank, groups=groups, oversample=decision.oversample,
                                n_iter=decision.n_iter, generator=generator)
        return {"V": V, "U": U}
    if decision.method == "sketch":
        S1, U1 = conv_sketch_factors(weight, decision.num_terms, decision.low_rank, groups=groups,
                                     generator=generator)
        return {"S1": S1, "U1": U1}
    raise ValueError(f"factorize_conv2d: no factorization for method {decision.method!r}")


def conv2d_factored_params(factors: dict[str, torch.Tensor]) -> int:
    """Stored weight entries of conv factors (sketch signs included: they are buffers)."""
    return sum(t.numel() for t in factors.values())


def _kernel_from_factors(factors: dict[str, torch.Tensor], groups: int) -> torch.Tensor:
    if "V" in factors:
        return conv_weight_from_lowrank(factors["V"].float(), factors["U"].float(), groups)
    return conv_weight_from_sketch(factors["S1"].float(), factors["U1"].float(), groups)


def _rank_of(factors: dict[str, torch.Tensor]) -> int:
    """Total number of filters of the first conv (all groups)."""
    return factors["V"].shape[0] if "V" in factors else factors["S1"].shape[0]


@dataclass
class ConvPlan:
    """What the policy makes of one conv kernel: decision, factors (None when dense), report row. Shared by
    the graph pass, :func:`panther_fx.convert` and ``panther-fx inspect``."""

    decision: Decision
    factors: dict[str, torch.Tensor] | None
    report: LayerReport
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    groups: int = 1


def _dense_plan(decision: Decision, shape: tuple[int, ...], groups: int, speedup: float | None = None) -> ConvPlan:
    dense = shape[0] * shape[1] * shape[2] * shape[3]
    row = LayerReport(decision.path, "conv2d", "dense", shape, "dense", reason=decision.reason,
                      params_before=dense, params_after=dense, speedup=speedup)
    return ConvPlan(decision, None, row, groups=groups)


def plan_conv2d(path: str, weight: torch.Tensor, policy: Policy, cache: FactorCache, *,
                groups: int = 1) -> ConvPlan:
    """Decide and factorize the (O, C/G, kh, kw) kernel of the conv layer at ``path``."""
    O, Cg, kh, kw = weight.shape
    in_features, dense = Cg * kh * kw, weight.numel()
    decision = policy.decide(path, "conv2d", in_features=in_features, out_features=O)
    if not decision.rewrites:
        return _dense_plan(decision, tuple(weight.shape), groups)
    key = (decision.method, decision.rank, decision.num_terms, decision.low_rank, decision.oversample,
           decision.n_iter, decision.seed, groups, path)
    compute = partial(factorize_conv2d, decision=decision, groups=groups)
    factors = cache.get(weight, key, compute)
    after = conv2d_factored_params(factors)
    estimate = factored_params(decision.method, in_features, O, rank=decision.rank,
                               num_terms=decision.num_terms, low_rank=decision.low_rank)
    if after >= dense and estimate < dense:  # the policy's r(I+O) estimate passed; the grouped layout does not
        reason = (f"groups={groups}: the per-group {decision.method} stores {after} >= {dense} dense "
                  f"parameters ({decision.origin})")
        return _dense_plan(replace(decision, method="dense", reason=reason), tuple(weight.shape), groups)
    K = weight.detach().float()
    with without_autocast(weight):
        rel_error = (torch.linalg.vector_norm(K - _kernel_from_factors(factors, groups))
                     / torch.linalg.vector_norm(K)).item()
    row = LayerReport(path, "conv2d", decision.method, tuple(weight.shape), "rewritten",
                      rank=_rank_of(factors), params_before=dense, params_after=after,
                      flop_ratio=after / dense, rel_error=rel_error)
    return ConvPlan(decision, factors, row, compute, groups)


def _conv_args(node: fx.Node) -> list[Any]:
    args = list(node.args)
    for i in range(len(args), len(_ARG_NAMES)):
        args.append(node.kwargs.get(_ARG_NAMES[i], _ARG_DEFAULTS[i]))
    return args


def _geometry(args: list[Any], weight: torch.Tensor) -> tuple[list[int], list[int], list[int], int] | str:
    """(stride, canonical padding, dilation, groups), or the reason the node cannot be rewritten."""
    x, _, _, stride, padding, dilation, groups = args
    if any(isinstance(a, fx.Node) for a in (stride, padding, dilation, groups)):
        return "stride, padding, dilation or groups is computed in the graph"
    example = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    if example is None or example.dim() != 4:
        return "input is not a batched (N, C, H, W) tensor"
    stride, dilation = _pair(stride), _pair(dilation)
    padding = padding if isinstance(padding, str) else _pair(padding)
    return stride, conv_padding(padding, tuple(weight.shape[2:]), stride, dilation), dilation, int(groups)


def _pair(value: int | Sequence[int]) -> list[int]:
    """[h, w] from an int or a 1- or 2-element sequence: nn.Conv2d(stride=(2,)) is valid and means (2, 2)."""
    if isinstance(value, int):
        return [value, value]
    return list(value) * 2 if len(value) == 1 else list(value)


def _report_transposed(ctx: RewriteContext, node: fx.Node) -> None:
    weight = ctx.real_value(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    ctx.keep_dense(module_path(node), "conv2d", weight, "transposed convolution: not factorized")


def _speed_checked(plan: ConvPlan, args: list[Any], weight: torch.Tensor, bias: torch.Tensor | None,
                   geometry: tuple[list[int], list[int], list[int], int]) -> ConvPlan:
    """``plan`` after the policy's ``min_speedup`` check (:mod:`panther_fx.passes.speed`)."""
    stride, padding, dilation, groups = geometry
    f = plan.factors
    op, first, mix = ((torch.ops.panther.sketched_conv2d, f["S1"], f["U1"]) if plan.decision.method == "sketch"
                      else (torch.ops.panther.lowrank_conv2d, f["V"], f["U"]))
    speedup, reason = check_speed_on(
        plan.decision, example_value(args[0]),
        lambda x: torch.conv2d(x, weight, bias, args[3], args[4], args[5], args[6]),
        lambda x: op(x, first, mix, bias, stride, padding, dilation, groups), weight.device)
    if reason is not None:
        decision = replace(plan.decision, method="dense", reason=reason)
        return _dense_plan(decision, tuple(weight.shape), groups, speedup=speedup)
    note = None if speedup is not None else NOT_MEASURED
    return replace(plan, report=replace(plan.report, speedup=speedup, reason=note))


def rewrite_conv2d(ctx: RewriteContext) -> None:
    graph = ctx.gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in TRANSPOSED_TARGETS:
            _report_transposed(ctx, node)
            continue
        if node.target not in CONV2D_TARGETS:
            continue
        path = module_path(node)
        args = _conv_args(node)
        weight = ctx.real_value(args[1])
        if weight is None or weight.dim() != 4:
            computed = example_value(args[1])
            ctx.keep_dense(path, "conv2d", computed if computed is not None and computed.dim() == 4 else None,
                           "kernel is computed in the graph, not a parameter")
            continue
        foreign = foreign_weight(node, args[1], path, torch.nn.Conv2d, "F.conv2d")
        if foreign is not None:
            ctx.report.append(LayerReport(path, "conv2d", "dense", tuple(weight.shape), "dense", reason=foreign))
            continue
        geometry = _geometry(args, weight)
        if isinstance(geometry, str):
            ctx.keep_dense(path, "conv2d", weight, geometry)
            continue
        stride, padding, dilation, groups = geometry
        plan = plan_conv2d(path, weight, ctx.policy, ctx.cache, groups=groups)
        if plan.factors is not None and plan.decision.min_speedup is not None:
            plan = _speed_checked(plan, args, weight, ctx.real_value(args[2]), geometry)
        ctx.record(plan.decision, plan.report, weight)
        if plan.factors is None:
            continue
        ctx.check_trainable(path, weight)
        with graph.inserting_before(node):
            nodes = ctx.factor_nodes(path, weight, plan.factors, plan.compute)
            if plan.decision.method == "sketch":
                op, first, mix = torch.ops.panther.sketched_conv2d.default, nodes["S1"], nodes["U1"]
            else:
                op, first, mix = torch.ops.panther.lowrank_conv2d.default, nodes["V"], nodes["U"]
            new = graph.call_function(op, (args[0], first, mix, args[2], stride, padding, dilation, groups))
        ctx.replace_node(node, new)
