"""Trainable factored linear layers whose forward is a single ``torch.ops.panther`` op.

- :class:`SKLinear`: Panther's sketched layer (Kasiviswanathan et al. 2017), same constructor, layout and
  math: y = 1/(2L) Σ_i (x S1_i U1_i + x U2_i S2_i) + b with learned S1_i (I, k), S2_i (k, O) and fixed
  ±1/√k signs U1_i (k, O), U2_i (I, k) stored as buffers.
- :class:`LowRankLinear`: y = (x Bᵀ) Aᵀ + b with learned A (O, r), B (r, I).

Both are built from a dense ``nn.Linear`` with ``from_dense`` through the same factorization code as the
``panther`` backend (:mod:`panther_fx.linalg.lowrank`), and from precomputed factors with ``from_factors``
(what :func:`panther_fx.convert` uses). Randomness is explicit: a ``seed`` (int or ``torch.Generator``);
``seed=None`` draws one from torch's default generator, like ``nn.Linear`` draws its weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops  # noqa: F401  (registers torch.ops.panther.*)
from ..linalg import sketch_factors, sketch_weight, svd_factors
from ._init import Seed, check_sizes, seeded_generator, uniform

__all__ = ["SKLinear", "LowRankLinear"]

def _linear_like_weight(out_features: int, in_features: int, generator: torch.Generator, **factory) -> Tensor:
    """An (O, I) weight drawn as ``nn.Linear`` draws it: kaiminguniform(a=√5) = U(±1/√I)."""
    return uniform((out_features, in_features), 1.0 / math.sqrt(in_features), generator, **factory)


def _linear_like_bias(out_features: int, in_features: int, generator: torch.Generator, **factory) -> Tensor:
    """An (O,) bias drawn as ``nn.Linear`` draws it: U(±1/√I) (Panther used 1/√O)."""
    return uniform((out_features,), 1.0 / math.sqrt(in_features), generator, **factory)


def _copy_bias(linear: nn.Linear) -> Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


class SKLinear(nn.Module):
    """Panther's sketched linear layer: y = 1/(2L) Σ_i (x S1_i U1_i + x U2_i S2_i) + b.

    Shapes: x (..., I) -> y (..., O); parameters ``S1s`` (L, I, k), ``S2s`` (L, k, O), ``bias`` (O,);
    buffers ``U1s`` (L, k, O), ``U2s`` (L, I, k) with entries ±1/√k. The effective (O, I) weight is
    ``dense_weight()``. Stored numbers: 2Lk(I + O) (+ O), against I·O for ``nn.Linear``.

    With ``W_init`` (an (O, I) weight, e.g. ``linear.weight``) the factors are its unbiased sketch
    S1_i = Wᵀ U1_iᵀ, S2_i = U2_iᵀ Wᵀ, and the bias is drawn fresh (use :meth:`from_dense` to copy it).
    Without it, W and the bias are drawn as ``nn.Linear`` draws them (bound 1/√I; Panther used 1/√O), W is
    sketched and S1, S2 are rescaled so the sketched weight has the Frobenius norm of W: the sketch's noise
    alone would inflate it by √(1 + (I+O)/(4Lk)) and the outputs with it, so this keeps activations at the
    scale of ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, num_terms: int, low_rank: int,
                 W_init: Tensor | None = None, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, seed: Seed = None) -> None:
        super().__init__()
        if min(in_features, out_features, num_terms, low_rank) < 1:
            raise ValueError(f"SKLinear: in_features={in_features}, out_features={out_features}, "
                             f"num_terms={num_terms} and low_rank={low_rank} must all be >= 1")
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        generator = seeded_generator(seed)
        if W_init is not None:
            if tuple(W_init.shape) != (out_features, in_features):
                raise ValueError(f"SKLinear: W_init must be (out_features, in_features) = "
                                 f"({out_features}, {in_features}) like nn.Linear.weight, got {tuple(W_init.shape)}")
            W = W_init.detach().to(**factory)
        else:
            W = _linear_like_weight(out_features, in_features, generator, **factory)
        S1, S2, U1, U2 = sketch_factors(W, num_terms, low_rank, generator=generator)
        if W_init is None:
            with torch.no_grad():
                scale = torch.linalg.matrix_norm(W.double()) / torch.linalg.matrix_norm(
                    sketch_weight(S1.double(), S2.double(), U1.double(), U2.double()))
                S1, S2 = S1 * scale.to(S1.dtype), S2 * scale.to(S2.dtype)
        b = _linear_like_bias(out_features, in_features, generator, **factory) if bias else None
        self._set_factors(S1, S2, U1, U2, b)

    def _set_factors(self, S1: Tensor, S2: Tensor, U1: Tensor, U2: Tensor, bias: Tensor | None) -> None:
        self.num_terms, self.in_features, self.low_rank = S1.shape
        self.out_features = S2.shape[2]
        self.S1s = nn.Parameter(S1.detach().contiguous())
        self.S2s = nn.Parameter(S2.detach().contiguous())
        self.register_buffer("U1s", U1.detach().contiguous())
        self.register_buffer("U2s", U2.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous())

    @classmethod
    def from_factors(cls, S1: Tensor, S2: Tensor, U1: Tensor, U2: Tensor,
                     bias: Tensor | None = None) -> "SKLinear":
        """A layer holding the given factors (copied): S1 (L, I, k), S2 (L, k, O), U1 (L, k, O), U2 (L, I, k)."""
        L, I, k = S1.shape
        O = S2.shape[2]
        expected = {"S2": (L, k, O), "U1": (L, k, O), "U2": (L, I, k)}
        for name, t in (("S2", S2), ("U1", U1), ("U2", U2)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"SKLinear.from_factors: {name} must be {expected[name]} given S1 {tuple(S1.shape)}, "
                                 f"got {tuple(t.shape)}")
        if bias is not None and tuple(bias.shape) != (O,):
            raise ValueError(f"SKLinear.from_factors: bias must be ({O},), got {tuple(bias.shape)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_factors(*(t.clone() for t in (S1, S2, U1, U2)), None if bias is None else bias.clone())
        return module

    @classmethod
    def from_dense(cls, linear: nn.Linear, num_terms: int, low_rank: int, *, seed: Seed = 0) -> "SKLinear":
        """Sketch ``linear.weight`` with :func:`panther_fx.linalg.sketch_factors` and copy its bias.

        The result is an unbiased but noisy estimate of the layer (relative error ≈ √((I+O)/(4Lk))): an
        initialisation for training, not post-training compression (use :class:`LowRankLinear` there).
        """
        check_sizes("SKLinear.from_dense", num_terms=num_terms, low_rank=low_rank)
        S1, S2, U1, U2 = sketch_factors(linear.weight, num_terms, low_rank, generator=seeded_generator(seed))
        return cls.from_factors(S1, S2, U1, U2, _copy_bias(linear))

    def dense_weight(self) -> Tensor:
        """The (O, I) weight this layer computes with (differentiable in S1s, S2s)."""
        return sketch_weight(self.S1s, self.S2s, self.U1s, self.U2s)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.panther.sketched_linear(x, self.S1s, self.S2s, self.U1s, self.U2s, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_terms={self.num_terms}, "
                f"low_rank={self.low_rank}, bias={self.bias is not None}")


class LowRankLinear(nn.Module):
    """y = (x Bᵀ) Aᵀ + b: a linear layer whose (O, I) weight is the rank-r product A B.

    Shapes: x (..., I) -> y (..., O); parameters ``A`` (O, r), ``B`` (r, I), ``bias`` (O,). Stored numbers:
    r(I + O) (+ O), against I·O for ``nn.Linear``.

    Initialisation keeps ``nn.Linear``'s output variance: B ~ U(±1/√I) (a Linear I -> r) and A ~ U(±√(3/r)),
    so each entry of A B has variance r · (1/r) · 1/(3I) = 1/(3I), that of U(±1/√I); bias U(±1/√I).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 seed: Seed = None) -> None:
        super().__init__()
        if min(in_features, out_features, rank) < 1:
            raise ValueError(f"LowRankLinear: in_features={in_features}, out_features={out_features} and "
                             f"rank={rank} must all be >= 1")
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        generator = seeded_generator(seed)
        a = math.sqrt(3.0 / rank)
        A = uniform((out_features, rank), a, generator, **factory)
        B = _linear_like_weight(rank, in_features, generator, **factory)
        b = _linear_like_bias(out_features, in_features, generator, **factory) if bias else None
        self._set_factors(A, B, b)

    def _set_factors(self, A: Tensor, B: Tensor, bias: Tensor | None) -> None:
        self.out_features, self.rank = A.shape
        self.in_features = B.shape[1]
        self.A = nn.Parameter(A.detach().contiguous())
        self.B = nn.Parameter(B.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous())

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None = None) -> "LowRankLinear":
        """A layer holding copies of A (O, r), B (r, I) and the optional bias (O,)."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"LowRankLinear.from_factors: need A (O, r) and B (r, I), got {tuple(A.shape)} "
                             f"and {tuple(B.shape)}")
        if bias is not None and tuple(bias.shape) != (A.shape[0],):
            raise ValueError(f"LowRankLinear.from_factors: bias must be ({A.shape[0]},), got {tuple(bias.shape)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_factors(A.clone(), B.clone(), None if bias is None else bias.clone())
        return module

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int, *, oversample: int = 10, n_iter: int = 2,
                   seed: Seed = 0) -> "LowRankLinear":
        """Best rank-``rank`` approximation of ``linear.weight`` by :func:`panther_fx.linalg.svd_factors`
        (exact SVD for small layers, randomized SVD otherwise), A = U√S, B = √S Vh; the bias is copied.
        ``rank`` must lie in [1, min(I, O)]."""
        check_sizes("LowRankLinear.from_dense", rank=rank)
        smallest = min(linear.in_features, linear.out_features)
        if rank > smallest:  # a truncated SVD has at most that many terms: a larger rank would be clamped
            raise ValueError(f"LowRankLinear.from_dense: rank={rank} exceeds min(in_features, out_features) = "
                             f"{smallest} of {linear}")
        A, B = svd_factors(linear.weight, rank, oversample=oversample, n_iter=n_iter, generator=seeded_generator(seed))
        return cls.from_factors(A, B, _copy_bias(linear))

    def dense_weight(self) -> Tensor:
        """The (O, I) weight A B this layer computes with."""
        return self.A @ self.B

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.panther.lowrank_linear(x, self.A, self.B, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
