"""Module-path patterns of policy rules.

A pattern is either a segment-aware glob or, with the ``re:`` prefix, a regular expression that must match
the whole dotted module path (``re.fullmatch``). In a glob the path is split at dots:

- ``*`` as a whole segment matches exactly one segment (``encoder.layer.*.output.dense`` does not match
  ``encoder.layer.0.attention.output.dense``, unlike ``fnmatch``);
- ``**`` as a whole segment matches any number of segments, zero included;
- inside a segment, ``*`` matches any run of characters and ``?`` one character, never a dot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["compile_pattern", "exact_pattern", "PatternError"]


class PatternError(ValueError):
    """A pattern that cannot be compiled; the message says why."""


def _segment_regex(segment: str) -> str:
    if segment == "*":
        return r"[^.]+"
    out = []
    for ch in segment:
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def _glob_regex(glob: str) -> str:
    """Regex over ``"." + path`` (``""`` for the root): every segment contributes ``\\.<segment>``."""
    segments = glob.split(".")
    if any(s == "" for s in segments):
        raise PatternError(f"empty path segment in glob {glob!r}")
    parts = []
    for segment in segments:
        if segment == "**":
            parts.append(r"(?:\.[^.]+)*")
        elif "**" in segment:
            raise PatternError(f"'**' must be a whole path segment in glob {glob!r}")
        else:
            parts.append(r"\." + _segment_regex(segment))
    return "".join(parts)


@dataclass(frozen=True)
class _Matcher:
    """``matches(path) -> bool``. A class holding the compiled regex rather than a closure, so that a Policy,
    and a model converted with one (``model.panther_policy``), can be pickled."""

    regex: re.Pattern
    dotted: bool  # a glob's regex runs over "." + path (see _glob_regex)

    def __call__(self, path: str) -> bool:
        return self.regex.fullmatch("." + path if self.dotted and path else path) is not None


def compile_pattern(pattern: str) -> _Matcher:
    """Return ``matches(path) -> bool`` for a policy ``match`` string.

    Raises :class:`PatternError` for an empty glob segment, a misplaced ``**`` or an invalid regex.
    """
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as e:
            raise PatternError(f"invalid regular expression {pattern[3:]!r}: {e}") from None
        return _Matcher(regex, dotted=False)
    return _Matcher(re.compile(_glob_regex(pattern)), dotted=True)


def exact_pattern(path: str) -> str:
    """A ``match`` string selecting exactly the module at ``path``: the path itself, or an escaped ``re:``
    pattern when the path is empty or holds characters a glob or the ``re:`` prefix would read (``*``, ``?``,
    a ``ModuleDict`` key such as ``"w?"``)."""
    if not path or any(c in path for c in "*?") or path.startswith("re:"):
        return "re:" + re.escape(path)
    return path
