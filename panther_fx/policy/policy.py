"""Policy files: which layers to sketch, and how.

A policy is data (TOML, a dict, or a :class:`Policy`), never code::

    [defaults]
    method = "svd"            # svd | asvd | sketch | dense (| performer for attention)
    rank = 0.25               # int: absolute rank; float in (0, 1): fraction of min(I, O)
    min_features = 256        # layers with min(I, O) below this stay dense
    [[rule]]
    match = "encoder.layer.*.intermediate.dense"
    rank = 128

Rules are tried in order and the first whose ``match`` (and ``op``) fits a layer decides it; ``[defaults]``
fills the keys a rule leaves out and, when it names a ``method``, also decides the layers no rule matches.
A rule without ``op`` applies to the ops its method supports. Every error names the source, the rule
number (1-based) and the offending key and value.
"""

from __future__ import annotations

import math

import difflib
import tomllib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..linalg.lowrank import ASVD_DAMPING
from .pattern import PatternError, compile_pattern

__all__ = ["Policy", "Rule", "Decision", "PolicyError", "OPS", "METHODS_BY_OP", "load_policy"]

OPS = ("linear", "conv2d", "attention")
METHODS_BY_OP = {
    "linear": ("svd", "asvd", "sketch", "dense"),
    "conv2d": ("svd", "sketch", "dense"),
    "attention": ("performer", "dense"),
}
METHODS = ("svd", "asvd", "sketch", "performer", "dense")
KERNELS = ("softmax", "relu")

# key -> (accepted Python types, check(value) -> error text or None)
_SETTINGS: dict[str, tuple[tuple[type, ...], Callable[[Any], str | None]]] = {
    "method": ((str,), lambda v: None if v in METHODS else f"must be one of {', '.join(METHODS)}"),
    "rank": ((int, float), lambda v: _check_rank(v)),
    "min_features": ((int,), lambda v: None if v >= 0 else "must be >= 0"),
    "num_terms": ((int,), lambda v: None if v >= 1 else "must be >= 1"),
    "low_rank": ((int,), lambda v: None if v >= 1 else "must be >= 1"),
    "oversample": ((int,), lambda v: None if v >= 0 else "must be >= 0"),
    "n_iter": ((int,), lambda v: None if v >= 0 else "must be >= 0"),
    "seed": ((int,), lambda v: None),
    # Relative to the mean Gram diagonal: beyond ~1e3 asvd is plain svd, and a huge λ overflows the Gram.
    "damping": ((float, int), lambda v: None if 0 <= v <= 1e3 else "must be in [0, 1000]"),
    "min_speedup": ((float, int), lambda v: None if 0 < v < math.inf else "must be finite and > 0"),
    "force": ((bool,), lambda v: None),
    "features": ((int,), lambda v: None if v >= 1 else "must be >= 1"),
    "kernel": ((str,), lambda v: None if v in KERNELS else f"must be one of {', '.join(KERNELS)}"),
}
_RULE_ONLY: dict[str, tuple[tuple[type, ...], Callable[[Any], str | None]]] = {
    "match": ((str,), lambda v: None if v else "must not be empty"),
    "op": ((str,), lambda v: None if v in OPS else f"must be one of {', '.join(OPS)}"),
}
_FALLBACKS = {"min_features": 0, "num_terms": 1, "oversample": 10, "n_iter": 2, "seed": 0,
              "damping": ASVD_DAMPING, "min_speedup": None, "force": False, "features": 256, "kernel": "softmax"}


def _check_rank(v: int | float) -> str | None:
    if isinstance(v, float):
        return None if 0.0 < v < 1.0 else "a float rank is a fraction of min(I, O) and must lie in (0, 1)"
    return None if v > 0 else "must be > 0"


class PolicyError(ValueError):
    """A policy that cannot be loaded or applied. The message names source, rule, key and value."""


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join({int: "an integer", float: "a float", str: "a string", bool: "a boolean"}[t] for t in types)


def _validate(where: str, table: Mapping[str, Any], allowed: dict) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PolicyError(f"{where}: unknown key {key!r}{suggestion}; allowed keys: {', '.join(sorted(allowed))}")
        types, check = allowed[key]
        # bool is an int subclass: reject True for an integer key and 1 for a boolean key.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise PolicyError(f"{where}: {key} = {value!r} must be {_type_name(types)}")
        problem = check(value)
        if problem:
            raise PolicyError(f"{where}: {key} = {value!r} {problem}")
        out[key] = value
    return out


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``: a pattern, an optional op and the settings it overrides."""

    index: int  # 1-based position in the file
    match: str
    op: str | None
    settings: Mapping[str, Any]
    matches: Callable[[str], bool] = field(repr=False, compare=False)

    def applies_to(self, op: str, method: str) -> bool:
        if self.op is not None:
            return self.op == op
        return method in METHODS_BY_OP[op]


@dataclass(frozen=True)
class Decision:
    """What the policy says about one layer.

    ``method == "dense"`` means the layer is left alone and ``reason`` says why. ``rank`` is resolved to an
    integer for ``svd``/``asvd``; ``origin`` is ``"rule N"``, ``"defaults"`` or ``None`` (nothing matched).
    """

    path: str
    op: str
    method: str
    origin: str | None
    rule_index: int | None = None
    reason: str | None = None
    rank: int | None = None
    num_terms: int = 1
    low_rank: int | None = None
    oversample: int = 10
    n_iter: int = 2
    seed: int = 0
    damping: float = ASVD_DAMPING  # asvd: λ / mean(diag(XᵀX)) added to the Gram matrix
    min_speedup: float | None = None  # backend: keep the layer dense unless measured this much faster
    features: int = 256
    kernel: str = "softmax"

    @property
    def rewrites(self) -> bool:
        return self.method != "dense"


def factored_params(method: str, in_features: int, out_features: int, *, rank: int | None = None,
                    num_terms: int = 1, low_rank: int | None = None) -> int:
    """Parameters stored by a factored weight (no bias): r(I+O) for svd, 2Lk(I+O) for sketch.

    The sketch count includes the fixed sign matrices, which are stored as buffers.
    """
    if method in ("svd", "asvd"):
        return rank * (in_features + out_features)
    if method == "sketch":
        return 2 * num_terms * low_rank * (in_features + out_features)
    raise ValueError(f"method {method!r} has no factored weight")


class Policy:
    """An ordered list of rules plus defaults, loaded from TOML, a dict or another Policy.

    >>> policy = Policy.load({"defaults": {"method": "svd", "rank": 0.25}})
    >>> policy.decide("fc1", "linear", in_features=512, out_features=512).rank
    128
    """

    def __init__(self, defaults: Mapping[str, Any], rules: Iterable[Rule], source: str = "<dict>"):
        self.defaults = dict(defaults)
        self.rules = tuple(rules)
        self.source = source

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, policy: "Policy | Mapping[str, Any] | str | Path") -> "Policy":
        """Load a policy from a TOML file path, a dict with ``defaults``/``rule`` keys, or a Policy."""
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, Mapping):
            return cls.from_dict(policy, source="<dict>")
        if isinstance(policy, (str, Path)):
            path = Path(policy)
            try:
                text = path.read_text()
            except OSError as e:
                raise PolicyError(f"cannot read policy file {str(path)!r}: {e.strerror}") from None
            return cls.from_toml(text, source=str(path))
        raise PolicyError(f"a policy must be a TOML path, a dict or a Policy, not {type(policy).__name__}")

    @classmethod
    def from_toml(cls, text: str, source: str = "<toml>") -> "Policy":
        """Parse TOML ``text``; a syntax error is a PolicyError naming ``source`` (a file, or where the text
        was stored) and tomllib's line and column."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{source}: invalid TOML: {e}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "Policy":
        unknown = set(data) - {"defaults", "rule"}
        if unknown:
            key = sorted(unknown)[0]
            hint = " (did you mean 'rule'?)" if key == "rules" else ""
            raise PolicyError(f"{source}: unknown top-level key {key!r}{hint}; allowed: defaults, rule")
        defaults_table = data.get("defaults", {})
        if not isinstance(defaults_table, Mapping):
            raise PolicyError(f"{source}: [defaults] must be a table")
        defaults = _validate(f"{source}: [defaults]", defaults_table, _SETTINGS)
        rule_tables = data.get("rule", [])
        if isinstance(rule_tables, Mapping) or not isinstance(rule_tables, (list, tuple)):
            raise PolicyError(f"{source}: 'rule' must be an array of tables ([[rule]])")
        rules = [cls._parse_rule(source, i, table, defaults) for i, table in enumerate(rule_tables, start=1)]
        policy = cls(defaults, rules, source)
        policy._check_sketch_settings()
        return policy

    @staticmethod
    def _parse_rule(source: str, index: int, table: Any, defaults: Mapping[str, Any]) -> Rule:
        where = f"{source}: rule {index}"
        if not isinstance(table, Mapping):
            raise PolicyError(f"{where}: must be a table")
        settings = _validate(where, table, {**_RULE_ONLY, **_SETTINGS})
        if "match" not in settings:
            raise PolicyError(f"{where}: missing required key 'match'")
        pattern = settings.pop("match")
        op = settings.pop("op", None)
        try:
            matches = compile_pattern(pattern)
        except PatternError as e:
            raise PolicyError(f"{where}: match = {pattern!r}: {e}") from None
        method = settings.get("method", defaults.get("method"))
        if op is not None and method is not None and method not in METHODS_BY_OP[op]:
            inherited = "" if "method" in settings else " (inherited from [defaults]; set method in the rule)"
            raise PolicyError(f"{where}: method = {method!r}{inherited} does not apply to op = {op!r} "
                              f"(allowed: {', '.join(METHODS_BY_OP[op])})")
        return Rule(index, pattern, op, settings, matches)

    def _check_sketch_settings(self) -> None:
        tables = [("[defaults]", self.defaults)] + [(f"rule {r.index}", r.settings) for r in self.rules]
        for where, table in tables:
            merged = {**self.defaults, **table}
            if merged.get("method") == "sketch" and "low_rank" not in merged:
                raise PolicyError(f"{self.source}: {where}: method = 'sketch' needs low_rank "
                                  "(set it in the rule or in [defaults])")

    # ---- matching ------------------------------------------------------------------------------------
    def decide(self, path: str, op: str, *, in_features: int | None = None,
               out_features: int | None = None) -> Decision:
        """Decide one layer. ``in_features``/``out_features`` are required for linear and conv2d (for a conv
        layer, ``in_features = C_in/groups * kh * kw``) and are used to resolve ranks and break-even."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        default_method = self.defaults.get("method")
        for rule in self.rules:
            method = rule.settings.get("method", default_method)
            if method is None:  # nothing names a method: factorize, or Performer for an attention-only rule
                method = "performer" if rule.op == "attention" else "svd"
            if rule.applies_to(op, method) and rule.matches(path):
                return self._resolve(path, op, {**self.defaults, **rule.settings, "method": method},
                                     f"rule {rule.index}", rule.index, in_features, out_features)
        if default_method is not None and default_method in METHODS_BY_OP[op]:
            return self._resolve(path, op, self.defaults, "defaults", None, in_features, out_features)
        return Decision(path, op, "dense", None, reason="no rule matches")

    def _resolve(self, path, op, settings, origin, rule_index, in_features, out_features) -> Decision:
        values = {**_FALLBACKS, **settings}
        values.pop("min_features")
        force = values.pop("force")
        decision = Decision(path, op, origin=origin, rule_index=rule_index, **values)
        where = f"{self.source}: {origin}"
        if decision.method == "dense":
            return replace(decision, reason=f"{origin}: method = 'dense'")
        if op == "attention":
            return decision
        if in_features is None or out_features is None:
            raise ValueError(f"decide({path!r}, {op!r}) needs in_features and out_features")
        smallest = min(in_features, out_features)
        min_features = settings.get("min_features", _FALLBACKS["min_features"])
        if smallest < min_features:
            return replace(decision, method="dense",
                           reason=f"min(I, O) = {smallest} < min_features = {min_features} ({origin})")
        if decision.method in ("svd", "asvd"):
            decision = replace(decision, rank=self._resolve_rank(where, path, settings, smallest))
        elif decision.method == "sketch" and decision.low_rank > smallest:
            raise PolicyError(f"{where}: low_rank = {decision.low_rank} exceeds min(I, O) = {smallest} "
                              f"of layer {path!r}")
        params = factored_params(decision.method, in_features, out_features, rank=decision.rank,
                                 num_terms=decision.num_terms, low_rank=decision.low_rank)
        if params >= in_features * out_features and not force:
            return replace(decision, method="dense",
                           reason=f"below break-even: {params} factored >= {in_features * out_features} dense "
                                  f"parameters ({origin}; force = true rewrites anyway)")
        return decision

    @staticmethod
    def _resolve_rank(where: str, path: str, settings: Mapping[str, Any], smallest: int) -> int:
        rank = settings.get("rank")
        if rank is None:
            raise PolicyError(f"{where}: method = {settings['method']!r} needs a rank "
                              "(set it in the rule or in [defaults])")
        if isinstance(rank, float):
            return max(1, round(rank * smallest))
        if rank > smallest:
            raise PolicyError(f"{where}: rank = {rank} exceeds min(I, O) = {smallest} of layer {path!r}")
        return rank

    def warn_unused(self, decisions: Iterable[Decision], *, skip: Iterable[int] = (), note: str = "") -> list[Rule]:
        """Warn about every rule that matched none of ``decisions``' layers, except the rule indices in
        ``skip``; return those rules. ``note`` is appended to each warning."""
        used = {d.rule_index for d in decisions} | set(skip)
        unused = [r for r in self.rules if r.index not in used]
        for rule in unused:
            warnings.warn(f"{self.source}: rule {rule.index} (match = {rule.match!r}) matched no layer{note}",
                          UserWarning, stacklevel=3)
        return unused

    # ---- writing -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        rules = []
        for rule in self.rules:
            table = {"match": rule.match}
            if rule.op is not None:
                table["op"] = rule.op
            rules.append({**table, **rule.settings})
        return {"defaults": dict(self.defaults), "rule": rules}

    def to_toml(self) -> str:
        """The policy as TOML text that :meth:`load` reads back to an equal policy."""
        data = self.to_dict()
        lines = []
        if data["defaults"]:
            lines.append("[defaults]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in data["defaults"].items()]
        for table in data["rule"]:
            lines += ["", "[[rule]]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines).lstrip("\n") + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Policy(source={self.source!r}, defaults={self.defaults!r}, rules={len(self.rules)})"


# A TOML basic string may not hold a raw newline, DEL or other control character: escape them, and \ and ".
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_char(ch: str) -> str:
    if ch in _TOML_ESCAPES:
        return _TOML_ESCAPES[ch]
    return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(map(_toml_char, value)) + '"'
    return repr(value)


def load_policy(policy: "Policy | Mapping[str, Any] | str | Path | None") -> Policy:
    """Like :meth:`Policy.load`; ``None`` gives the empty policy (every layer stays dense)."""
    return Policy({}, (), "<empty>") if policy is None else Policy.load(policy)
