"""Graph passes over Dynamo FX graphs: find linear / conv2d / attention nodes the policy selects and
rewrite them into ``torch.ops.panther`` ops with factors stored as buffers on the GraphModule."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..policy import Policy
from ..report import LayerReport, Report
from .common import FactorCache, RewriteContext, StaleFactorGuard, TrainingRewriteError, example_value, module_path
from .linear import LINEAR_TARGETS, LinearPlan, factorize_linear, plan_linear, rewrite_linear
from .conv2d import CONV2D_TARGETS, ConvPlan, factorize_conv2d, plan_conv2d, rewrite_conv2d
from .attention import rewrite_attention

__all__ = [
    "FactorCache", "LINEAR_TARGETS", "PASSES", "RewriteContext", "StaleFactorGuard", "TrainingRewriteError",
    "LinearPlan", "factorize_linear", "inspect_model", "module_path", "plan_linear", "rewrite_graph",
    "CONV2D_TARGETS", "ConvPlan", "factorize_conv2d", "plan_conv2d",
]

PASSES: list[Callable[[RewriteContext], None]] = [rewrite_linear, rewrite_conv2d, rewrite_attention]


def inspect_model(model: nn.Module, policy: Policy, *, calibration: Any = None) -> Report:
    """Dry run over ``model``'s modules: the report the backend would print, without compiling."""
    report = Report()
    decisions = []
    cache = FactorCache()
    for path, module in model.named_modules():
        if type(module) is NonDynamicallyQuantizableLinear:
            # MHA's out_proj: its weight is read by F.multi_head_attention_forward, never by a linear node.
            decisions.append(policy.decide(path, "linear", in_features=module.in_features,
                                           out_features=module.out_features))
            report.append(LayerReport(path, "linear", "dense", tuple(module.weight.shape), "dense",
                                      reason="nn.MultiheadAttention's out_proj, whose weight MHA reads directly "
                                             "(use op = 'attention')"))
        elif isinstance(module, nn.Linear):
            plan = plan_linear(path, module.weight, policy, cache, calibration=calibration)
            decisions.append(plan.decision)
            report.append(plan.report)
        elif isinstance(module, nn.Conv2d):
            plan = plan_conv2d(path, module.weight, policy, cache, groups=module.groups)
            decisions.append(plan.decision)
            report.append(plan.report)
        else:
            decision = policy.decide(path, "attention")
            if isinstance(module, nn.MultiheadAttention):
                report.append(_attention_dry_run(decision, module))
            if decision.rule_index is not None or isinstance(module, nn.MultiheadAttention):
                # Attention runs inside modules (HF's SDPA call in BertSelfAttention): count the rule as used.
                decisions.append(decision)
    if policy.rules:
        policy.warn_unused(decisions)
    return report


def _attention_dry_run(decision, module: nn.MultiheadAttention) -> LayerReport:
    shape = (module.embed_dim, module.num_heads)
    if not decision.rewrites:
        return LayerReport(decision.path, "attention", "dense", shape, "dense", reason=decision.reason)
    return LayerReport(decision.path, "attention", decision.method, shape, "rewritten", rank=decision.features,
                       reason="dry run: masks and need_weights are checked when the graph is compiled")


def _report_nested_layers(ctx: RewriteContext) -> None:
    """Linear and conv layers inside higher-order ops (torch.utils.checkpoint, torch.cond: their bodies are
    sub-GraphModules) stay as they are; give each a report row, so that a rule naming one is not reported
    unused and the report still lists every layer."""
    for name, sub in ctx.gm.named_modules():
        if sub is ctx.gm or not isinstance(sub, fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            op = ("linear" if node.target in LINEAR_TARGETS else "conv2d" if node.target in CONV2D_TARGETS
                  else None) if node.op == "call_function" else None
            weight = example_value(node.args[1]) if op and len(node.args) > 1 else None
            if weight is None:
                continue
            path = module_path(node)
            # conv2d: in_features = C_in/groups·kh·kw, as the conv pass passes it
            decision = ctx.policy.decide(path, op, in_features=weight[0].numel(), out_features=weight.shape[0])
            why = (f"inside the higher-order op body {name!r} (torch.utils.checkpoint, torch.cond, ...): "
                   "not rewritten") if decision.rewrites else decision.reason
            ctx.record(decision, LayerReport(path, op, "dense", tuple(weight.shape), "dense", reason=why))


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], policy: Policy, *,
                  cache: FactorCache | None = None, allow_training: bool = False,
                  calibration: Any = None) -> RewriteContext:
    """Run every pass over ``gm`` in place; return the context holding the report and the stale-weight guard."""
    ctx = RewriteContext(gm, example_inputs, policy, cache or FactorCache(), allow_training=allow_training,
                         calibration=calibration)
    for rewrite in PASSES:
        rewrite(ctx)
    _report_nested_layers(ctx)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return ctx
