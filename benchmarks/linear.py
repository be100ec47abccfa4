"""Dense ``nn.Linear`` vs the panther linear ops (low-rank and sketched), forward and forward+backward.

    python benchmarks/linear.py --device cpu --dtype float32 --tokens 1,64,4096 --sizes 1024,4096x1024 --ranks 32,128

Columns: ``dense_ms`` (nn.Linear through autograd), ``op_ms`` (the panther op through autograd, native kernels
when ``panther_fx._C`` is loaded), ``x_dense`` = dense_ms / op_ms, ``ref_ms`` / ``x_ref`` (the op's pure-PyTorch
reference bodies called directly vs the op's registered kernels called directly, forward and backward op alike:
the native-kernel gain with autograd left out), and ``eff`` / ``dense_eff``, the roofline efficiency
max(FLOPs / peak FLOP rate, bytes / peak bandwidth) / time, with both peaks measured in the same run (a large GEMM
in the benchmark dtype and a large copy). FLOPs and bytes are the ideal ones (the rank-r intermediate stays on
chip; backward = 2x forward FLOPs). For "sketched" the rank r is the total rank 2Lk (k = r / (2L)).
Timing: CUDA events after warm-up on GPU, perf_counter medians on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tabulate import tabulate

import panther_fx
from panther_fx.ops import linear as linear_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Peaks:
    flops: float  # FLOP/s of a large GEMM in the benchmark dtype
    bandwidth: float  # bytes/s of a large copy (read + write)


class Timer:
    """Median wall time in seconds: CUDA events on GPU, perf_counter on CPU.

    ``many(fns)`` runs the functions round-robin (after a warm-up of each), so that load from other processes
    on a shared machine hits all of them alike, and returns one median per function.
    """

    def __init__(self, device: torch.device, reps: int, warmup: int, min_time: float):
        self.device, self.reps, self.warmup, self.min_time = device, reps, warmup, min_time

    def __call__(self, fn: Callable[[], object]) -> float:
        return self.many([fn])[0]

    def many(self, fns: list[Callable[[], object]]) -> list[float]:
        for fn in fns:
            for _ in range(self.warmup):
                fn()
        times: list[list[float]] = [[] for _ in fns]
        start = time.perf_counter()
        while len(times[0]) < self.reps or (time.perf_counter() - start < self.min_time
                                            and len(times[0]) < 20 * self.reps):
            for fn, samples in zip(fns, times):
                samples.append(self._once(fn))
        return [statistics.median(samples) for samples in times]

    def _once(self, fn) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def measure_peaks(timer: Timer, device: torch.device, dtype: torch.dtype) -> Peaks:
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / timer(lambda: torch.mm(a, b))
    numel = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / timer(lambda: dst.copy_(src))
    return Peaks(flops, bandwidth)


def make_case(method: str, N: int, I: int, O: int, r: int, L: int, dtype, device, grad: bool):
    """Inputs of the panther op (with bias) and of the equivalent dense layer."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)

    x = rnd(N, I)
    bias = rnd(O, scale=0.1)
    if method == "lowrank":
        factors = (rnd(O, r, scale=r**-0.5), rnd(r, I, scale=I**-0.5))
    else:
        k = r // (2 * L)
        factors = (rnd(L, I, k, scale=I**-0.5), rnd(L, k, O, scale=k**-0.5),
                   rnd(L, k, O, scale=k**-0.5), rnd(L, I, k, scale=I**-0.5))
    dense = torch.nn.Linear(I, O, device=device, dtype=dtype).requires_grad_(grad)
    return x, factors, bias, dense


def ideal_cost(method: str, N: int, I: int, O: int, r: int, elt: int, backward: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of the ideal computation: every operand read once, the intermediate kept on chip."""
    if method == "dense":
        flops, weights = 2 * N * I * O, I * O
    else:
        flops, weights = 2 * N * r * (I + O), r * (I + O)
    nbytes = (N * I + weights + O + N * O) * elt
    if backward:  # gradients: 2x the FLOPs; read gy, x, weights again, write gx and the weight gradients
        flops *= 3
        nbytes += (N * O + N * I + 2 * weights + 2 * N * I + O) * elt
    return float(flops), float(nbytes)


def efficiency(cost: tuple[float, float], seconds: float, peaks: Peaks) -> float:
    flops, nbytes = cost
    return max(flops / peaks.flops, nbytes / peaks.bandwidth) / seconds


def run_case(args, timer: Timer, peaks: Peaks, method: str, N: int, I: int, O: int, r: int, backward: bool) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    x, factors, bias, dense = make_case(method, N, I, O, r, args.num_terms, dtype, device, grad=backward)
    op = torch.ops.panther.lowrank_linear if method == "lowrank" else torch.ops.panther.sketched_linear
    ref_fwd = linear_ops.lowrank_linear_body if method == "lowrank" else linear_ops.sketched_linear_body
    bwd_op = (torch.ops.panther.lowrank_linear_backward if method == "lowrank"
              else torch.ops.panther.sketched_linear_backward)
    ref_bwd = (linear_ops.lowrank_linear_backward_body if method == "lowrank"
               else linear_ops.sketched_linear_backward_body)
    needs = [True] * (len(factors) + 2)
    gy = torch.randn(N, O, device=device, dtype=dtype)
    params = [x, *factors, bias, *dense.parameters()]

    def autograd_step(fn):
        def step():
            for p in params:
                p.grad = None
            fn().backward(gy)
        return step

    with torch.no_grad():
        plain = [t.detach() for t in (x, *factors, bias)]
    if backward:
        dense_fn = autograd_step(lambda: dense(x))
        op_fn = autograd_step(lambda: op(x, *factors, bias))
        direct_fn = lambda: (op(*plain), bwd_op(gy, *plain[:-1], needs))  # noqa: E731
        ref_fn = lambda: (ref_fwd(*plain), ref_bwd(gy, *plain[:-1], needs))  # noqa: E731
    else:
        dense_fn = torch.no_grad()(lambda: dense(x))
        op_fn = torch.no_grad()(lambda: op(x, *factors, bias))
        direct_fn, ref_fn = op_fn, torch.no_grad()(lambda: ref_fwd(*plain))
    t_dense, t_op, t_direct, t_ref = timer.many([dense_fn, op_fn, direct_fn, ref_fn])
    elt = torch.empty((), dtype=dtype).element_size()
    return {
        "method": method, "mode": "fwd+bwd" if backward else "fwd", "tokens": N, "in": I, "out": O, "r": r,
        "dense_ms": t_dense * 1e3, "op_ms": t_op * 1e3, "x_dense": t_dense / t_op,
        "ref_ms": t_ref * 1e3, "x_ref": t_ref / t_direct,
        "eff": efficiency(ideal_cost(method, N, I, O, r, elt, backward), t_op, peaks),
        "dense_eff": efficiency(ideal_cost("dense", N, I, O, r, elt, backward), t_dense, peaks),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024,4096x1024' -> [(1024, 1024), (4096, 1024)] as (in, out)."""
    sizes = []
    for item in text.split(","):
        i, _, o = item.partition("x")
        sizes.append((int(i), int(o or i)))
    return sizes


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=ints, default=ints("1,16,256,4096,32768"))
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1024,4096,8192,4096x1024,1024x4096"),
                   help="comma list of IN or INxOUT")
    p.add_argument("--ranks", type=ints, default=ints("32,128,512,1024"))
    p.add_argument("--methods", default="lowrank,sketched")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--num-terms", type=int, default=1, help="L for the sketched op (k = r / 2L)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.2, help="keep timing until this many seconds have passed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--tablefmt", default="github")
    p.add_argument("--cuda-fused-limits", type=ints, default=None, metavar="MAX_TOKENS,MAX_WORK",
                   help="set the CUDA fused small-token kernel's limits (tokens <= MAX_TOKENS and "
                        "tokens*in*rank <= MAX_WORK; 0,0 turns it off) to measure the crossover")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_fused_limits:
        if not panther_fx.kernel_info()["extension_cuda"]:
            p.error("--cuda-fused-limits needs panther_fx._C built with CUDA kernels")
        print("# CUDA fused limits [max_tokens, max_work]:", torch.ops.panther._cuda_fused_limits(*args.cuda_fused_limits))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)  # benchmark inputs only; library code never touches the global RNG
    timer = Timer(device, args.reps, args.warmup, args.min_time)
    peaks = measure_peaks(timer, device, dtype)
    info = panther_fx.kernel_info()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"device {name}, dtype {args.dtype}, threads {torch.get_num_threads()}, extension {info['extension']}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"# measured peaks: GEMM {peaks.flops / 1e12:.3f} TFLOP/s ({args.dtype}), copy {peaks.bandwidth / 1e9:.1f} GB/s")
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            rows = []
            for I, O in args.sizes:
                for r in args.ranks:
                    if r * (I + O) >= I * O or (method == "sketched" and r % (2 * args.num_terms)):
                        continue  # no rewrite below break-even; sketched needs r divisible by 2L
                    for N in args.tokens:
                        rows.append(run_case(args, timer, peaks, method, N, I, O, r, mode == "fwd+bwd"))
            # One table per (method, mode) as soon as it is complete, so a run cut short keeps what it measured.
            print(tabulate(rows, headers="keys", tablefmt=args.tablefmt, floatfmt=".3f"), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
