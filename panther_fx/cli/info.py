"""``panther-fx info``: which panther ops run native CPU/CUDA kernels, torch/CUDA versions and the device."""

from __future__ import annotations

import argparse
import json

from tabulate import tabulate

from ..ops import kernel_info


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="native kernels, torch/CUDA versions and device", description=__doc__)
    p.add_argument("--json", action="store_true", help="print kernel_info() as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    info = kernel_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    cuda = f"CUDA {info['cuda_runtime']}" if info["cuda_runtime"] else "no CUDA (CPU build of torch)"
    print(f"torch {info['torch']}, {cuda}, device: {info['device']}, TF32 matmul: {info['tf32_matmul']}")
    kernels = "with CUDA kernels" if info["extension_cuda"] else "CPU kernels only"
    ext = f"{info['extension']} ({kernels})" if info["extension"] == "loaded" else info["extension"]
    print(f"native extension panther_fx._C: {ext}")
    rows = [(name, _mark(k["cpu"]), _mark(k["cuda"]), _mark(k["autograd"])) for name, k in info["ops"].items()]
    print(tabulate(rows, headers=["op", "native CPU", "native CUDA", "native autograd"], tablefmt="simple"))
    print("(ops without a native kernel run their pure-PyTorch body; without native autograd, a Python formula)")


def _mark(native: bool) -> str:
    return "yes" if native else "-"
