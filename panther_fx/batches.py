"""How panther_fx passes a user's batch to a model: one convention for calibration, distillation and tuning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["call_model"]


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping (a tokenizer output), ``model(*batch)`` for a tuple or list, else
    ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
