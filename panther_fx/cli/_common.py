"""Helpers shared by the CLI subcommands: loading user objects and reporting user errors."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from torch import nn

__all__ = ["CLIError", "load_object", "build_model", "positive_int"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2, no traceback."""


def load_object(spec: str) -> Any:
    """Resolve ``pkg.module:attr`` (the current directory is importable, like ``python -m``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"expected 'pkg.module:name', got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CLIError(f"cannot import {module_name!r}: {e}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise CLIError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def build_model(spec: str) -> nn.Module:
    """Call the factory ``pkg.module:name`` and check that it returns an ``nn.Module``."""
    factory = load_object(spec)
    if not callable(factory):
        raise CLIError(f"{spec} is a {type(factory).__name__}, not a callable returning an nn.Module")
    model = factory()
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1, refused with the flag's name by argparse otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
