"""Rewrite attention nodes the policy selects (``op = "attention"``, ``method = "performer"``) into
``torch.ops.panther.performer_attention``.

Two targets:

- ``torch._C._nn.scaled_dot_product_attention`` (HF BERT and most hand-written attention): ``is_causal`` is
  honoured; an ``attn_mask`` is accepted only when it provably does not depend on the query (or head)
  index, i.e. it is a key-padding mask broadcast to (B, 1, Lq, Lk). The proof follows the mask's producers:
  shapes with size 1 in those dims, elementwise ops and ``expand``/``to`` of such tensors, sub-graphs with
  no graph inputs (evaluated at compile time and checked), and tensors that hold a single value for every
  size of their symbolic dims (value bounds: ``arange(L) >= 0`` is all True, as HF builds its masks under
  dynamic shapes).
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention`` under Dynamo, either ``batch_first``: the
  transposes sit outside the node), with a bool or float ``key_padding_mask`` and ``is_causal``.

Anything that cannot be linearized stays exact and the report says why. No parameters are created (the
feature matrix is a buffer drawn from ``layer_generator(seed, path)``), so gradients still reach the q/k/v
projections and training through the backend works.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..linalg import layer_generator
from ..linalg.features import orthogonal_features
from ..ops.attention import CAUSAL_CHUNK, performer_multi_head_attention
from ..policy import Decision
from ..report import LayerReport
from .common import RewriteContext, example_value, module_path
from .speed import NOT_MEASURED, check_speed, describe, example_shape, random_input

__all__ = ["SDPA_TARGETS", "MHA_TARGETS", "attention_flop_ratio", "rewrite_attention"]

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention,)
MHA_TARGETS = (F.multi_head_attention_forward,)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)

# Ops that map row-independent operands to a row-independent result (broadcasting elementwise).
_ELEMENTWISE_FUNCTIONS = {
    operator.and_, operator.or_, operator.xor, operator.invert, operator.not_, operator.neg, operator.add,
    operator.sub, operator.mul, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.logical_and, torch.logical_or, torch.logical_not, torch.where, torch.masked_fill,
}
# Ops whose result holds only values of their first operand (views, copies, broadcasts, selections).
_SUBSET_FUNCTIONS = {operator.getitem, torch.unsqueeze, torch.squeeze, torch.reshape, torch.flatten,
                     torch.transpose, torch.permute, torch.broadcast_to, torch.clone}
_SUBSET_METHODS = {"expand", "expand_as", "contiguous", "clone", "view", "reshape", "unsqueeze", "squeeze",
                   "flatten", "transpose", "permute", "__getitem__"}
_COMPARISONS = {operator.ge: "ge", operator.gt: "gt", operator.le: "le", operator.lt: "lt",
                torch.ge: "ge", torch.gt: "gt", torch.le: "le", torch.lt: "lt", "ge": "ge", "gt": "gt",
                "le": "le", "lt": "lt", "__ge__": "ge", "__gt__": "gt", "__le__": "le", "__lt__": "lt"}
_CAST_METHODS = {"bool": torch.bool, "float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}
_UNBOUNDED = (-math.inf, math.inf)
_PASSTHROUGH_METHODS = {"to", "expand", "expand_as", "contiguous", "bool", "float", "half", "bfloat16",
                        "type_as", "logical_not", "__invert__", "masked_fill", "__and__", "__or__", "mul",
                        "add", "sub", "eq", "ne"}


# ---- helpers executed inside the rewritten graph ----------------------------------------------------------
def sdpa_key_padding(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """A query-independent SDPA ``attn_mask`` (broadcastable to (B, H, Lq, Lk)) as the op's (B, Lk) key mask.

    SDPA bool masks mean True = attend, the op's bool masks True = ignore; float masks are additive in both.
    """
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    keys = mask[:, 0, 0, :].expand(query.shape[0], key.shape[-2])  # the batch and key dims may broadcast
    return ~keys if keys.dtype == torch.bool else keys


def split_scale(t: torch.Tensor, scale: float) -> torch.Tensor:
    """q or k times (scale·√d)^½: with both scaled, the op's default 1/√d yields logits scale·qᵀk, and its
    feature maps see u·√scale on both sides, exactly as with ``scale=`` (the positive-feature estimator is not
    invariant to moving the whole scale onto q: that raised its error up to 20×)."""
    return t * (scale * t.shape[-1] ** 0.5) ** 0.5


def performer_mha_node(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:func:`performer_multi_head_attention` with ``F.multi_head_attention_forward``'s (output, weights) result."""
    return performer_multi_head_attention(*args, **kwargs), None


# ---- analysis ---------------------------------------------------------------------------------------------
def _static(*sizes: Any) -> bool:
    return all(type(s) is int for s in sizes)


def attention_flop_ratio(heads_lq_lk_d: tuple[int, int, int, int], dv: int, features: int, causal: bool) -> float:
    """Performer / exact multiply-adds for one head: exact Lq·Lk·(d + dv) (half when causal); Performer
    (Lq + Lk)·m·d for the features plus m·(dv + 1) per token for the products (+ the C×C blocks when causal)."""
    _, Lq, Lk, d = heads_lq_lk_d
    exact = Lq * Lk * (d + dv) / (2 if causal else 1)
    performer = (Lq + Lk) * features * (d + dv + 1)
    if causal:
        performer += Lq * min(CAUSAL_CHUNK, Lq) * (features + dv + 1) / 2
    return performer / exact


class _MaskProver:
    """Decides whether a mask node's value is the same for every query and head (a key-padding mask)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._constant: dict[fx.Node, bool] = {}
        self._values: dict[fx.Node, Any] = {}
        self._bounds: dict[fx.Node, tuple[float, float]] = {}

    def is_constant(self, node: Any) -> bool:
        """No graph input among the ancestors (so the value can be computed now)."""
        if not isinstance(node, fx.Node):
            return True
        if node not in self._constant:
            if node.op == "placeholder":
                self._constant[node] = False
            elif node.op == "get_attr":
                self._constant[node] = True
            else:
                self._constant[node] = all(self.is_constant(a) for a in node.all_input_nodes)
        return self._constant[node]

    def evaluate(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node not in self._values:
            args = fx.node.map_arg(node.args, self.evaluate)
            kwargs = fx.node.map_arg(node.kwargs, self.evaluate)
            if node.op == "get_attr":
                value = getattr(self.gm, node.target)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                raise ValueError(f"cannot evaluate {node.op} node {node.name}")
            self._values[node] = value
        return self._values[node]

    def query_independent(self, node: Any, depth: int = 0) -> bool:
        if not isinstance(node, fx.Node) or not isinstance(node.meta.get("example_value"), torch.Tensor):
            return True  # a Python or symbolic scalar broadcasts
        value = example_value(node)
        if value is not None:
            shape = (1,) * max(0, 4 - value.dim()) + tuple(value.shape)
            if value.dim() <= 4 and shape[1] == 1 and shape[2] == 1:
                return True
        if self.single_valued(node):
            return True
        if depth > 32:
            return False
        if self.is_constant(node):
            with torch.no_grad():
                try:
                    const = self.evaluate(node)
                except Exception:  # noqa: BLE001 - an unevaluable sub-graph is simply not a proof
                    return False
            if not isinstance(const, torch.Tensor):
                return True
            full = const.reshape((1,) * max(0, 4 - const.dim()) + tuple(const.shape))
            return bool((full == full[:, :1, :1, :]).all())
        if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            return all(self.query_independent(a, depth + 1) for a in (*node.args, *node.kwargs.values()))
        if node.op == "call_method" and node.target in _PASSTHROUGH_METHODS:
            return all(self.query_independent(a, depth + 1) for a in (*node.args, *node.kwargs.values())
                       if isinstance(a, fx.Node))
        return False

    def single_valued(self, node: Any) -> bool:
        """Whether every element of the node's value is provably equal, for every size of its symbolic dims."""
        low, high = self.bounds(node)
        return low == high

    def bounds(self, node: Any) -> tuple[float, float]:
        """Sound bounds (low, high) on every element the node can hold, booleans as 0/1; (-inf, inf) when
        nothing is known. They need no sizes, so they hold under dynamic shapes where evaluation cannot run."""
        if isinstance(node, (bool, int, float)):
            return float(node), float(node)
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            return _UNBOUNDED
        if node not in self._bounds:
            self._bounds[node] = self._node_bounds(node)
        return self._bounds[node]

    def _node_bounds(self, node: fx.Node) -> tuple[float, float]:
        target, args, kwargs = node.target, node.args, node.kwargs
        if target is torch.arange:
            return _arange_bounds(*args, **kwargs)
        if target in _COMPARISONS:
            return _compare(_COMPARISONS[target], self.bounds(args[0]), self.bounds(args[1]))
        if target in _SUBSET_FUNCTIONS or target in _SUBSET_METHODS:
            return self.bounds(args[0])
        arithmetic = len(args) == 2 and not kwargs and not _is_bool(node)  # True + True is True, not 2
        if target in (operator.add, "add", "__add__") and arithmetic:
            (a, b), (c, d) = self.bounds(args[0]), self.bounds(args[1])
            return a + c, b + d
        if target in (operator.sub, "sub", "__sub__") and arithmetic:
            (a, b), (c, d) = self.bounds(args[0]), self.bounds(args[1])
            return a - d, b - c
        if target in (operator.and_, operator.or_, torch.logical_and, torch.logical_or, "__and__", "__or__",
                      "logical_and", "logical_or"):
            return self._boolean_bounds(node, target in (operator.and_, torch.logical_and, "__and__", "logical_and"))
        if target in (torch.ones, torch.ones_like, "new_ones"):
            return 1.0, 1.0
        if target in (torch.zeros, torch.zeros_like, "new_zeros"):
            return 0.0, 0.0
        if target == "to" or target in _CAST_METHODS:
            return _converted_bounds(self.bounds(args[0]), target, args[1:], kwargs)
        return _UNBOUNDED

    def _boolean_bounds(self, node: fx.Node, conjunction: bool) -> tuple[float, float]:
        """a & b, a | b of bool tensors; bitwise ops on integers are not modelled."""
        if len(node.args) != 2 or not all(_is_bool(a) for a in node.args):
            return _UNBOUNDED
        (a, b), (c, d) = self.bounds(node.args[0]), self.bounds(node.args[1])
        if conjunction:
            return min(a, c), min(b, d)
        return max(a, c), max(b, d)


def _is_bool(value: Any) -> bool:
    """A Python bool or a node whose traced value is a bool tensor."""
    if isinstance(value, fx.Node):
        return getattr(example_value(value), "dtype", None) == torch.bool
    return isinstance(value, bool)


def _arange_bounds(*args: Any, start: Any = 0, end: Any = None, step: Any = 1, **_: Any) -> tuple[float, float]:
    """``torch.arange``: values in [start, end) for a positive step; end may be symbolic (unbounded above)."""
    if len(args) == 1:
        end = args[0]
    elif args:
        start, end, step = (*args, step)[:3]
    if not isinstance(start, (int, float)) or not isinstance(step, (int, float)) or step <= 0:
        return _UNBOUNDED
    return float(start), float(end) if isinstance(end, (int, float)) else math.inf


def _compare(op: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Bounds of a comparison as 0/1: decided when the operands' ranges do not overlap. An unbounded operand
    may hold NaN, for which every comparison is False, so it decides nothing."""
    if a == _UNBOUNDED or b == _UNBOUNDED:
        return 0.0, 1.0
    always, never = {"ge": (a[0] >= b[1], a[1] < b[0]), "gt": (a[0] > b[1], a[1] <= b[0]),
                     "le": (a[1] <= b[0], a[0] > b[1]), "lt": (a[1] < b[0], a[0] >= b[1])}[op]
    return (1.0, 1.0) if always else (0.0, 0.0) if never else (0.0, 1.0)


def _converted_bounds(bounds: tuple[float, float], method: str, args: tuple, kwargs: dict) -> tuple[float, float]:
    """``x.to(...)``/``x.bool()``/``x.float()``...: a device move keeps the values; a float cast rounds them,
    monotonically, so the rounded bounds hold; a bool cast maps them to 0/1. A cast to an integer dtype or to
    another tensor's dtype is not modelled."""
    if any(isinstance(a, fx.Node) for a in (*args, *kwargs.values())):
        return _UNBOUNDED
    dtype = _CAST_METHODS.get(method) or next(
        (a for a in (*args, kwargs.get("dtype")) if isinstance(a, torch.dtype)), None)
    if dtype is None:
        return bounds
    if dtype.is_floating_point:
        low, high = (torch.tensor(b, dtype=torch.float64).to(dtype).item() for b in bounds)
        return low, high
    if dtype is torch.bool:
        low, high = bounds
        return (1.0, 1.0) if low > 0 or high < 0 else (0.0, 0.0) if low == high == 0 else (0.0, 1.0)
    return _UNBOUNDED


# ---- the pass ---------------------------------------------------------------------------------------------
def _dense(ctx: RewriteContext, decision: Decision, shape: tuple, reason: str, speedup: float | None = None) -> None:
    ctx.record(decision, LayerReport(decision.path, "attention", "dense", shape, "dense", reason=reason,
                                     speedup=speedup))


def _feature_matrix(decision: Decision, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    return orthogonal_features(decision.features, head_dim, generator=layer_generator(decision.seed, decision.path),
                               device=like.device)


def _rewritten(ctx: RewriteContext, decision: Decision, shape: tuple, dv: int, causal: bool,
               speedup: float | None) -> None:
    ratio = attention_flop_ratio(shape, dv, decision.features, causal) if _static(*shape, dv) else None
    reason = f"kernel={decision.kernel}" + (", causal" if causal else "")
    if decision.min_speedup is not None and speedup is None:
        reason += f"; {NOT_MEASURED}"
    ctx.record(decision, LayerReport(decision.path, "attention", "performer", shape, "rewritten", reason=reason,
                                     rank=decision.features, flop_ratio=ratio, speedup=speedup))


def _speed_checked(decision: Decision, W: torch.Tensor, shapes: Optional[list[tuple[int, ...]]], dtype: torch.dtype,
                   causal: bool, masked: bool) -> tuple[float | None, str | None]:
    """The policy's ``min_speedup`` for an attention node (:mod:`panther_fx.passes.speed`): the attention core
    at the traced (B, H, L, d) shapes of q, k, v, SDPA against the Performer op (projections are the same in
    both); a key-padding mask, when the node has one, as all-zero additive masks. (None, None) when not asked
    for or when the shapes are unknown."""
    if decision.min_speedup is None or shapes is None or None in shapes:
        return None, None
    query, key, value = (random_input(s, dtype, W.device) for s in shapes)
    B, Lk = shapes[1][0], shapes[1][2]
    sdpa_mask = query.new_zeros(B, 1, 1, Lk) if masked else None
    key_mask = query.new_zeros(B, Lk) if masked else None
    return check_speed(
        decision, lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=sdpa_mask, is_causal=causal),
        lambda: torch.ops.panther.performer_attention(query, key, value, W, key_mask, kernel_fn=decision.kernel,
                                                      causal=causal),
        W.device, f"q {describe(shapes[0], dtype)}, k/v {shapes[1][2]} tokens" + (", causal" if causal else ""))


def _symbolic_head_dim(size: Any) -> str:
    return (f"the head dim ({size}) is symbolic, but the feature matrix needs a fixed size: mark that dim static "
            "(torch._dynamo.mark_static, or compile with dynamic=None instead of dynamic=True)")


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _sdpa_refusal(args: dict[str, Any], q, k, v, prover: _MaskProver) -> Optional[str]:
    if args["enable_gqa"]:
        return "enable_gqa=True (grouped-query attention) is not supported by the Performer op"
    if not isinstance(args["dropout_p"], (int, float)) or args["dropout_p"] != 0:
        return f"dropout_p = {args['dropout_p']} (training): attention dropout has no Performer equivalent"
    if q is None or k is None or v is None or not (q.dim() == k.dim() == v.dim() == 4):
        return "query/key/value are not (B, H, L, d) tensors"
    if tuple(k.shape[:2]) != tuple(q.shape[:2]) or tuple(v.shape[:2]) != tuple(q.shape[:2]):
        return (f"key/value (B, H) = {tuple(k.shape[:2])}/{tuple(v.shape[:2])} broadcast against the query's "
                f"{tuple(q.shape[:2])} (e.g. one shared key/value head): the Performer op takes equal (B, H)")
    if not _static(q.shape[3]):
        return _symbolic_head_dim(q.shape[3])
    if not isinstance(args["is_causal"], bool):
        return "is_causal is computed in the graph"
    if not (args["scale"] is None or isinstance(args["scale"], (int, float, fx.Node))):
        return f"scale = {args['scale']!r} is not a number"
    if args["is_causal"] and args["attn_mask"] is not None:
        return "attn_mask together with is_causal"
    if args["is_causal"] and q.shape[2] != k.shape[2]:
        return f"is_causal with {q.shape[2]} queries and {k.shape[2]} keys (top-left causal alignment)"
    mask = args["attn_mask"]
    if mask is not None and not prover.query_independent(mask):
        shape = tuple(example_value(mask).shape) if example_value(mask) is not None else "?"
        return (f"attn_mask of shape {shape} is not provably a key-padding mask (it may depend on the query); "
                "arbitrary masks cannot be linearized")
    return None


def _rewrite_sdpa(ctx: RewriteContext, node: fx.Node, prover: _MaskProver) -> None:
    args = _sdpa_args(node)
    path = module_path(node)
    decision = ctx.policy.decide(path, "attention")
    q, k, v = (example_value(args[n]) for n in ("query", "key", "value"))
    shape = (q.shape[1], q.shape[2], k.shape[2], q.shape[3]) if q is not None and k is not None and q.dim() == 4 else ()
    if not decision.rewrites:
        return _dense(ctx, decision, shape, decision.reason)
    refusal = _sdpa_refusal(args, q, k, v, prover)
    if refusal:
        return _dense(ctx, decision, shape, refusal)
    W = _feature_matrix(decision, q.shape[3], q)
    shapes = [example_shape(t) for t in (q, k, v)]
    speedup, slow = _speed_checked(decision, W, shapes, q.dtype, args["is_causal"], args["attn_mask"] is not None)
    if slow:
        return _dense(ctx, decision, shape, slow, speedup)
    graph = ctx.gm.graph
    with graph.inserting_before(node):
        features = ctx.add_constant(f"{path}_features", W)
        mask = None
        if args["attn_mask"] is not None:
            mask = graph.call_function(sdpa_key_padding, (args["attn_mask"], args["query"], args["key"]))
        query, key, scale = args["query"], args["key"], args["scale"]
        if isinstance(scale, fx.Node):  # a symbolic scale (dynamic shapes): fold it into q and k
            query = graph.call_function(split_scale, (query, scale))
            key = graph.call_function(split_scale, (key, scale))
            scale = None
        new = graph.call_function(torch.ops.panther.performer_attention.default,
                                  (query, key, args["value"], features, mask),
                                  {"kernel_fn": decision.kernel, "causal": args["is_causal"],
                                   "scale": None if scale is None else float(scale)})
    ctx.replace_node(node, new)
    _rewritten(ctx, decision, shape, v.shape[3], args["is_causal"], speedup)


def _weights_used(node: fx.Node) -> bool:
    """Whether anything reads the attention weights (output [1]) of an MHA node."""
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            return True
        if user.args[1] == 1 and user.users:
            return True
    return False


def _mha_refusal(a: dict[str, Any], node: fx.Node, query) -> Optional[str]:
    checks = (
        (a["bias_k"] is not None or a["bias_v"] is not None, "bias_k/bias_v (add_bias_kv=True)"),
        (a["add_zero_attn"] is not False, "add_zero_attn=True"),
        (a["use_separate_proj_weight"] is not False, "separate q/k/v projection weights (kdim/vdim != embed_dim)"),
        (a["static_k"] is not None or a["static_v"] is not None, "static_k/static_v"),
        (a["training"] is not False and a["dropout_p"] != 0,
         f"dropout={a['dropout_p']} in training: attention dropout has no exact Performer equivalent"),
        (a["need_weights"] is not False and _weights_used(node),
         "need_weights=True and the attention weights are used (Performer never forms them)"),
        (a["attn_mask"] is not None and a["is_causal"] is not True,
         "attn_mask cannot be linearized (use key_padding_mask for padding, is_causal for causal masks)"),
        (query is None or query.dim() != 3, "unbatched input"),
        (not isinstance(a["num_heads"], int) or not isinstance(a["is_causal"], bool),
         "num_heads/is_causal are not constants"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _mha_heads(query: torch.Tensor, key: torch.Tensor, num_heads: int) -> Optional[list[tuple[int, ...]]]:
    """The (B, H, L, d) shapes of q, k, v inside ``F.multi_head_attention_forward`` for (L, B, E) inputs."""
    q, k = example_shape(query), example_shape(key)
    if q is None or k is None:
        return None
    (Lq, B, E), Lk = q, k[0]
    return [(B, num_heads, Lq, E // num_heads)] + [(B, num_heads, Lk, E // num_heads)] * 2


def _rewrite_mha(ctx: RewriteContext, node: fx.Node) -> None:
    a = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = a.arguments
    path = module_path(node)
    decision = ctx.policy.decide(path, "attention")
    query, key = example_value(a["query"]), example_value(a["key"])
    shape = ()
    if query is not None and key is not None and query.dim() == 3 and isinstance(a["num_heads"], int):
        shape = (a["num_heads"], query.shape[0], key.shape[0], query.shape[2] // a["num_heads"])
    if not decision.rewrites:
        return _dense(ctx, decision, shape, decision.reason)
    refusal = _mha_refusal(a, node, query) or (None if _static(shape[3]) else _symbolic_head_dim(shape[3]))
    if refusal:
        return _dense(ctx, decision, shape, refusal)
    causal = a["is_causal"]
    if causal and query.shape[0] != key.shape[0]:
        return _dense(ctx, decision, shape, f"is_causal with {query.shape[0]} queries and {key.shape[0]} keys")
    W = _feature_matrix(decision, shape[3], query)
    speedup, slow = _speed_checked(decision, W, _mha_heads(query, key, a["num_heads"]), query.dtype, causal,
                                   a["key_padding_mask"] is not None)
    if slow:
        return _dense(ctx, decision, shape, slow, speedup)
    graph = ctx.gm.graph
    with graph.inserting_before(node):
        features = ctx.add_constant(f"{path}_features", W)
        new = graph.call_function(
            performer_mha_node,
            (a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"],
             a["out_proj_weight"], a["out_proj_bias"], features, a["key_padding_mask"]),
            {"kernel": decision.kernel, "causal": causal})
    ctx.replace_node(node, new)
    _rewritten(ctx, decision, shape, shape[3], causal, speedup)


def rewrite_attention(ctx: RewriteContext) -> None:
    """Rewrite every SDPA and ``F.multi_head_attention_forward`` node the policy sends to ``performer``."""
    prover = _MaskProver(ctx.gm)
    for node in list(ctx.gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SDPA_TARGETS:
            _rewrite_sdpa(ctx, node, prover)
        elif node.target in MHA_TARGETS:
            _rewrite_mha(ctx, node)
        elif node.target is torch._transformer_encoder_layer_fwd:
            path = module_path(node)
            _dense(ctx, ctx.policy.decide(path, "attention"), (),
                   "nn.TransformerEncoderLayer fast path (eval, no grad) fuses attention away; call "
                   "torch.backends.mha.set_fastpath_enabled(False) before compiling to rewrite it")
