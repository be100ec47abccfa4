"""Calibration for activation-aware factorization (method ``asvd``): per-layer input Gram matrices XᵀX.

    grams = calibrate(model, batches, policy="minilm-asvd.toml")
    compiled = torch.compile(model, backend="panther", options={"policy": ..., "calibration": grams})
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .batches import call_model
from .policy import load_policy

__all__ = ["calibrate"]


def _selected_paths(model: nn.Module, policy: Any) -> list[str]:
    """Paths of the nn.Linear modules to calibrate: all of them, or those the policy sends to asvd."""
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if policy is None:
        return [path for path, _ in linears]
    policy = load_policy(policy)
    return [path for path, m in linears
            if policy.decide(path, "linear", in_features=m.in_features, out_features=m.out_features).method == "asvd"]


def _token_mask(batch: Any) -> torch.Tensor | None:
    """The (batch, seq) attention mask of a tokenizer-style batch, to leave padding tokens out of XᵀX."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        mask = batch["attention_mask"]
        return mask.bool() if mask.dim() == 2 else None
    return None


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], *, policy: Any = None) -> dict[str, torch.Tensor]:
    """Run ``model`` eagerly on ``batches`` and return XᵀX (I, I), float64, per nn.Linear path.

    X stacks every input row a layer saw (all leading dimensions flattened). A batch is a dict of keyword
    arguments (a tokenizer output: rows at padded positions, ``attention_mask == 0``, are left out of the
    layers whose input is batch-first (batch, seq, features) like the mask; a sequence-first layer keeps its
    padded rows, and one whose seq equals batch would be masked transposed, so calibrate such models with
    unpadded batches), a tuple/list of positional arguments, or one tensor. With ``policy``, only the layers it sends to
    ``asvd`` are recorded. The result is what ``options={"calibration": ...}`` and
    ``convert(..., calibration=...)`` take.

    The model runs in eval mode (dropout off, batch norm on its running statistics), so the Gram matrices
    describe the inputs the layers see at inference and are the same from run to run; every module's own
    train/eval mode is restored after.
    """
    paths = set(_selected_paths(model, policy))
    grams: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(path: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = current["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            gram = x.T @ x
            grams[path] = grams[path] + gram if path in grams else gram
        return record

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in model.named_modules()
               if path in paths and isinstance(m, nn.Linear)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        seen = 0
        for batch in batches:
            current["mask"] = _token_mask(batch)
            call_model(model, batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if seen == 0:
        raise ValueError("calibrate: no calibration batches were given")
    return grams
