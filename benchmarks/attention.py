"""Performer attention (``torch.ops.panther.performer_attention``) vs exact SDPA vs a plain PyTorch Performer,
and native kernels vs the op's pure-PyTorch reference.

    python benchmarks/attention.py --device cuda --dtype bfloat16
    python benchmarks/attention.py --device cpu --dtype float32 --lengths 512,1024,2048,4096 --dims 64 --features 64,256
    python benchmarks/attention.py --device cpu --methods panther,reference --lengths 512,2048,8192 --dims 64 \
        --features 256

For every (L, d, m, kernel, causal, pass) the table gives milliseconds and, on CUDA, peak memory above the
inputs (MiB) of the chosen ``--methods`` (default: all four):

- ``sdpa``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA: the honest baseline;
  exact attention, so it has no kernel or feature count of its own and is repeated across those rows);
- ``panther``: the op through autograd (its native kernels where ``panther_fx._C`` registers them for the
  device, else its pure-PyTorch body);
- ``reference``: the op's pure-PyTorch forward and backward bodies called directly (what ``panther`` runs
  under ``PANTHER_NO_EXT=1``): the baseline a native kernel has to beat;
- ``plain``: a textbook PyTorch Performer: the same feature maps, non-causal as two matmuls, causal as the
  prefix sum of the (L, m, dv) outer products ``cumsum(φ(K)ᵢ ⊗ Vᵢ)`` (what performer_pytorch falls back to).

``x_<method>`` = method / panther (> 1: panther is faster). Configurations whose estimated working set exceeds
``--max-gib`` are skipped for that method ("-"). Timing: the methods run interleaved (one call of each per
repeat, so load changes hit them alike) and the median of ``--reps`` is reported; CUDA events after warm-up on
GPU, perf_counter on CPU. Inputs: q, k, v ~ N(0, 1) of shape (batch, heads, L, d) in ``--dtype``; the op
accumulates in float32, SDPA in its kernels' precision.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

import panther_fx  # noqa: F401  (registers torch.ops.panther.*)
from panther_fx.linalg.features import orthogonal_features
from panther_fx.ops import attention as attention_ops
from panther_fx.passes.speed import median_ms

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("sdpa", "panther", "reference", "plain")


def headers(methods: list[str]) -> tuple[str, ...]:
    others = [name for name in methods if name != "panther"]
    return (("L", "d", "m", "kernel", "causal", "pass") + tuple(f"{name}_ms" for name in methods)
            + tuple(f"x_{name}" for name in others) + tuple(f"{name}_MiB" for name in methods))


def plain_performer(q, k, v, W, kernel: str, causal: bool):
    """The naive Performer in a few lines of PyTorch, in the input dtype (no float32 accumulation)."""
    m, d = W.shape
    W = W.to(q.dtype)
    if kernel == "relu":
        phi_q, phi_k = (torch.relu(x @ W.t()) / math.sqrt(m) for x in (q, k))
    else:
        s = d ** -0.25
        def phi(x, dims):
            logits = (x * s) @ W.t() - 0.5 * (x * s).square().sum(-1, keepdim=True)
            return torch.exp(logits - logits.amax(dim=dims, keepdim=True).detach()) / math.sqrt(m)
        phi_q, phi_k = phi(q, (-1,)), phi(k, (-2, -1))
    if not causal:
        num = phi_q @ (phi_k.transpose(-2, -1) @ v)
        den = phi_q @ phi_k.sum(-2).unsqueeze(-1)
        return num / den
    kv = torch.cumsum(phi_k.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)  # (B, H, L, m, dv)
    num = (phi_q.unsqueeze(-2) @ kv).squeeze(-2)
    den = (phi_q * phi_k.cumsum(-2)).sum(-1, keepdim=True)
    return num / den


class ReferencePerformer(torch.autograd.Function):
    """The op's pure-PyTorch forward and backward bodies, bypassing any native kernel."""

    @staticmethod
    def forward(ctx, q, k, v, W, kernel: str, causal: bool):
        ctx.save_for_backward(q, k, v, W)
        ctx.kernel, ctx.causal = kernel, causal
        return attention_ops.performer_attention_body(q, k, v, W, None, kernel_fn=kernel, causal=causal)

    @staticmethod
    def backward(ctx, g):
        q, k, v, W = ctx.saved_tensors
        needs = [*ctx.needs_input_grad[:4], False]
        grads = attention_ops.performer_attention_backward_body(g, q, k, v, W, None, ctx.kernel, ctx.causal,
                                                                    None, needs)
        return (*grads[:4], None, None)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _working_set_gib(method: str, B: int, H: int, L: int, d: int, m: int, causal: bool, itemsize: int) -> float:
    """Rough largest live intermediate: the L×L scores for math SDPA on CPU, the (L, m, dv) prefix sums of the
    plain causal Performer, the features otherwise."""
    if method == "plain" and causal:  # the outer products, their cumsum and the batched matmul's copy
        return 3 * B * H * L * m * d * itemsize / 2**30
    if method == "sdpa":
        return 0.0
    return B * H * L * (m + 2 * d) * 4 / 2**30


def _step(fn, q, k, v, backward: bool):
    def run():
        out = fn(q, k, v)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def bench(args) -> list[tuple]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    rows = []
    for L in args.lengths:
        for d in args.dims:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(args.batch, args.heads, L, d, generator=g, device=device, dtype=dtype)
                       .requires_grad_() for _ in range(3))
            for m in args.features:
                W = orthogonal_features(m, d, generator=0, device=device)
                for kernel in args.kernels:
                    for causal in args.causal:
                        for mode in args.modes:
                            rows.append(_one(args, device, q, k, v, W, L, d, m, kernel, causal, mode))
                            print(tabulate([rows[-1]], headers=headers(args.methods), tablefmt="plain"), flush=True)
    return rows


def _one(args, device, q, k, v, W, L, d, m, kernel, causal, mode) -> tuple:
    backward = mode == "fwd+bwd"
    methods = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "panther": lambda q, k, v: torch.ops.panther.performer_attention(q, k, v, W, kernel_fn=kernel, causal=causal),
        "reference": lambda q, k, v: ReferencePerformer.apply(q, k, v, W, kernel, causal),
        "plain": lambda q, k, v: plain_performer(q, k, v, W, kernel, causal),
    }
    steps, mems = {}, {}
    for name in args.methods:
        gib = _working_set_gib(name, args.batch, args.heads, L, d, m, causal, q.element_size())
        if gib * (3 if backward else 1) > args.max_gib or (name == "sdpa" and L > args.max_sdpa_len):
            continue
        steps[name] = _step(methods[name], q, k, v, backward)
    with torch.enable_grad() if backward else torch.no_grad():
        times = median_ms(steps, device, warmup=args.warmup, repeats=args.reps)
        for name, step in steps.items():
            mems[name] = _peak_mib(step, device)
    q.grad = k.grad = v.grad = None
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
    mib = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    base = times.get("panther")
    return ((L, d, m, kernel, causal, mode) + tuple(fmt(times.get(name)) for name in args.methods)
            + tuple(ratio(times.get(name), base) for name in args.methods if name != "panther")
            + tuple(mib(mems.get(name)) for name in args.methods))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--lengths", type=_ints, default=None,
                        help="default: 512..131072 on CUDA, 512..4096 on CPU")
    parser.add_argument("--dims", type=_ints, default=[64, 128])
    parser.add_argument("--features", type=_ints, default=[64, 256, 512])
    parser.add_argument("--kernels", type=lambda s: s.split(","), default=["softmax", "relu"])
    parser.add_argument("--causal", type=lambda s: [x == "1" or x.lower() == "true" for x in s.split(",")],
                        default=[False, True], help="comma list of 0/1")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                        help=f"comma list of {', '.join(METHODS)}; ratios are taken against panther")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=None, help="skip a method above this working set")
    parser.add_argument("--max-sdpa-len", type=int, default=None, help="skip exact SDPA above this length")
    args = parser.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown or "panther" not in args.methods:
        parser.error(f"--methods must include panther and may only name {METHODS}, got {args.methods}")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.lengths = args.lengths or ([512 * 2**i for i in range(9)] if cuda else [512, 1024, 2048, 4096])
    args.max_gib = args.max_gib if args.max_gib is not None else (40.0 if cuda else 4.0)
    args.max_sdpa_len = args.max_sdpa_len or (131072 if cuda else 8192)  # CPU SDPA forms L×L blocks
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{name}, {args.dtype}, batch {args.batch}, heads {args.heads}, threads {torch.get_num_threads()}, "
          f"kernels: {panther_fx.kernel_info()}")
    rows = bench(args)
    print()
    print(tabulate(rows, headers=headers(args.methods), tablefmt="github"))


if __name__ == "__main__":
    main()
