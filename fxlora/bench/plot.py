"""The sweep as one PNG: a row per (rank, dropout), step time and saved MiB against seq, a line per contestant.

The floor is drawn dashed: it is the limit the others approach, not a competitor. Step
times carry bars from the fastest to the slowest timed step.
"""

from __future__ import annotations

import os

from fxlora.bench.results import BenchResult, Measurement, describe_model
from fxlora.bench.spec import ALL_CONTESTANTS, MIB

STYLE = {  # one look per contestant across every panel
    "floor": dict(color="0.45", linestyle="--", marker="s"),
    "peft-eager": dict(color="tab:blue", marker="o"),
    "peft-inductor": dict(color="tab:orange", marker="^"),
    "fxlora": dict(color="tab:green", marker="D", linewidth=2.2),
    "peft-fa-eager": dict(color="tab:blue", marker="o", linestyle=":"),
    "peft-fa-inductor": dict(color="tab:orange", marker="^", linestyle=":"),
    "fxlora-lora-fa": dict(color="tab:green", marker="D", linestyle=":"),
    "fxlora-velora": dict(color="tab:red", marker="v", linestyle="-."),
    "fxlora-lora-fa+velora": dict(color="tab:purple", marker="x", linestyle=":"),
    "fxlora-lora": dict(color="tab:olive", marker="P", linestyle="--"),
}
PANELS = (("step_ms", "step time (ms)"), ("saved_bytes", "saved for backward (MiB)"))


def plot_result(result: BenchResult, path: str) -> None:
    """Write the figure to `path` (its folder is created); Agg, so no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [m for m in result.measurements if m.error is None]
    rows = sorted({(m.rank, m.dropout) for m in ok})
    height = 3.2 * max(1, len(rows)) + 0.7
    fig, axes = plt.subplots(max(1, len(rows)), len(PANELS), figsize=(11, height), squeeze=False)
    for row, (rank, dropout) in enumerate(rows):
        for col, (figure, ylabel) in enumerate(PANELS):
            ax = axes[row][col]
            _panel(ax, [m for m in ok if (m.rank, m.dropout) == (rank, dropout)], figure)
            config = "IA3" if result.settings.get("adapter") == "ia3" else f"rank {rank}, dropout {dropout:g}"
            ax.set_title(f"{config}: {ylabel.split(' (')[0]}", fontsize=10)
            ax.set_ylabel(ylabel)
            if row == len(rows) - 1:
                ax.set_xlabel("sequence length (batch %d)" % result.settings["shape"]["batch"])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=max(1, len(labels)), frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(_subtitle(result), fontsize=9, y=1 - 0.4 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax, measurements: list[Measurement], figure: str) -> None:
    seqs = sorted({m.seq for m in measurements})
    for name in ALL_CONTESTANTS:
        mine = sorted((m for m in measurements if m.contestant == name), key=lambda m: m.seq)
        if not mine:
            continue
        xs = [m.seq for m in mine]
        ax.plot(xs, [_value(m, figure) for m in mine], label=name, **STYLE[name])
        if figure == "step_ms":  # the spread of the timed steps: a busy machine shows here, not in the median
            lo = [m.step_ms - min(m.step_ms_all) for m in mine]
            hi = [max(m.step_ms_all) - m.step_ms for m in mine]
            ax.errorbar(xs, [m.step_ms for m in mine], yerr=[lo, hi], fmt="none", ecolor=STYLE[name]["color"], alpha=0.5, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [str(s) for s in seqs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def _value(m: Measurement, figure: str) -> float:
    return m.saved_bytes / MIB if figure == "saved_bytes" else getattr(m, figure)


ADAPTER_LABELS = {"lora": "LoRA all-linear", "ia3": "IA3 (PEFT default targets)", "vera": "VeRA q/v",
                  "reft": "LoReFT on o_proj/down_proj", "dora": "DoRA all-linear"}


def _subtitle(result: BenchResult) -> str:
    s, m = result.settings, result.machine
    return (
        f"{describe_model(s['shape'], short=True)}, {ADAPTER_LABELS[s.get('adapter', 'lora')]}, {s['dtype']}, AdamW; {m['processor']} x{m['cpu_count']}, torch {m['torch']}, "
        f"inner {s['inner']}; median of {s['steps']} steps"
    )
