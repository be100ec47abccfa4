"""Per-layer reports of what a rewrite or a conversion did, printed as a table."""

from __future__ import annotations

from dataclasses import dataclass

from tabulate import tabulate

__all__ = ["LayerReport", "Report"]


@dataclass(frozen=True)
class LayerReport:
    """One layer: what it was, what it became and why.

    ``flop_ratio`` is factored / dense multiply-adds per token (< 1 is cheaper); ``rel_error`` is
    ‖W - Ŵ‖_F / ‖W‖_F of the factored weight Ŵ, or for asvd the error on the calibration inputs
    ‖(W - Ŵ) S‖_F / ‖W S‖_F with S Sᵀ = XᵀX. ``status`` is ``"rewritten"`` or ``"dense"``.
    """

    path: str
    op: str
    method: str
    shape: tuple[int, ...]
    status: str
    reason: str | None = None
    rank: int | None = None
    params_before: int = 0
    params_after: int = 0
    flop_ratio: float | None = None
    rel_error: float | None = None
    speedup: float | None = None  # measured dense / rewritten forward time (policy key min_speedup)


class Report(list):
    """A list of :class:`LayerReport` with totals and a tabulated view."""

    HEADERS = ("layer", "op", "method", "shape", "rank", "params before", "params after", "flops ×",
               "rel. error", "status")

    @property
    def rewritten(self) -> list[LayerReport]:
        return [r for r in self if r.status == "rewritten"]

    def params(self) -> tuple[int, int]:
        """Weight parameters (bias excluded) of the reported layers before and after."""
        return sum(r.params_before for r in self), sum(r.params_after for r in self)

    def table(self, tablefmt: str = "simple") -> str:
        """One row per layer; a "speedup ×" column (measured, policy key ``min_speedup``) when any row has one."""
        measured = any(r.speedup is not None for r in self)
        rows = []
        for r in self:
            status = r.status if r.reason is None else f"{r.status}: {r.reason}"
            speedup = ("" if r.speedup is None else f"{r.speedup:.2f}",) if measured else ()
            rows.append((r.path or "<root>", r.op, r.method, "×".join(map(str, r.shape)),
                         "" if r.rank is None else r.rank, r.params_before, r.params_after,
                         "" if r.flop_ratio is None else f"{r.flop_ratio:.3f}",
                         "" if r.rel_error is None else f"{r.rel_error:.4f}", *speedup, status))
        headers = self.HEADERS[:-1] + (("speedup ×",) if measured else ()) + self.HEADERS[-1:]
        before, after = self.params()
        summary = (f"{len(self.rewritten)} of {len(self)} layers rewritten; weight parameters "
                   f"{before:,} -> {after:,}" + (f" ({after / before:.1%})" if before else ""))
        return tabulate(rows, headers=headers, tablefmt=tablefmt) + "\n" + summary

    def __str__(self) -> str:
        return self.table()
