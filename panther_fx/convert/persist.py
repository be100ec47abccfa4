"""Saving and loading converted models: safetensors for the tensors, the policy as TOML in its metadata.

No pickle anywhere: a saved file is tensors plus text. The stored policy is the one :func:`convert` left on
the model: one exact-path rule per rewritten layer with its resolved settings. Loading rebuilds the
architecture from user code (``model_factory``), converts it with the stored policy and loads every tensor
strictly, so the learned factors overwrite the fresh factorization.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..policy import Policy, PolicyError
from .convert import POLICY_ATTR, convert

__all__ = ["save", "load", "read_policy"]

FORMAT = "panther_fx/1"
_FORMAT_KEY = "panther_fx.format"
_POLICY_KEY = "panther_fx.policy"


def save(model: nn.Module, path: str | os.PathLike, *, policy: Any = None) -> None:
    """Write ``model``'s state (parameters and persistent buffers) to a safetensors file at ``path``, with the
    policy that rebuilds its structure stored as TOML text in the file's metadata: ``policy``, else the layers
    :func:`convert` rewrote (``model.panther_policy``, every call's). Tied tensors are stored once."""
    from safetensors.torch import save_model

    chosen = policy if policy is not None else getattr(model, POLICY_ATTR, None)
    if chosen is None:
        raise ValueError("panther_fx.save: the model was not converted with panther_fx.convert and no policy= "
                         "was given; the policy is needed to rebuild the model at load time")
    save_model(model, str(path), metadata={_FORMAT_KEY: FORMAT, _POLICY_KEY: Policy.load(chosen).to_toml()})


def read_policy(path: str | os.PathLike) -> Policy:
    """The policy stored in a file written by :func:`save`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as e:  # its message ("header too large") names no file
        raise PolicyError(f"{path}: not a safetensors file ({e}); load reads files written by panther_fx.save") \
            from None
    if metadata.get(_FORMAT_KEY) != FORMAT or _POLICY_KEY not in metadata:
        raise PolicyError(f"{path}: not a panther_fx checkpoint (no {_POLICY_KEY!r} in its safetensors metadata); "
                          "write it with panther_fx.save")
    return Policy.from_toml(metadata[_POLICY_KEY], source=f"{Path(path).name}[{_POLICY_KEY}]")


def load(path: str | os.PathLike, model_factory: Callable[[], nn.Module], *, calibration: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`: ``model_factory()`` (the dense architecture), :func:`convert`
    with the stored policy, then a strict load of every saved tensor (factors included) over it.

    ``calibration`` (from :func:`panther_fx.calibration.calibrate`) is only needed for a file whose stored
    policy uses ``asvd``, which files written since convert stores resolved layers no longer do (an asvd layer
    is stored as svd of its rank: the loaded factors replace the fresh ones either way).
    """
    from safetensors.torch import load_model

    policy = read_policy(path)
    model = model_factory()
    convert(model, policy, calibration=calibration)
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"panther_fx.load({str(path)!r}): the saved tensors do not fit model_factory() converted "
                           f"with the stored policy ({policy.source}); is it the same architecture?\n{e}") from None
    return model
