"""panther_fx.linalg against the PyTorch / SciPy routines it replaces: time and accuracy.

    python benchmarks/linalg.py --device cpu                 # moderate CPU sizes (the docs/linalg.md table)
    python benchmarks/linalg.py --device cuda                # the issue's H100 sizes
    python benchmarks/linalg.py --device cpu --only fwht,rsvd --reps 5

Tables (times are medians over ``--reps`` runs after one warm-up; CUDA synchronized around each run):
* rsvd: ``panther_fx.linalg.rsvd`` (gaussian and sparse_sign test matrices) vs ``torch.svd_lowrank`` (same
  q = rank + 10 columns, niter = 2) and the full ``torch.linalg.svd``; ``err/opt`` is ‖A − U S Vh‖_F over the
  optimal rank-r error (the full SVD's tail), on A = G₁ diag(i^-1/2) G₂ᵀ (slow decay, the hard case).
* cqrrpt vs ``torch.linalg.qr`` (Householder, reduced Q and R) and ``scipy.linalg.qr(pivoting=True,
  mode="economic")`` (CPU; the column says n/a without SciPy), all interleaved: ``rec`` = ‖AP − QR‖/‖A‖,
  ``orth`` = ‖QᵀQ − I‖_F, both in units of the dtype's eps; speedups are ratios of medians.
* sketched_lstsq vs ``torch.linalg.lstsq`` (the default driver; gels on CUDA): residual relative to the best.
* fwht (``torch.ops.panther.fwht``, native kernel if registered, and its reference body) and the SRHT apply:
  achieved bandwidth 2·bytes/time against the copy roofline measured in the same run (``x.clone()``).
* sparse: ``panther::sparse_sketch(_t)`` against their reference bodies at the shapes the solvers use.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Callable

import torch
from tabulate import tabulate

from panther_fx.linalg import cqrrpt, make_sketch, rsvd, sketched_lstsq
from panther_fx.ops import kernel_info
from panther_fx.ops.linalg import (fwht, fwht_body, sparse_sketch, sparse_sketch_body, sparse_sketch_t,
                                   sparse_sketch_t_body)

SIZES = {
    "cpu": dict(rsvd=(2048, 2048, 64), cqrrpt=(100_000, 200), lstsq=(100_000, 200), fwht=(4096, 1024)),
    "cuda": dict(rsvd=(8192, 8192, 256), cqrrpt=(262_144, 512), lstsq=(262_144, 512), fwht=(16384, 4096)),
    "smoke": dict(rsvd=(256, 200, 16), cqrrpt=(4000, 40), lstsq=(4000, 40), fwht=(64, 256)),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="rsvd,cqrrpt,lstsq,fwht,sparse", help="comma-separated subset of tables")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    return p.parse_args()


_SMOKE = False


def _sizes(device: str) -> str:
    return "smoke" if _SMOKE else device


def timed(fn: Callable[[], object], reps: int, device: str) -> tuple[float, object]:
    """Median milliseconds over ``reps`` runs after a warm-up (``reps=0``: one cold run), and the last result.

    CUDA runs are timed with CUDA events on the current stream (which also cover any host syncs inside fn).
    """
    out = None if reps == 0 else fn()
    times = []
    for _ in range(max(reps, 1)):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def slow_decay(m: int, n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    k = min(m, n)
    G1 = torch.randn(m, k, generator=g, device=device, dtype=dtype) / math.sqrt(m)
    G2 = torch.randn(n, k, generator=g, device=device, dtype=dtype) / math.sqrt(n)
    return (G1 * torch.arange(1, k + 1, device=device, dtype=dtype) ** -0.5) @ G2.t()


def bench_rsvd(device: str, reps: int) -> list[list]:
    m, n, r = SIZES[_sizes(device)]["rsvd"]
    A = slow_decay(m, n, device, torch.float32)
    t_svd, full = timed(lambda: torch.linalg.svd(A, full_matrices=False), 0, device)  # slow: one run
    optimal = full[1][r:].double().norm().item()

    def err(U, S, Vh):
        return (torch.linalg.norm(A - (U[:, :r] * S[:r]) @ Vh[:r]).item()) / optimal

    runs = {
        "torch.linalg.svd (full, 1 run)": (lambda: full, t_svd),
        "torch.svd_lowrank q=r+10": (lambda: _svd_lowrank(A, r + 10), None),
        "rsvd gaussian": (lambda: rsvd(A, r, generator=0), None),
        "rsvd sparse_sign": (lambda: rsvd(A, r, generator=0, sketch="sparse_sign"), None),
        "rsvd srht": (lambda: rsvd(A, r, generator=0, sketch="srht"), None),
    }
    rows = []
    for name, (fn, t) in runs.items():
        if t is None:
            t, out = timed(fn, reps, device)
        else:
            out = fn()
        rows.append([name, f"{m}x{n} r={r} fp32", f"{t:.1f}", f"{err(*out):.4f}"])
    return rows


def _svd_lowrank(A: torch.Tensor, q: int):
    U, S, V = torch.svd_lowrank(A, q=q, niter=2)
    return U, S, V.mT


def _qr_errors(A, Q, R, piv=None) -> tuple[float, float]:
    eps = torch.finfo(A.dtype).eps
    Ap = A if piv is None else A[:, piv]
    rec = (torch.linalg.norm(Ap.double() - Q.double() @ R.double()) / torch.linalg.norm(A.double())).item()
    I = torch.eye(Q.shape[1], device=Q.device, dtype=torch.float64)
    orth = torch.linalg.norm(Q.double().mT @ Q.double() - I).item()
    return rec / eps, orth / eps


def bench_cqrrpt(device: str, reps: int) -> list[list]:
    """All methods run interleaved ``reps`` times (SciPy included on the CPU), so a load change on a shared
    machine hits them alike; the speedup columns are ratios of the medians."""
    m, n = SIZES[_sizes(device)]["cqrrpt"]
    rows = []
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator(device=device).manual_seed(1)
        A = torch.randn(m, n, generator=g, device=device, dtype=dtype) * torch.logspace(0, -4, n, device=device, dtype=dtype)
        label = f"{m}x{n} {str(dtype)[6:]} cond~1e4"
        runs = {
            "torch.linalg.qr (Householder)": lambda: (*torch.linalg.qr(A), None),
            "cqrrpt sparse_sign": lambda: cqrrpt(A, generator=0),
            "cqrrpt pivoting=False": lambda: cqrrpt(A, generator=0, pivoting=False),
        }
        if device == "cpu":
            runs["scipy.linalg.qr pivoting"] = _scipy_qrcp(A)
        else:  # "auto" is LU pivoting on the device; this row is the host geqp3 it replaced
            runs["cqrrpt qrcp_backend=scipy"] = lambda: cqrrpt(A, generator=0, qrcp_backend="scipy")
        times, outs = _interleaved(runs, reps, device)
        t_qr, t_sp = times["torch.linalg.qr (Householder)"], times.get("scipy.linalg.qr pivoting")
        for name, (Q, R, piv) in outs.items():
            t = times[name]
            vs_scipy = "" if t_sp is None else f"{t_sp / t:.2f}" if isinstance(t_sp, float) else t_sp
            rows.append([name, label, f"{t:.1f}", f"{t_qr / t:.2f}", vs_scipy, *_fmt(_qr_errors(A, Q, R, piv)), Q.shape[1]])
    return rows


def _interleaved(runs: dict[str, Callable[[], object]], reps: int, device: str) -> tuple[dict, dict]:
    """Median milliseconds per run name over ``reps`` rounds that each run every callable once (after one
    warm-up round), and each one's last output. A callable that is None is reported as "n/a"."""
    live = {name: fn for name, fn in runs.items() if fn is not None}
    outs = {name: fn() for name, fn in live.items()}
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(max(reps, 1)):
        for name, fn in live.items():
            t, outs[name] = timed(fn, 0, device)
            times[name].append(t)
    medians: dict = {name: statistics.median(ts) for name, ts in times.items()}
    medians.update({name: "n/a (no scipy)" for name, fn in runs.items() if fn is None})
    return medians, outs


def _scipy_qrcp(A: torch.Tensor) -> Callable[[], tuple] | None:
    """``scipy.linalg.qr(A, pivoting=True, mode="economic")`` as a callable returning torch tensors, or None
    without SciPy (it is not a dependency of panther_fx)."""
    try:
        import scipy.linalg
    except ImportError:
        return None
    a = A.numpy()

    def run():
        Q, R, piv = scipy.linalg.qr(a, mode="economic", pivoting=True)
        return torch.from_numpy(Q), torch.from_numpy(R), torch.from_numpy(piv)

    return run


def _fmt(errs: tuple[float, float]) -> list[str]:
    return [f"{e:.1f}" for e in errs]


def bench_lstsq(device: str, reps: int) -> list[list]:
    m, n = SIZES[_sizes(device)]["lstsq"]
    g = torch.Generator(device=device).manual_seed(2)
    rows = []
    for cond_exp in (0, 6):
        A = torch.randn(m, n, generator=g, device=device, dtype=torch.float64)
        A = A * torch.logspace(0, -cond_exp, n, device=device, dtype=torch.float64)
        b = A @ torch.randn(n, generator=g, device=device, dtype=torch.float64)
        b = b + 1e-3 * torch.randn(m, generator=g, device=device, dtype=torch.float64)
        label = f"{m}x{n} fp64 col-scale 1e-{cond_exp}"
        t_ref, x_ref = timed(lambda: torch.linalg.lstsq(A, b[:, None]).solution[:, 0], reps, device)
        best = torch.linalg.norm(A @ x_ref - b).item()
        rows.append(["torch.linalg.lstsq", label, f"{t_ref:.1f}", "0"])
        for method in ("precondition", "sketch"):
            t, x = timed(lambda: sketched_lstsq(A, b, method=method, generator=0), reps, device)
            excess = torch.linalg.norm(A @ x - b).item() / best - 1
            rows.append([f"sketched_lstsq {method}", label, f"{t:.1f}", f"{excess:.1e}"])
    return rows


def bench_fwht(device: str, reps: int) -> list[list]:
    """FWHT (native kernel if registered, and the reference body) against a copy of the same tensor."""
    rows_, n = SIZES[_sizes(device)]["fwht"]
    out = []
    for dtype, shape in ((torch.float32, (rows_, n)), (torch.float64, (rows_, n)), (torch.float32, (rows_ // 64, 64 * n))):
        x = torch.randn(*shape, device=device, dtype=dtype)
        label = f"{shape[0]}x{shape[1]} {str(dtype)[6:]}"
        nbytes = 2 * x.numel() * x.element_size()  # read + write
        runs = {"copy (x.clone())": lambda: x.clone(), "panther::fwht": lambda: fwht(x),
                "fwht reference body": lambda: fwht_body(x)}
        if dtype == torch.float32 and shape == (rows_, n):
            S = make_sketch("srht", n // 8, n, generator=0, device=device)
            runs["SRHT apply d=n/8"] = lambda: S.apply(x, dim=-1)
        times, _ = _interleaved(runs, reps, device)
        t_copy = times["copy (x.clone())"]
        for name, t in times.items():
            out.append([name, label, f"{t:.2f}", f"{nbytes / t / 1e6:.1f}", f"{100 * t_copy / t:.0f}%"])
    return out


def bench_sparse(device: str, reps: int) -> list[list]:
    """panther::sparse_sketch / sparse_sketch_t (native kernel if registered) against their reference bodies,
    at the shapes cqrrpt (d = 1.25 n), sketched_lstsq (d = 4 n) and rsvd (A applied along its last dim) use."""
    m, n = SIZES[_sizes(device)]["cqrrpt"]
    rm, rn, r = SIZES[_sizes(device)]["rsvd"]
    out = []
    for dtype in (torch.float32, torch.float64):
        for what, rows_, cols, d, transposed in (("cqrrpt S@A", m, n, math.ceil(1.25 * n), False),
                                                  ("lstsq S@A", m, n, 4 * n, False),
                                                  ("rsvd A@S^T", rn, rm, r + 10, True)):
            S = make_sketch("sparse_sign", d, rows_, generator=0, dtype=dtype, device=device)
            A = torch.randn(cols, rows_, device=device, dtype=dtype).mT if transposed else \
                torch.randn(rows_, cols, device=device, dtype=dtype)
            G = torch.randn(d, cols, device=device, dtype=dtype)
            shape = f"{cols}x{rows_}" if transposed else f"{rows_}x{cols}"  # A's own shape
            label = f"{what} {shape} d={d} {str(dtype)[6:]}"
            runs = {"sparse_sketch": lambda: sparse_sketch(A, S.rows, S.vals, d),
                    "sparse_sketch reference": lambda: sparse_sketch_body(A, S.rows, S.vals, d),
                    "sparse_sketch_t": lambda: sparse_sketch_t(G, S.rows, S.vals),
                    "sparse_sketch_t reference": lambda: sparse_sketch_t_body(G, S.rows, S.vals)}
            times, _ = _interleaved(runs, reps, device)
            for op in ("sparse_sketch", "sparse_sketch_t"):
                t, t_ref = times[op], times[f"{op} reference"]
                out.append([op, label, f"{t:.2f}", f"{t_ref:.2f}", f"{t_ref / t:.1f}"])
    return out


TABLES = {
    "rsvd": (bench_rsvd, ["method", "problem", "ms", "err/opt"]),
    "cqrrpt": (bench_cqrrpt, ["method", "problem", "ms", "x vs torch qr", "x vs scipy", "rec/eps", "orth/eps", "rank"]),
    "lstsq": (bench_lstsq, ["method", "problem", "ms", "residual/best - 1"]),
    "fwht": (bench_fwht, ["kernel", "tensor", "ms", "GB/s", "of copy"]),
    "sparse": (bench_sparse, ["op", "problem", "ms", "reference ms", "x vs reference"]),
}


def main() -> None:
    global _SMOKE
    args = parse_args()
    _SMOKE = args.smoke
    if args.threads:
        torch.set_num_threads(args.threads)
    info = kernel_info()
    device_name = info["device"] if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, device {device_name}, threads {torch.get_num_threads()}, "
          f"extension {info['extension']}, tf32 matmul {info['tf32_matmul']}")
    for name in args.only.split(","):
        fn, headers = TABLES[name]
        print(f"\n## {name}\n")
        print(tabulate(fn(args.device, args.reps), headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
