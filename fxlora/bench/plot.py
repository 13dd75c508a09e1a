"""The sweep as one PNG: a row per (rank, dropout), step time and saved MiB against seq, a line per contestant.

The floor is drawn dashed: it is the limit the others approach, not a competitor.
"""

from __future__ import annotations

import os
from typing import Optional

from fxlora.bench.harness import CONTESTANTS, MIB, BenchResult, Measurement

STYLE = {  # one look per contestant across every panel
    "floor": dict(color="0.45", linestyle="--", marker="s"),
    "peft-eager": dict(color="tab:blue", marker="o"),
    "peft-inductor": dict(color="tab:orange", marker="^"),
    "fxlora": dict(color="tab:green", marker="D", linewidth=2.2),
}
PANELS = (("step_ms", "step time (ms)"), ("saved_bytes", "saved for backward (MiB)"))


def plot_result(result: BenchResult, path: str) -> None:
    """Write the figure to `path` (its folder is created); Agg, so no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [m for m in result.measurements if m.error is None]
    rows = sorted({(m.rank, m.dropout) for m in ok})
    fig, axes = plt.subplots(max(1, len(rows)), len(PANELS), figsize=(11, 3.2 * max(1, len(rows)) + 0.8), squeeze=False)
    for row, (rank, dropout) in enumerate(rows):
        for col, (figure, ylabel) in enumerate(PANELS):
            ax = axes[row][col]
            _panel(ax, [m for m in ok if (m.rank, m.dropout) == (rank, dropout)], figure)
            ax.set_title(f"rank {rank}, dropout {dropout:g}: {ylabel.split(' (')[0]}", fontsize=10)
            ax.set_ylabel(ylabel)
            if row == len(rows) - 1:
                ax.set_xlabel("sequence length (batch %d)" % result.settings["shape"]["batch"])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(_subtitle(result), fontsize=9, y=0.955)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax, measurements: list[Measurement], figure: str) -> None:
    seqs = sorted({m.seq for m in measurements})
    for name in CONTESTANTS:
        points = sorted((m.seq, _value(m, figure)) for m in measurements if m.contestant == name)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, **STYLE[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [str(s) for s in seqs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def _value(m: Measurement, figure: str) -> Optional[float]:
    return m.saved_bytes / MIB if figure == "saved_bytes" else getattr(m, figure)


def _subtitle(result: BenchResult) -> str:
    s, m = result.settings, result.machine
    shape = s["shape"]
    return (
        f"{shape['family']} h{shape['hidden']} i{shape['intermediate']} L{shape['layers']} vocab {shape['vocab']}, "
        f"LoRA all-linear, {s['dtype']}, AdamW; {m['processor']} x{m['cpu_count']}, torch {m['torch']}, "
        f"inner {s['inner']}; median of {s['steps']} steps"
    )
