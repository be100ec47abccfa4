"""The ``panther`` torch.compile backend: Dynamo FX graph -> policy match -> rewrite -> Inductor.

    torch.compile(model, backend="panther", options={"policy": "panther.toml"})

The backend is registered only through the ``torch_dynamo_backends`` entry point (no ``import panther_fx``
needed). Options:

- ``policy``: TOML path, dict or :class:`~panther_fx.policy.Policy` (default: ``$PANTHER_POLICY``, else none:
  nothing is rewritten and the graph goes to Inductor unchanged);
- ``mode``: an Inductor mode (``torch.compile`` refuses ``mode=`` together with ``options=``);
- ``verbose``: print the per-layer report (also ``PANTHER_VERBOSE=1``);
- ``allow_training``: rewrite layers whose weights require grad anyway, freezing them (with a warning);
- ``calibration``: input batches for activation-aware methods;
- ``use_inductor``: ``False`` runs the rewritten graph eagerly (for debugging and tests);
- ``inductor``: a dict of Inductor config patches; any other key that names an Inductor config is passed
  through as one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers torch.ops.panther.*)
from ..passes import FactorCache, StaleFactorGuard, rewrite_graph
from ..policy import load_policy
from ..report import Report

__all__ = ["panther_backend", "last_report", "clear_factor_cache", "BackendOptionError"]

_OWN_OPTIONS = ("policy", "mode", "verbose", "allow_training", "calibration", "use_inductor", "inductor")
_FACTOR_CACHE = FactorCache()


@dataclass
class _Session:
    """The graphs of one ``torch.compile`` call, which share its options dict: a graph break splits a model into
    several graphs, whose report rows are merged (a recompile replaces a layer's row) and whose rules are
    pooled, so that a rule used by one graph is not reported unused by another."""

    options: Any = None
    report: Report = field(default_factory=Report)
    used: set = field(default_factory=set)
    warned: set = field(default_factory=set)

    def add(self, report: Report) -> None:
        fresh = {(r.path, r.op) for r in report}
        self.report[:] = [r for r in self.report if (r.path, r.op) not in fresh] + list(report)


_SESSION = {"current": _Session()}


class BackendOptionError(ValueError):
    """An option the panther backend does not know and Inductor does not either."""


def last_report() -> Report:
    """The per-layer report of the most recent ``torch.compile`` call: the rows of all its graphs so far."""
    return _SESSION["current"].report


def clear_factor_cache() -> None:
    """Forget every cached factorization, so the next compile factorizes the weights afresh: needed after an
    in-place update the cache cannot see (of inference tensors, or through ``weight.data``); call
    ``torch._dynamo.reset()`` too, so that the next call compiles."""
    _FACTOR_CACHE.clear()


def _split_options(options: dict[str, Any] | None, mode: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our options and Inductor config patches (from ``mode``, ``inductor`` and pass-through keys)."""
    from torch._inductor import config as inductor_config, list_mode_options

    options = dict(options or {})
    own = {k: options.pop(k) for k in _OWN_OPTIONS if k in options}
    mode = own.get("mode", mode)
    known = inductor_config.get_config_copy()
    unknown = [k for k in options if k not in known]
    if unknown:
        raise BackendOptionError(
            f"panther backend: unknown option(s) {', '.join(map(repr, unknown))}; panther options are "
            f"{', '.join(_OWN_OPTIONS)}, anything else must be a torch._inductor.config name")
    patches = dict(list_mode_options(mode)) if mode not in (None, "default") else {}
    patches.update(own.pop("inductor", None) or {})
    patches.update(options)
    return own, patches


def _with_guard(compiled, guard: StaleFactorGuard):
    """Check, before each call, that the factored weights are the ones passed in (see StaleFactorGuard).
    ``functools.wraps`` keeps the compiled callable's attributes (``_boxed_call``), so the calling convention
    is unchanged; a boxed call passes the inputs as one list."""
    if not guard:
        return compiled

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        boxed = len(args) == 1 and isinstance(args[0], list)
        guard.check(args[0] if boxed else args)
        return compiled(*args, **kwargs)

    return run


def panther_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                    options: dict[str, Any] | None = None):
    """Dynamo backend entry: rewrite ``gm`` in place under the policy, then compile it with Inductor."""
    own, patches = _split_options(options, mode)
    policy = load_policy(own.get("policy", os.environ.get("PANTHER_POLICY")))
    ctx = rewrite_graph(gm, example_inputs, policy, cache=_FACTOR_CACHE,
                        allow_training=bool(own.get("allow_training", False)),
                        calibration=own.get("calibration"))
    session = _SESSION["current"]
    if options is None or session.options is not options:
        session = _SESSION["current"] = _Session(options)
    session.add(ctx.report)
    # Once per compile call, for each rule no graph compiled so far has used.
    session.used |= {d.rule_index for d in ctx.decisions}
    unused = policy.warn_unused((), skip=session.used | session.warned,
                                note=" (of the graphs compiled so far; after a graph break a later graph may "
                                     "still use it)")
    session.warned |= {rule.index for rule in unused}
    if own.get("verbose", False) or os.environ.get("PANTHER_VERBOSE") == "1":
        print(f"panther: policy {policy.source}\n{ctx.report.table()}")
    if not own.get("use_inductor", True):
        return _with_guard(gm.forward, ctx.guard)
    from torch._inductor.compile_fx import compile_fx

    return _with_guard(compile_fx(gm, example_inputs, config_patches=patches), ctx.guard)


def compile(model: torch.nn.Module, policy: Any, **options: Any):
    """``torch.compile(model, backend=panther_backend, options={"policy": policy, **options})``.

    Keyword arguments ``fullgraph`` and ``dynamic`` go to ``torch.compile``; the rest are backend options.
    """
    compile_kwargs = {k: options.pop(k) for k in ("fullgraph", "dynamic") if k in options}
    return torch.compile(model, backend=panther_backend, options={"policy": policy, **options},
                         **compile_kwargs)
