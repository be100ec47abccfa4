"""Plot a raw table of ``benchmarks/attention.py`` (milliseconds against sequence length).

    python benchmarks/plot_attention.py benchmarks/results/h100/attention_bf16.md docs/img/attention_h100.png

Reads the markdown table (and the ``# date, torch, device, dtype, ...`` line above it) and draws two panels,
non-causal and causal: one colour per method (``*_ms`` columns), solid for the forward pass and dashed for
forward+backward, for one kernel (``--kernel``, default softmax). Rows with "-" (skipped for memory) are left
out. Needs matplotlib.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_table(path: str) -> tuple[str, list[dict[str, str]]]:
    """The header comment line and the table rows as dicts of strings."""
    comment, rows, names = "", [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#") and not comment:
                comment = line.lstrip("# ")
            if not line.startswith("|") or line.startswith("|--"):
                continue
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if names is None:
                names = cells
            else:
                rows.append(dict(zip(names, cells)))
    return comment, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="raw markdown table written by benchmarks/attention.py")
    parser.add_argument("output", help="image to write (png)")
    parser.add_argument("--kernel", default="softmax", help="kernel rows to plot (softmax or relu)")
    args = parser.parse_args()

    comment, rows = read_table(args.input)
    rows = [row for row in rows if row["kernel"] == args.kernel]
    methods = [name[:-3] for name in rows[0] if name.endswith("_ms")]
    fields = [field.strip() for field in comment.split(",")]
    setup = ", ".join(fields[2:6])  # device, dtype, batch, heads
    d, m = rows[0]["d"], rows[0]["m"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, causal in zip(axes, ("False", "True")):
        for color, method in zip(("tab:blue", "tab:red", "tab:green", "tab:orange"), methods):
            for style, pass_ in (("-", "fwd"), ("--", "fwd+bwd")):
                points = [(int(row["L"]), float(row[f"{method}_ms"])) for row in rows
                          if row["causal"] == causal and row["pass"] == pass_ and row[f"{method}_ms"] != "-"]
                if points:
                    ax.plot(*zip(*sorted(points)), style, color=color, marker="o", markersize=3,
                            label=f"{method} {pass_}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title("causal" if causal == "True" else "non-causal")
        ax.set_xlabel("sequence length L")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (median)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Performer attention, {setup}, d={d}, m={m}, {args.kernel} kernel")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)


if __name__ == "__main__":
    main()
