"""Random sketch operators S (d, n): Gaussian, sparse sign (SASO), SRHT and CountSketch.

Every operator is drawn once from a ``torch.Generator`` (or a seed) and then applied along any dim of a
matrix or batch: ``S.apply(A, dim)`` contracts S's n-sized input side with A's dim ``dim`` (so ``dim=-2`` is
S @ A and ``dim=-1`` is A @ Sᵀ), ``S.transpose_apply(B, dim)`` applies Sᵀ the same way. All four satisfy
E[SᵀS] = Iₙ. The structured ones never form S: the sparse ones run ``torch.ops.panther.sparse_sketch``
(a sparse–dense product), the SRHT runs ``torch.ops.panther.fwht``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import is_int
from ._random import as_generator, random_signs

__all__ = [
    "SketchOperator", "GaussianSketch", "SparseSignSketch", "SRHTSketch", "CountSketch", "SKETCHES",
    "make_sketch", "gaussian", "sparse_sign", "srht", "countsketch",
]


def _kernels():
    """``panther_fx.ops.linalg``, imported on first use: ops imports linalg modules, so a top-level import
    here would make the import order matter."""
    from ..ops import linalg

    return linalg


class SketchOperator:
    """Base class: a (sketch_size, input_size) random matrix S with E[SᵀS] = I.

    Subclasses draw their randomness in ``__init__`` and implement ``_apply`` / ``_transpose`` on 2-D
    tensors whose contracted dim is first (``_contract_last = False``) or last (``True``).
    """

    kind = "base"
    _contract_last = False

    def __init__(self, sketch_size: int, input_size: int, *, generator: torch.Generator | int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        for name, value in (("sketch_size", sketch_size), ("input_size", input_size)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{self.kind} sketch: {name} must be a positive int, got {value!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"{self.kind} sketch: dtype must be floating point, got {dtype}")
        self.sketch_size, self.input_size = sketch_size, input_size
        self.dtype, self.device = dtype, torch.device(device)
        self.generator = as_generator(generator)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.sketch_size, self.input_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sketch_size={self.sketch_size}, input_size={self.input_size}, dtype={self.dtype})"

    def apply(self, A: Tensor, dim: int = -2) -> Tensor:
        """S applied along ``dim`` of A: that dim goes from input_size to sketch_size (S @ A for dim=-2)."""
        return self._along(A, dim, self.input_size, self._apply, "apply")

    def transpose_apply(self, B: Tensor, dim: int = -2) -> Tensor:
        """Sᵀ applied along ``dim`` of B: that dim goes from sketch_size to input_size (Sᵀ @ B for dim=-2)."""
        return self._along(B, dim, self.sketch_size, self._transpose, "transpose_apply")

    def to_dense(self) -> Tensor:
        """The dense (sketch_size, input_size) matrix S, for tests and small problems."""
        return self.apply(torch.eye(self.input_size, dtype=self.dtype, device=self.device), dim=0)

    def _along(self, A: Tensor, dim: int, size: int, fn, what: str) -> Tensor:
        if not isinstance(A, Tensor) or not A.is_floating_point():
            raise TypeError(f"{self.kind} sketch {what}: expected a floating-point tensor, got "
                            f"{getattr(A, 'dtype', type(A).__name__)}")
        if not -A.dim() <= dim < A.dim():
            raise ValueError(f"{self.kind} sketch {what}: dim {dim} out of range for shape {tuple(A.shape)}")
        if A.shape[dim] != size:
            raise ValueError(f"{self.kind} sketch {what}: S is {self.shape}, so dim {dim} of A must have size "
                             f"{size}, got shape {tuple(A.shape)}")
        target = -1 if self._contract_last else 0
        X = A.movedim(dim, target)
        moved = X.shape
        X = X.reshape(-1, size) if self._contract_last else X.reshape(size, -1)
        Y = fn(X)
        out_shape = (*moved[:-1], Y.shape[-1]) if self._contract_last else (Y.shape[0], *moved[1:])
        return Y.reshape(out_shape).movedim(target, dim)


class GaussianSketch(SketchOperator):
    """Dense S with i.i.d. N(0, 1/d) entries. Drawn on the generator's device, stored on ``device``."""

    kind = "gaussian"

    def __init__(self, sketch_size: int, input_size: int, **kwargs) -> None:
        super().__init__(sketch_size, input_size, **kwargs)
        g = self.generator
        S = torch.randn(sketch_size, input_size, generator=g, device=g.device, dtype=self.dtype)
        self.matrix = S.mul_(sketch_size ** -0.5).to(self.device)

    def _apply(self, X: Tensor) -> Tensor:
        return self.matrix.to(X) @ X

    def _transpose(self, Y: Tensor) -> Tensor:
        return self.matrix.to(Y).mT @ Y

    def to_dense(self) -> Tensor:
        return self.matrix.clone()


def _distinct_rows(n: int, d: int, k: int, generator: torch.Generator) -> Tensor:
    """(n, k) int64: for each of n columns, k distinct rows drawn uniformly from range(d).

    Floyd's algorithm, vectorized over columns: for j = d-k .. d-1 draw t uniform in [0, j] and keep t, or
    j if t was already chosen. Every k-subset is equally likely; cost O(n k²), independent of d.
    """
    chosen = torch.empty(n, k, dtype=torch.int64, device=generator.device)
    for i, j in enumerate(range(d - k, d)):
        t = torch.randint(0, j + 1, (n,), generator=generator, device=generator.device)
        seen = (chosen[:, :i] == t[:, None]).any(1)
        chosen[:, i] = torch.where(seen, torch.full_like(t, j), t)
    return chosen


class SparseSignSketch(SketchOperator):
    """SASO (RandBLAS's short-axis sparse operator): each column of S has ``vec_nnz`` nonzeros ±1/√vec_nnz in
    distinct uniformly chosen rows, independent across columns (vec_nnz is capped at sketch_size).
    Applying it costs vec_nnz multiply-adds per entry of A."""

    kind = "sparse_sign"

    def __init__(self, sketch_size: int, input_size: int, *, vec_nnz: int = 8, **kwargs) -> None:
        super().__init__(sketch_size, input_size, **kwargs)
        if not is_int(vec_nnz) or vec_nnz < 1:
            raise ValueError(f"{self.kind} sketch: vec_nnz must be a positive int, got {vec_nnz!r}")
        self.vec_nnz = min(vec_nnz, sketch_size)
        g = self.generator
        rows = _distinct_rows(input_size, sketch_size, self.vec_nnz, g)
        vals = random_signs((input_size, self.vec_nnz), generator=g, scale=self.vec_nnz ** -0.5, dtype=self.dtype)
        self.rows, self.vals = rows.to(self.device), vals.to(self.device)

    def _apply(self, X: Tensor) -> Tensor:
        return _kernels().sparse_sketch(X, self.rows.to(X.device), self.vals.to(X), self.sketch_size)

    def _transpose(self, Y: Tensor) -> Tensor:
        return _kernels().sparse_sketch_t(Y, self.rows.to(Y.device), self.vals.to(Y))


class CountSketch(SparseSignSketch):
    """CountSketch (Clarkson–Woodruff): one ±1 per column in a uniformly random row (SASO with vec_nnz = 1)."""

    kind = "countsketch"

    def __init__(self, sketch_size: int, input_size: int, **kwargs) -> None:
        super().__init__(sketch_size, input_size, vec_nnz=1, **kwargs)


class SRHTSketch(SketchOperator):
    """Subsampled randomized Hadamard transform S = √(N/d) · P H D on x zero-padded to N = 2^⌈log₂ n⌉.

    D: n random signs; H: the orthonormal Hadamard transform of size N (``torch.ops.panther.fwht``);
    P: d distinct rows of N sampled uniformly without replacement. Each column of S has unit norm, so
    E[SᵀS] = I exactly on the diagonal. Needs d <= N.
    """

    kind = "srht"
    _contract_last = True

    def __init__(self, sketch_size: int, input_size: int, **kwargs) -> None:
        super().__init__(sketch_size, input_size, **kwargs)
        self.padded_size = 1 << (input_size - 1).bit_length()
        if sketch_size > self.padded_size:
            raise ValueError(f"srht sketch: sketch_size {sketch_size} exceeds the padded input size {self.padded_size}")
        g = self.generator
        self.signs = random_signs((input_size,), generator=g, dtype=self.dtype, device=self.device)
        perm = torch.randperm(self.padded_size, generator=g, device=g.device)
        self.index = perm[:sketch_size].sort().values.to(self.device)
        self.scale = math.sqrt(self.padded_size / sketch_size)

    def _apply(self, X: Tensor) -> Tensor:
        Z = X * self.signs.to(X)
        Z = torch.nn.functional.pad(Z, (0, self.padded_size - self.input_size))
        return _kernels().fwht(Z).index_select(-1, self.index.to(X.device)).mul_(self.scale)

    def _transpose(self, Y: Tensor) -> Tensor:
        Z = Y.new_zeros((Y.shape[0], self.padded_size))
        Z.index_copy_(-1, self.index.to(Y.device), Y * self.scale)
        return _kernels().fwht(Z)[:, :self.input_size] * self.signs.to(Y)


SKETCHES: dict[str, type[SketchOperator]] = {
    "gaussian": GaussianSketch, "sparse_sign": SparseSignSketch, "srht": SRHTSketch, "countsketch": CountSketch,
}

gaussian, sparse_sign, srht, countsketch = GaussianSketch, SparseSignSketch, SRHTSketch, CountSketch


def make_sketch(kind: str, sketch_size: int, input_size: int, **kwargs) -> SketchOperator:
    """A sketch operator by name (``"gaussian"``, ``"sparse_sign"``, ``"srht"``, ``"countsketch"``).

    Keyword arguments (``generator``, ``dtype``, ``device``, ``vec_nnz`` for sparse_sign) go to the class.
    """
    try:
        cls = SKETCHES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sketch {kind!r}; expected one of {sorted(SKETCHES)}") from None
    return cls(sketch_size, input_size, **kwargs)
