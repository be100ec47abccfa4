"""Real accuracy of low-rank Conv2d: a small CNN on Fashion-MNIST, compressed through the panther backend.

1. Train a small CNN on the official 60k/10k split (Debian package ``dataset-fashion-mnist``, read by path).
2. For each rank fraction, compile it with ``backend="panther"`` (policy: svd on every conv but the first)
   and measure test accuracy and the conv parameter reduction from the backend's report.
3. Fine-tune a copy whose convs are ``LowRankConv2d.from_dense`` (same ranks, same factorization code) for a
   short while and measure the recovered accuracy, next to the dense model given the same fine-tune (so the
   extra epochs alone are not counted as recovery).

    python benchmarks/conv_quality.py --epochs 3 --finetune-epochs 1 --ranks 0.5 0.25 0.125

Everything runs on the CPU in float32; the rewritten graph is run eagerly (``use_inductor=False``): Inductor
changes speed, not the factors (tests/test_conv.py checks Inductor against the eager rewritten graph).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from panther_fx.backend import last_report, panther_backend
from panther_fx.nn import LowRankConv2d
from panther_fx.policy import Policy

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip) as a numpy array: magic (2 zero bytes, dtype 0x08, ndim), big-endian dims, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(*dims)


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(DATA / f"{name}-images-idx3-ubyte.gz")
    labels = read_idx(DATA / f"{name}-labels-idx1-ubyte.gz")
    x = (torch.from_numpy(images.copy()).float().div_(255).sub_(MEAN).div_(STD)).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


class SmallCNN(nn.Module):
    """conv16 -> pool -> conv32 -> pool -> conv64 -> conv64 -> global average -> linear (≈60k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn2, self.bn3, self.bn4 = nn.BatchNorm2d(32), nn.BatchNorm2d(64), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def train(model: nn.Module, data, epochs: int, lr: float, batch: int, seed: int, label: str) -> None:
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  {label}: epoch done, last loss {loss.item():.3f}", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, data, batch: int = 1000) -> float:
    x, y = data
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def policy_for(rank: float) -> dict:
    """svd at ``rank`` (fraction of min(C·kh·kw, O)) on every conv except the 1-channel stem."""
    return {"defaults": {"method": "svd", "rank": rank}, "rule": [{"match": "conv1", "method": "dense"},
                                                                 {"match": "fc", "method": "dense"}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--ranks", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_data, test_data = load_split("train"), load_split("t10k")

    start = time.perf_counter()
    model = SmallCNN()
    train(model, train_data, args.epochs, args.lr, args.batch, args.seed, "dense")
    dense_acc = accuracy(model, test_data)
    print(f"dense: {dense_acc:.2f}% after {args.epochs} epochs ({time.perf_counter() - start:.0f} s)", flush=True)

    # The same fine-tune applied to the dense model: what the extra epochs alone are worth.
    baseline = copy.deepcopy(model)
    train(baseline, train_data, args.finetune_epochs, args.finetune_lr, args.batch, args.seed + 1, "dense fine-tune")
    dense_tuned_acc = accuracy(baseline, test_data)
    print(f"dense + the same fine-tune: {dense_tuned_acc:.2f}%", flush=True)

    rows, results = [], {"dense_accuracy": dense_acc, "dense_finetuned_accuracy": dense_tuned_acc,
                         "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "ranks": []}
    for rank in args.ranks:
        model.requires_grad_(False)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=panther_backend, fullgraph=True,
                                 options={"policy": policy_for(rank), "use_inductor": False})
        compressed_acc = accuracy(compiled, test_data)
        report = last_report()
        conv_rows = [r for r in report if r.op == "conv2d"]
        before, after = sum(r.params_before for r in conv_rows), sum(r.params_after for r in conv_rows)
        convs = {r.path: r for r in conv_rows if r.status == "rewritten"}

        tuned = copy.deepcopy(model).requires_grad_(True)
        for path, row in convs.items():
            setattr(tuned, path, LowRankConv2d.from_dense(getattr(tuned, path), row.rank))
        tune_start = time.perf_counter()
        train(tuned, train_data, args.finetune_epochs, args.finetune_lr, args.batch, args.seed + 1, f"rank {rank}")
        tuned_acc = accuracy(tuned, test_data)
        ranks = ", ".join(f"{p}:{r.rank} ({r.rel_error:.2f})" for p, r in convs.items())
        rows.append((rank, ranks, f"{before:,} -> {after:,}", f"{before / after:.2f}x", f"{dense_acc:.2f}",
                     f"{compressed_acc:.2f}", f"{tuned_acc:.2f}", f"{tuned_acc - dense_acc:+.2f}",
                     f"{tuned_acc - dense_tuned_acc:+.2f}"))
        results["ranks"].append({"rank": rank, "layer_ranks": {p: r.rank for p, r in convs.items()},
                                 "kernel_rel_errors": {p: r.rel_error for p, r in convs.items()},
                                 "conv_params_before": before, "conv_params_after": after,
                                 "compressed_accuracy": compressed_acc, "finetuned_accuracy": tuned_acc,
                                 "finetune_seconds": time.perf_counter() - tune_start})
        print(f"rank {rank}: compressed {compressed_acc:.2f}%, fine-tuned {tuned_acc:.2f}%", flush=True)

    print(tabulate(rows, headers=("rank", "layer: rank (kernel rel. error)", "conv weights", "reduction", "dense acc %",
                                  "compressed acc %", f"fine-tuned ({args.finetune_epochs} ep) acc %",
                                  "Δ vs dense", "Δ vs dense + fine-tune"), tablefmt="github"))
    print(f"Policy: {Policy.load(policy_for(args.ranks[0])).to_dict()}; total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
