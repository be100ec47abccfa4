"""Policies: load, validate and match rules that decide how each layer is sketched."""

from .pattern import PatternError, compile_pattern, exact_pattern
from .policy import (
    METHODS_BY_OP,
    OPS,
    Decision,
    Policy,
    PolicyError,
    Rule,
    factored_params,
    load_policy,
)

__all__ = [
    "Decision", "METHODS_BY_OP", "OPS", "PatternError", "Policy", "PolicyError", "Rule",
    "compile_pattern", "exact_pattern", "factored_params", "load_policy",
]
