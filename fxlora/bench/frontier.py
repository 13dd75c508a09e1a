"""`fxlora bench --memory-frontier`: bytes saved for backward against step time, budget by budget.

Points: peft-inductor under `torch._functorch.config.activation_memory_budget`, fxlora under its
`memory_budget` option (fxlora/budget.py), and PEFT with Hugging Face gradient checkpointing
(eager and Inductor). Each point runs in its own process with empty Inductor caches: Dynamo
reuses a compiled graph for every model of the same code in a process, so a budget set for a
second model there would silently not apply. Points therefore cannot be interleaved step by step
as a sweep's contestants are; `--rounds N` runs every point N times instead, odd rounds in reverse
order, and reports the median of the rounds and their spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from fxlora.bench.results import Measurement
from fxlora.bench.spec import MIB, Case, Settings

BUDGETS = (None, 0.7, 0.5, 0.3, 0.1)
CHECKPOINTED = ("peft-eager", "peft-inductor")  # HF gradient checkpointing: the memory knob users have today


@dataclass(frozen=True)
class Point:
    """One point of the frontier: a contestant, its budget or HF checkpointing. A budget is a fraction
    of the contestant's unbudgeted step, or bytes ("74MiB": fxlora only, to meet a peer's point at its bytes)."""

    contestant: str  # "peft-inductor", "fxlora" or "peft-eager"
    budget: Union[None, float, str] = None
    checkpointing: bool = False

    @property
    def series(self) -> str:
        return f"{self.contestant} + HF checkpointing" if self.checkpointing else self.contestant

    @property
    def label(self) -> str:
        return self.series + ("" if self.budget is None else f" @ {_text(self.budget)}")


def _text(budget: Union[float, str]) -> str:
    return f"{budget:g}" if isinstance(budget, float) else budget


def frontier_points(budgets: Sequence[Union[None, float, str]] = BUDGETS) -> list[Point]:
    """Every budget for each contestant; budgets in bytes for fxlora only (PEFT's knob takes fractions)."""
    return ([Point("peft-inductor", b) for b in budgets if not isinstance(b, str)]
            + [Point("fxlora", b) for b in budgets]
            + [Point(c, checkpointing=True) for c in CHECKPOINTED])


_PARENT_ONLY = {"--memory-frontier": 0, "--budgets": 1, "--plot": 1, "--tag": 1, "--no-plot": 0, "--rounds": 1}  # flag -> values it takes


def child_argv(argv: Sequence[str]) -> list[str]:
    """The parent's command line less what only the parent does (the frontier, its budgets and outputs)."""
    out: list[str] = []
    skip = 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name, has_value = a.split("=")[0], "=" in a
        if name in _PARENT_ONLY:
            skip = 0 if has_value else _PARENT_ONLY[name]
            continue
        out.append(a)
    return out


def measure_point(point: Point, case: Case, settings: Settings,
                  measure: Callable[[Case, Settings], list[Measurement]]) -> Measurement:
    """In this process (the child): the point's budget set, one contestant measured."""
    import torch

    options = dict(settings.fxlora_options)
    if point.budget is not None and point.contestant == "fxlora":
        options["memory_budget"] = point.budget
    elif point.budget is not None:
        torch._functorch.config.activation_memory_budget = point.budget  # what a peft-inductor user sets
    settings = dataclasses.replace(settings, contestants=(point.contestant,), fxlora_options=options,
                                   checkpointing=point.checkpointing)
    return measure(case, settings)[0]


def run_frontier(points: Sequence[Point], child_argv: Sequence[str], rounds: int = 1,
                 progress: bool = True) -> list[tuple[Point, Measurement]]:
    """Each point in a fresh interpreter (`python -m fxlora.bench <child_argv> --no-compile-cache
    --frontier-point ...`: no graph caches, an empty kernel cache); what each measured comes back as JSON. With several rounds
    every point runs once per round, odd rounds in reverse order (a drifting machine then favours no
    point), and each point's step is the median of its rounds' medians (`combine`)."""
    from tqdm import tqdm

    runs: dict[Point, list[Measurement]] = {p: [] for p in points}
    order = [list(points) if r % 2 == 0 else list(reversed(points)) for r in range(rounds)]
    bar = tqdm([p for round_ in order for p in round_], desc="memory frontier", disable=not progress)
    for point in bar:
        bar.set_postfix_str(point.label)
        runs[point].append(_run_point(point, child_argv))
    return [(p, combine(runs[p])) for p in points]


def _run_point(point: Point, child_argv: Sequence[str]) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="fxlora-frontier-") as tmp:
        path = os.path.join(tmp, "point.json")
        cmd = [sys.executable, "-m", "fxlora.bench", *child_argv, "--no-progress", "--no-compile-cache",
               "--frontier-point", json.dumps(dataclasses.asdict(point)), "--frontier-out", path]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(path):
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"
            return Measurement(point.contestant, 0, 0, 0.0, error=f"point process failed (rc {done.returncode}): {last}")
        with open(path) as f:
            return Measurement(**json.load(f))


def combine(rounds: Sequence[Measurement]) -> Measurement:
    """One point over its rounds: the median of the rounds' median steps, every step kept, the spread
    of the rounds' medians (or of the steps, with one round); an error in any round is the point's."""
    failed = [m for m in rounds if m.error]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    medians = sorted(m.step_ms for m in rounds)
    mid = statistics.median(medians)
    return dataclasses.replace(rounds[0], step_ms=mid, step_ms_all=[t for m in rounds for t in m.step_ms_all],
                               step_spread=(medians[-1] - medians[0]) / mid,
                               first_step_ms=statistics.median(m.first_step_ms for m in rounds),
                               compile_s=statistics.median(m.compile_s for m in rounds))


def frontier_table(rows: Sequence[tuple[Point, Measurement]]) -> str:
    lines = ["| point | saved MiB | step ms | spread | first step s | peak MiB |", "|---|---|---|---|---|---|"]
    for p, m in rows:
        if m.error:
            lines.append(f"| {p.label} | error: {m.error} | | | | |")
            continue
        peak = f"{m.peak_bytes / MIB:.1f}" if m.peak_bytes else "-"
        lines.append(f"| {p.label} | {m.saved_mib:.1f} | {m.step_ms:.1f} | {m.step_spread:.0%} | "
                     f"{m.first_step_ms / 1000:.1f} | {peak} |")
    return "\n".join(lines)


def plot_frontier(rows: Sequence[tuple[Point, Measurement]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[Point, Measurement]]] = {}
    for p, m in rows:
        if not m.error:
            series.setdefault(p.series, []).append((p, m))
    for name, pts in series.items():
        pts.sort(key=lambda pm: pm[1].saved_bytes)
        xs, ys = [m.saved_mib for _, m in pts], [m.step_ms for _, m in pts]
        ax.plot(xs, ys, marker="o", label=name)
        for (p, m), x, y in zip(pts, xs, ys):
            if p.budget is not None:
                ax.annotate(_text(p.budget), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("saved for backward (MiB)")
    ax.set_ylabel("step (ms)")
    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
