"""``RandMultiheadAttention``: ``nn.MultiheadAttention`` with Performer (FAVOR+) attention.

Same constructor (plus keyword-only ``num_features``, ``kernel``, ``seed``), same parameter names and
layout (``in_proj_weight``/``in_proj_bias`` or ``q/k/v_proj_weight``, ``out_proj``), so
``load_state_dict`` of an ``nn.MultiheadAttention`` state works, and the same forward signature. The
differences are explicit:

- it returns ``(output, None)``: Performer never forms the attention matrix, so ``need_weights=True``
  raises (its default is ``False`` so that ``m(q, k, v)`` works);
- ``attn_mask`` is accepted only together with ``is_causal=True`` (as a hint, like PyTorch's); other masks
  cannot be linearized and raise; padding goes through ``key_padding_mask`` (bool or additive float);
- ``dropout`` drops whole keys per head in the numerator (see
  :func:`~panther_fx.ops.attention.performer_multi_head_attention`), the linear-time analogue of attention
  dropout;
- ``add_bias_kv``/``add_zero_attn`` are not supported.

The feature matrix (num_features, head_dim) and the projections are drawn from ``seed`` (an int or a
``torch.Generator``) and never touch the global RNG; ``seed=None`` draws that seed from the global RNG, as
``nn.MultiheadAttention`` draws its weights. :meth:`RandMultiheadAttention.redraw_features` redraws the
features in place (periodic redraws during training are what the Performer paper recommends); where the
redraws stand is the buffer ``feature_rng``, so a copy loaded from the state dict redraws what the original
would.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..linalg.features import orthogonal_features, redraw_features_
from ..ops.attention import KERNELS, performer_multi_head_attention
from ._init import Seed, seeded_generator, uniform

__all__ = ["RandMultiheadAttention"]


class RandMultiheadAttention(nn.Module):
    """Multi-head attention with FAVOR+ attention in O(L·m·d) time and memory.

    Shapes as ``nn.MultiheadAttention``: query (L, N, E) or (N, L, E) with ``batch_first``, key (S, N, kdim),
    value (S, N, vdim), key_padding_mask (N, S); unbatched (L, E) inputs work too. Output (L, N, E), or
    (N, L, E) with ``batch_first``, or (L, E) for unbatched inputs.
    """

    # nn.TransformerEncoderLayer's fused fast path (eval + no grad) reads in_proj_weight and computes exact
    # attention itself; it is skipped when this is False, so the Performer forward is never bypassed.
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 num_features: int = 256, kernel: str = "softmax", seed: Seed = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"RandMultiheadAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if add_bias_kv or add_zero_attn:
            raise ValueError("RandMultiheadAttention: add_bias_kv and add_zero_attn are not supported")
        if kernel not in KERNELS:
            raise ValueError(f"RandMultiheadAttention: kernel must be one of {KERNELS}, got {kernel!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"RandMultiheadAttention: dropout must be in [0, 1), got {dropout}")
        if num_features < 1:
            raise ValueError(f"RandMultiheadAttention: num_features must be >= 1, got {num_features}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.kernel, self.num_features = kernel, num_features
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # skip_init: nn.Linear's own init would draw from the global RNG; _reset_parameters draws it from seed
        self.out_proj = nn.utils.skip_init(nn.modules.linear.NonDynamicallyQuantizableLinear, embed_dim, embed_dim,
                                           bias=bias, device=device if device is not None else
                                           torch.get_default_device(), dtype=dtype)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        generator = seeded_generator(seed)
        self.register_buffer("features", orthogonal_features(num_features, self.head_dim, generator=generator,
                                                             device=device))
        self._reset_parameters(generator)
        # (seed of the redraw stream, redraws done): state, so that a loaded copy redraws like the original
        stream_seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        self.register_buffer("feature_rng", torch.tensor([stream_seed, 0], dtype=torch.int64, device=device))

    @torch.no_grad()
    def _reset_parameters(self, generator: torch.Generator) -> None:
        """nn.MultiheadAttention's initialization, drawn from ``generator``: Xavier-uniform projections,
        ``out_proj.weight`` as ``nn.Linear`` draws it (U(±1/√E)), zero biases."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                fan_out, fan_in = w.shape
                w.copy_(uniform(tuple(w.shape), math.sqrt(6.0 / (fan_in + fan_out)), generator, device=w.device,
                                dtype=w.dtype))
        weight = self.out_proj.weight
        weight.copy_(uniform(tuple(weight.shape), 1.0 / math.sqrt(self.embed_dim), generator, device=weight.device,
                             dtype=weight.dtype))
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # States saved before feature_rng existed keep this module's own stream; an nn.MultiheadAttention state
        # has neither buffer, and keeps this module's features too.
        state_dict.setdefault(prefix + "feature_rng", self.feature_rng.clone())
        state_dict.setdefault(prefix + "features", self.features.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | int | None = None) -> None:
        """Draw a new feature matrix in place (compiled graphs see it without recompiling). With no
        argument the next draw of the module's own stream (``feature_rng``, seeded at construction) is used;
        an explicit ``generator`` leaves that stream where it is."""
        if generator is None:
            self.feature_rng[1] += 1
            stream_seed, draws = self.feature_rng.tolist()
            generator = torch.Generator().manual_seed((stream_seed * 1_000_003 + draws) % 2**63)
        redraw_features_(self.features, generator=generator)

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, *, num_features: int = 256, kernel: str = "softmax",
                   seed: Seed = 0) -> "RandMultiheadAttention":
        """A Performer copy of ``mha``: same projection weights and biases, dropout and layout; the features
        are drawn from ``seed`` (0 by default, like the other ``from_dense``)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("RandMultiheadAttention.from_dense: add_bias_kv/add_zero_attn are not supported")
        weight = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device=weight.device,
                  dtype=weight.dtype, num_features=num_features, kernel=kernel, seed=seed)
        state = {k: v for k, v in mha.state_dict().items() if v is not None}
        missing, unexpected = new.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise ValueError(f"RandMultiheadAttention.from_dense: state mismatch (missing {missing}, "
                             f"unexpected {unexpected})")
        return new.train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("RandMultiheadAttention: need_weights=True is not supported: Performer attention never "
                             "forms the attention weights; call with need_weights=False")
        if attn_mask is not None and not is_causal:
            raise ValueError("RandMultiheadAttention: attn_mask cannot be linearized; pass key_padding_mask (N, S) "
                             "for padding or is_causal=True for a causal mask")
        self._check_inputs(query, key, value)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif self.batch_first:  # keep self-attention recognisable (one packed in-projection GEMM)
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        out = performer_multi_head_attention(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
            self.out_proj.bias, self.features, key_padding_mask, kernel=self.kernel, causal=is_causal,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            dropout_p=self.dropout, training=self.training)
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """The shape errors nn.MultiheadAttention gives, instead of a failing GEMM or reshape further in."""
        shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        if query.dim() not in (2, 3) or not query.dim() == key.dim() == value.dim():
            raise ValueError(f"RandMultiheadAttention: query, key and value must all be 2-D (unbatched) or all "
                             f"3-D, got {shapes}")
        for name, t, size in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != size:
                raise ValueError(f"RandMultiheadAttention: {name} has {t.shape[-1]} features, expected {size} "
                                 f"({shapes})")
        batch = 0 if self.batch_first else 1
        if key.shape[:-1] != value.shape[:-1] or (query.dim() == 3 and query.shape[batch] != key.shape[batch]):
            layout = "(L, E)" if query.dim() == 2 else ("(N, L, E)" if self.batch_first else "(L, N, E)")
            raise ValueError(f"RandMultiheadAttention: key and value must have the same length and batch as each "
                             f"other and the query's batch, in the layout {layout}; got {shapes}")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_features={self.num_features}, "
                f"kernel={self.kernel!r}, dropout={self.dropout}, batch_first={self.batch_first}")
