"""Fine-tune recipe: recover a compressed model's quality by distilling from the dense one.

The student (a model after :func:`panther_fx.convert`) learns to reproduce the teacher's hidden states or
sentence embeddings on unlabeled inputs; only its trainable parameters (the panther factors and whatever
else requires grad) are updated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import call_model

__all__ = ["distill", "hidden_states"]

Batch = Mapping[str, Tensor] | Tensor | tuple


def hidden_states(output: Any) -> Tensor:
    """The (batch, tokens, d) hidden states of a model output: ``.last_hidden_state`` (HF), else the tensor
    itself, else the first element of a tuple."""
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"distill: cannot find hidden states in a {type(output).__name__}; pass features=")


def _mask(batch: Batch, h: Tensor) -> Tensor:
    """(batch, tokens, 1) weights: the attention mask when the batch has one, else all ones."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return h.new_ones(*h.shape[:-1], 1)


def _pooled(h: Tensor, mask: Tensor) -> Tensor:
    """(batch, d) L2-normalised mean over the real tokens: the sentence embedding."""
    return F.normalize((h * mask).sum(-2) / mask.sum(-2).clamp_min(1), dim=-1)


def _similarity_kl(es: Tensor, et: Tensor, temperature: float) -> Tensor:
    """Mean over rows i of KL(p_t(i, .) || p_s(i, .)), p(i, j) = softmax_{j != i}(e_i . e_j / temperature).

    The teacher's in-batch similarity distribution: which other texts of the batch each text is closest to,
    the quantity a retrieval ranking depends on. The diagonal (always 1 for unit vectors) is left out.
    """
    n = es.shape[0]
    if n < 3:
        raise ValueError(f"distill: loss='similarity' needs at least 3 texts per batch, got {n}")
    off = ~torch.eye(n, dtype=torch.bool, device=es.device)
    logits_s = (es @ es.T / temperature)[off].view(n, n - 1)
    logits_t = (et @ et.T / temperature)[off].view(n, n - 1)
    return F.kl_div(F.log_softmax(logits_s, -1), F.log_softmax(logits_t, -1), log_target=True,
                    reduction="batchmean")


def _loss(kind: str, hs: Tensor, ht: Tensor, mask: Tensor, temperature: float) -> Tensor:
    if hs.dim() == 2:  # (batch, d): pooled features, one "token" per example; the token mask does not apply
        hs, ht, mask = hs.unsqueeze(-2), ht.unsqueeze(-2), hs.new_ones(hs.shape[0], 1, 1)
    if kind == "mse":  # mean squared error per feature over the real (unmasked) tokens
        return ((hs - ht) ** 2 * mask).sum() / (mask.sum() * hs.shape[-1]).clamp_min(1)
    es, et = _pooled(hs, mask), _pooled(ht, mask)
    cosine = (1 - (es * et).sum(-1)).mean()
    if kind == "cosine":
        return cosine
    return cosine + _similarity_kl(es, et, temperature)


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[Batch], *, epochs: int = 1,
            lr: float = 1e-4, loss: str = "mse", optimizer: Callable[..., torch.optim.Optimizer] | None = None,
            features: Callable[[Any], Tensor] = hidden_states, max_grad_norm: float | None = 1.0,
            dropout: bool = False, temperature: float = 0.05, progress: bool = True) -> list[float]:
    """Train ``student`` to match ``teacher`` on ``batches``; return the mean loss of each epoch.

    - ``batches``: re-iterable (a list) of model inputs: dicts of keyword tensors (tokenizer outputs), tensors
      or tuples of positional tensors. A dict's ``attention_mask`` masks padding out of the loss of
      (batch, tokens, d) features; (batch, d) features (already pooled by ``features``) ignore it.
    - ``loss``: ``"mse"`` between the (batch, tokens, d) hidden states over real tokens; ``"cosine"``:
      1 − cos between the mean-pooled, normalised sentence embeddings e; ``"similarity"``: that cosine term plus
      KL(teacher || student) of each text's in-batch similarity distribution softmax_j(e_i · e_j / temperature)
      (j ≠ i), which keeps which texts are close to which: put texts that should be compared (e.g. queries and
      their documents) in the same batch.
    - ``optimizer``: a factory ``(params, lr=lr) -> Optimizer`` over the student's trainable parameters
      (default ``torch.optim.AdamW``); ``max_grad_norm`` clips the gradient norm (None: no clipping).
    - ``dropout``: train with the student's dropout on (``student.train()``); off by default, since the target is
      deterministic. The teacher runs in eval mode under ``torch.no_grad()``. Both modes are restored after.
    """
    from tqdm.auto import tqdm

    if loss not in ("mse", "cosine", "similarity"):
        raise ValueError(f"distill: loss must be 'mse', 'cosine' or 'similarity', got {loss!r}")
    if not temperature > 0:
        raise ValueError(f"distill: temperature must be > 0, got {temperature}")
    if epochs < 1:
        raise ValueError(f"distill: epochs must be >= 1, got {epochs}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distill: the student has no parameter that requires grad")
    opt = (optimizer or torch.optim.AdamW)(params, lr=lr)
    # per module: a submodule the caller keeps in eval (a frozen BatchNorm) must come back in eval
    modes = [(m, m.training) for m in (*student.modules(), *teacher.modules())]
    student.train(dropout)
    teacher.eval()
    history: list[float] = []
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            bar = tqdm(batches, desc=f"distill {epoch + 1}/{epochs}", disable=not progress, leave=True)
            for batch in bar:
                with torch.no_grad():
                    target = features(call_model(teacher, batch))
                hs = features(call_model(student, batch))
                value = _loss(loss, hs, target.to(hs.dtype), _mask(batch, hs), temperature)
                opt.zero_grad(set_to_none=True)
                value.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                total, count = total + value.item(), count + 1
                bar.set_postfix(loss=f"{value.item():.4g}")
            if count == 0:
                raise ValueError("distill: batches is empty (or an exhausted iterator: pass a list for epochs > 1)")
            history.append(total / count)
    finally:
        for module, training in modes:
            module.training = training
    return history
