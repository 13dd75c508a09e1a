"""`fxlora bench --memory-frontier` (fxlora/bench/frontier.py): the points, each one's budget reaching
its contestant, the child's command line, table and plot. Structure only: no timings, no child processes
(tests/bench/test_harness.py runs the sweep itself)."""

from __future__ import annotations

import pytest
import torch

import fxlora
from fxlora.bench.frontier import Point, child_argv, combine, frontier_points, frontier_table, measure_point, plot_frontier
from fxlora.bench.results import Measurement
from fxlora.bench.run import measure_case
from fxlora.bench.spec import Case, ModelShape, Settings

TINY = ModelShape(hidden=64, intermediate=128, layers=1, heads=4, vocab=128)


def test_points_cover_every_budget_and_checkpointing():
    points = frontier_points((None, 0.5))
    assert [p.label for p in points] == ["peft-inductor", "peft-inductor @ 0.5", "fxlora", "fxlora @ 0.5",
                                         "peft-eager + HF checkpointing", "peft-inductor + HF checkpointing"]


def test_a_budget_in_bytes_is_fxlora_only():
    assert [p.label for p in frontier_points((0.3, "74MiB"))][:3] == ["peft-inductor @ 0.3", "fxlora @ 0.3", "fxlora @ 74MiB"]


def test_child_runs_what_the_parent_was_asked_less_the_frontier():
    argv = ["--memory-frontier", "--seqs", "1024", "--budgets", "0.5,0.3", "--tag=x", "--batch", "2", "--no-plot",
            "--rounds", "3"]
    assert child_argv(argv) == ["--seqs", "1024", "--batch", "2"]


def test_rounds_combine_to_the_median_and_their_spread():
    rounds = [Measurement("fxlora", 1024, 8, 0.0, step_ms=t, step_ms_all=[t, t + 1], first_step_ms=9.0, saved_bytes=5)
              for t in (100.0, 120.0, 110.0)]
    m = combine(rounds)
    assert m.step_ms == 110.0 and m.step_spread == pytest.approx(20 / 110) and len(m.step_ms_all) == 6
    assert m.saved_bytes == 5
    assert combine([*rounds, Measurement("fxlora", 1024, 8, 0.0, error="boom")]).error == "boom"


@pytest.mark.parametrize("point", [Point("fxlora", 0.5), Point("peft-inductor", 0.5), Point("peft-eager", checkpointing=True)])
def test_each_point_gets_its_budget(point):
    seen = {}

    def measure(case, settings):
        seen.update(settings=settings, budget=torch._functorch.config.activation_memory_budget)
        return [Measurement(settings.contestants[0], case.seq, case.rank, case.dropout)]

    with torch._functorch.config.patch(activation_memory_budget=1.0):
        m = measure_point(point, Case(16, 4, 0.0), Settings(shape=TINY, inner="aot_eager"), measure)
    s = seen["settings"]
    assert m.contestant == point.contestant and s.contestants == (point.contestant,)
    assert s.checkpointing is point.checkpointing
    assert s.fxlora_options.get("memory_budget") == (0.5 if point.contestant == "fxlora" else None)
    assert seen["budget"] == (0.5 if point.contestant == "peft-inductor" else 1.0)


@pytest.mark.slow  # a real compile; the pieces above run in `make test`
def test_a_budgeted_fxlora_point_measures_and_reports(tmp_path):
    """One real point, aot_eager: fxlora's memory_budget reaches the compile and keeps fewer bytes."""
    settings = Settings(shape=TINY, steps=1, warmup=1, inner="aot_eager")
    free = measure_point(Point("fxlora"), Case(32, 4, 0.0), settings, measure_case)
    fxlora.clear_reports()
    budgeted = measure_point(Point("fxlora", 0.3), Case(32, 4, 0.0), settings, measure_case)
    assert not free.error and not budgeted.error
    assert budgeted.saved_bytes < free.saved_bytes
    rows = [(Point("fxlora"), free), (Point("fxlora", 0.3), budgeted),
            (Point("peft-eager", checkpointing=True), Measurement("peft-eager", 0, 0, 0.0, error="boom"))]
    table = frontier_table(rows)
    assert "| fxlora @ 0.3 |" in table and "error: boom" in table
    plot_frontier(rows, str(tmp_path / "f.png"), "tiny")
    assert (tmp_path / "f.png").stat().st_size > 0
