"""Search spaces of the tuner: which Linear and Conv2d layers are searched and the choices each one has.

The layers searched are those :func:`panther_fx.convert` factorizes (:func:`panther_fx.convert.convertible_layers`):
exact ``nn.Linear`` / ``nn.Conv2d``, not ``nn.MultiheadAttention.out_proj``, not subclasses, not a weight tied to
another module, so every policy the tuner writes converts.

A space maps policy patterns (the ``match`` syntax of policy files) to choices; the first pattern that
matches a layer decides it, and layers no pattern matches stay dense and are not searched::

    space = {
        "encoder.layer.*.attention.**": [32, 64, 128, "dense"],                 # one choice per layer
        "encoder.layer.*.intermediate.dense": {"choices": [64, 128, 256, "dense"], "group": True},
        "classifier": "auto",
    }

A choice is ``"dense"``, an int (svd rank), a float in (0, 1) (svd rank as a fraction of min(I, O)), or a
table of policy settings such as ``{"method": "sketch", "num_terms": 1, "low_rank": 32}`` (not ``asvd``: it
needs calibration, which the tuner does not run). ``"auto"`` (and
the default space, ``{"**": "auto"}``) gives every layer the svd ranks that are powers of two between
min(I, O)/16 and break-even (r(I + O) < I·O), plus ``"dense"``. With ``group = True`` all matched layers
of one kind share one choice (one search dimension; a pattern that matches Linear and Conv2d layers makes one
group of each); otherwise each layer is its own dimension. A Conv2d kernel (O, C/G, kh, kw) counts as the
matrix (O, I) with I = C/G·kh·kw, as in policy files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..convert import convertible_layers
from ..convert.convert import OUT_PROJ_WHY
from ..policy import Policy, PolicyError, compile_pattern, exact_pattern
from ..policy.pattern import PatternError

__all__ = ["Choice", "SearchSpace", "SpaceError", "Unit", "auto_ranks"]


class SpaceError(ValueError):
    """A search space that cannot be built; the message names the pattern and the value."""


@dataclass(frozen=True)
class Choice:
    """One option of a search dimension: a label (the Optuna categorical value) and policy rule settings."""

    label: str
    settings: Mapping[str, Any] = field(compare=False)  # equal labels mean equal settings

    @property
    def dense(self) -> bool:
        return self.settings["method"] == "dense"


DENSE = Choice("dense", {"method": "dense"})


@dataclass(frozen=True)
class Unit:
    """One search dimension: a layer (``name`` is its path) or a group of layers of one ``op`` (``name`` is the
    pattern, followed by `` [conv2d]`` / `` [linear]`` when the pattern matched layers of both kinds)."""

    name: str
    pattern: str  # the policy ``match`` written for this unit
    layers: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (O, I) per layer; I = C/G·kh·kw for a conv
    choices: tuple[Choice, ...]
    op: str = "linear"  # the policy ``op`` of the unit's layers

    def choice(self, label: str) -> Choice:
        for c in self.choices:
            if c.label == label:
                return c
        raise SpaceError(f"unit {self.name!r} has no choice {label!r}; choices: "
                         f"{', '.join(c.label for c in self.choices)}")


def auto_ranks(in_features: int, out_features: int) -> list[int]:
    """Powers of two r with min(I, O)/16 <= r and r(I + O) < I·O (below break-even)."""
    smallest = min(in_features, out_features)
    ranks, r = [], 1
    while r * (in_features + out_features) < in_features * out_features and r <= smallest:
        if 16 * r >= smallest:
            ranks.append(r)
        r *= 2
    return ranks


def _parse_choice(where: str, value: Any) -> Choice:
    if value == "dense":
        return DENSE
    if isinstance(value, bool):
        raise SpaceError(f"{where}: choice {value!r} must be 'dense', a rank, a fraction or a settings table")
    if isinstance(value, int):
        if value < 1:
            raise SpaceError(f"{where}: rank {value} must be >= 1")
        return Choice(f"svd:{value}", {"method": "svd", "rank": value})
    if isinstance(value, float):
        if not 0.0 < value < 1.0:
            raise SpaceError(f"{where}: a float rank {value} is a fraction of min(I, O) and must lie in (0, 1)")
        return Choice(f"svd:{value:g}", {"method": "svd", "rank": value})
    if isinstance(value, Mapping):
        settings = dict(value)
        if "match" in settings or "op" in settings:
            raise SpaceError(f"{where}: a choice table holds policy settings, not 'match' or 'op'")
        settings.setdefault("method", "svd")
        where = f"{where}: choice {dict(value)!r}"
        # Validate through the policy loader so the messages match policy files: as [defaults] first, whose
        # allowed keys are the settings alone (a rule's would offer 'match' and 'op'), then as a linear rule.
        # The tables are ours: their "[defaults]" and "rule 1" mean nothing to the caller.
        for table, label in (({"defaults": settings}, "[defaults]"),
                             ({"rule": [{"match": "x", "op": "linear", **settings}]}, "rule 1")):
            try:
                Policy.from_dict(table, source=where)
            except PolicyError as e:
                raise SpaceError(str(e).replace(f"{where}: {label}: ", f"{where}: ", 1)) from None
        if settings["method"] == "asvd":  # trials would run the dense layer: asvd without Gram matrices is dense
            raise SpaceError(f"{where}: method 'asvd' needs calibration (per-layer input Gram matrices), which "
                             "tune does not compute; tune 'svd' ranks, then convert with method = 'asvd' and "
                             "calibration=")
        if settings["method"] == "dense":
            return DENSE
        label = settings["method"] + ":" + ",".join(f"{k}={settings[k]}" for k in sorted(settings) if k != "method")
        return Choice(label, settings)
    raise SpaceError(f"{where}: choice {value!r} must be 'dense', a rank, a fraction or a settings table")


def _layer_choice_ok(choice: Choice, path: str, shape: tuple[int, int], op: str) -> bool:
    """Whether ``choice`` really factorizes the layer (a method the op has, within min(I, O), below break-even)."""
    if choice.dense:
        return True
    O, I = shape
    try:
        decision = Policy.from_dict({"rule": [{"match": "**", "op": op, **choice.settings}]}).decide(
            path, op, in_features=I, out_features=O)
    except PolicyError:
        return False
    return decision.rewrites


def _left_out(candidates, matches) -> str:
    """Why the layers ``matches`` selects among those convert cannot factorize are not searched."""
    skipped = [f"{path}: {why}" for path, _, _, why in candidates if why is not None and matches(path)]
    return f"; left out: {'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''}" if skipped else ""


class SearchSpace:
    """The units (search dimensions) of a model under a space spec; builds policies from assignments."""

    def __init__(self, units: Sequence[Unit], dense: Sequence[tuple[str, str]] = ()):
        self.units = tuple(units)
        # (path, op) of the layers dense in every trial although a unit's pattern may match them: those convert
        # cannot factorize, and those whose pattern left them no choice but dense
        self.dense = tuple(dense)

    @classmethod
    def build(cls, model: nn.Module, spec: Mapping[str, Any] | None = None) -> "SearchSpace":
        """Units for the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` under ``spec`` (default
        ``{"**": "auto"}``)."""
        spec = {"**": "auto"} if spec is None else spec
        if not isinstance(spec, Mapping) or not spec:
            raise SpaceError("space must be a non-empty dict {pattern: choices}")
        candidates = convertible_layers(model)
        layers = [(path, (m.weight.shape[0], m.weight[0].numel()), op) for path, m, op, why in candidates
                  if why is None]
        if not layers:
            raise SpaceError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer that convert can factorize"
                             f"{_left_out(candidates, lambda p: True)}")
        entries = []
        for pattern, value in spec.items():
            if not isinstance(pattern, str):
                raise SpaceError(f"space pattern {pattern!r} must be a string")
            try:
                matches = compile_pattern(pattern)
            except PatternError as e:
                raise SpaceError(f"space pattern {pattern!r}: {e}") from None
            entries.append((pattern, matches, value, []))
        for layer in layers:
            for entry in entries:
                if entry[1](layer[0]):
                    entry[3].append(layer)
                    break
        units: list[Unit] = []
        for pattern, _, value, matched in entries:
            if not matched:
                raise SpaceError(f"space pattern {pattern!r} matches no nn.Linear or nn.Conv2d layer (layers: "
                                 f"{', '.join(p for p, _, _ in layers[:6])}{', ...' if len(layers) > 6 else ''})"
                                 f"{_left_out(candidates, compile_pattern(pattern))}")
            units += cls._units(pattern, value, matched)
        if not units:
            raise SpaceError("no layer of the space has a choice other than 'dense' (all below break-even)")
        searched = {path for unit in units for path in unit.layers}
        # MHA's out_proj needs no rule: neither convert nor the backend (which sees the MHA call) factorizes it
        dense = [(path, op) for path, _, op, why in candidates
                 if why != OUT_PROJ_WHY and (why is not None or path not in searched)]
        return cls(units, dense)

    @staticmethod
    def _units(pattern: str, value: Any, layers: list[tuple[str, tuple[int, int], str]]) -> list[Unit]:
        where = f"space[{pattern!r}]"
        group = False
        if isinstance(value, Mapping):
            unknown = set(value) - {"choices", "group"}
            if unknown or "choices" not in value:
                raise SpaceError(f"{where}: a table needs 'choices' and may have 'group' (got {sorted(value)})")
            group = value.get("group", False)
            if not isinstance(group, bool):
                raise SpaceError(f"{where}: group = {group!r} must be a boolean")
            value = value["choices"]
        auto = value == "auto"
        if not auto:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise SpaceError(f"{where}: choices must be 'auto' or a non-empty list, got {value!r}")
            parsed = list(dict.fromkeys(_parse_choice(where, v) for v in value))
        ops = list(dict.fromkeys(op for _, _, op in layers))
        units = []
        batches = [[x for x in layers if x[2] == op] for op in ops] if group else [[layer] for layer in layers]
        for batch in batches:
            op = batch[0][2]
            if auto:
                common = set.intersection(*(set(auto_ranks(I, O)) for _, (O, I), _ in batch))
                parsed = [_parse_choice(where, r) for r in sorted(common)]
            # drop options that leave a layer dense anyway (a method the op lacks, above break-even or min(I, O))
            choices = [c for c in parsed if all(_layer_choice_ok(c, p, s, op) for p, s, _ in batch)]
            if DENSE not in choices:
                choices.append(DENSE)
            if len(choices) < 2:
                continue
            paths = tuple(p for p, _, _ in batch)
            name = (pattern if len(ops) == 1 else f"{pattern} [{op}]") if group else paths[0]
            unit_pattern = pattern if group else exact_pattern(paths[0])
            units.append(Unit(name, unit_pattern, paths, tuple(s for _, s, _ in batch), tuple(choices), op))
        return units

    # ---- assignments ---------------------------------------------------------------------------------
    def labels(self, assignment: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(assignment[u.name] for u in self.units)

    def policy(self, assignment: Mapping[str, str], source: str = "<tuned>") -> Policy:
        """The policy that applies ``assignment`` ({unit name: choice label}); every other layer stays dense.

        One rule per non-dense unit, in space order, with the unit's ``op``; a dense unit gets an explicit
        ``method = "dense"`` rule only when a later rule of its op would otherwise catch one of its layers, and
        so does, first, each layer of :attr:`dense` that a rule's pattern would catch (a group's glob)."""
        chosen = [(u, u.choice(assignment[u.name])) for u in self.units]
        rules = []
        for i, (unit, choice) in enumerate(chosen):
            later = [compile_pattern(u.pattern) for u, c in chosen[i + 1:] if not c.dense and u.op == unit.op]
            if choice.dense and not any(m(p) for m in later for p in unit.layers):
                continue
            rules.append({"match": unit.pattern, "op": unit.op, **choice.settings})
        factoring = [(compile_pattern(r["match"]), r["op"]) for r in rules if r["method"] != "dense"]
        kept = [{"match": exact_pattern(path), "op": op, "method": "dense"} for path, op in self.dense
                if any(m(path) and rule_op == op for m, rule_op in factoring)]
        return Policy.from_dict({"rule": kept + rules}, source=source)

    def signature(self) -> str:
        """A digest of layers and choices: a resumed study must have been run over the same space."""
        data = [(u.name, u.layers, u.shapes, [c.label for c in u.choices]) + ((u.op,) if u.op != "linear" else ())
                for u in self.units]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]
