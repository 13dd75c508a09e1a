"""objective="time": forms measured once per shape and device, cached on disk, chosen by time
within a saved-bytes budget; never a timed assertion (the figures are whatever they are)."""

import dataclasses
import json
import multiprocessing

import pytest
import sympy
import torch

import fxlora
from fxlora.config import Config
from fxlora.cost import core, timing
from fxlora.cost.timing import Timings, TimingCase, device_key
from tests.helpers import compiled, loss_and_grads, assert_same_step
from fxlora.testing.models import tiny_model, token_batch, with_lora


def _case(key, calls):
    """Cases of equal cost (2 ms), so none falls out of the race by noise (OUT_OF_RACE)."""
    import time as _time

    def build():
        def call():
            calls.append(key)
            _time.sleep(0.002)
        return call
    return TimingCase(key, build)


def test_a_case_far_behind_after_one_round_is_not_run_again(tmp_path):
    """The first compile measures less: a form over OUT_OF_RACE x the fastest after round one is out."""
    import time as _time
    calls: list[str] = []

    def slow_case(key, seconds):
        def build():
            def call():
                calls.append(key)
                _time.sleep(seconds)
            return call
        return TimingCase(key, build)

    figures = Timings(torch.device("cpu"), tmp_path / "t.json", rounds=3).figures(
        [slow_case("fast", 0.001), slow_case("slow", 0.05)])
    assert calls.count("fast") == 1 + 3 and calls.count("slow") == 1 + 1
    assert figures[1][0] > figures[0][0] and figures[1][1] is None


def test_measured_once_then_read_from_disk(tmp_path):
    path = tmp_path / "timings.json"
    calls: list[str] = []
    first = Timings(torch.device("cpu"), path, rounds=3)
    seconds = first.seconds([_case("a", calls), _case("b", calls), _case("a", calls)])
    assert len(seconds) == 3 and seconds[0] == seconds[2] and first.measured == 2
    assert calls.count("a") == 1 + 3  # warmed once, then one call per round
    stored = json.loads(path.read_text())
    assert set(stored[device_key(torch.device("cpu"))]) == {"a", "b"}

    again = Timings(torch.device("cpu"), path)
    assert again.seconds([_case("b", calls)]) == [seconds[1]] and again.measured == 0


def test_device_key_names_the_machine_and_torch():
    key = device_key(torch.device("cpu"))
    assert f"torch {torch.__version__}" in key and "threads" in key


def test_timing_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    Timings(torch.device("cpu"), tmp_path / "t.json", rounds=2).seconds(
        [TimingCase("rng", lambda: (lambda: torch.rand(100)))])
    assert torch.equal(torch.rand(3), want)


def _priced(name, saved, seconds, flops=1):
    return core.PricedForm(core.Form(name, sympy.Integer(flops), sympy.Integer(saved)), sympy.Integer(flops),
                           sympy.Integer(saved), seconds=seconds)


def test_time_objective_picks_the_fastest_within_the_saved_budget():
    forms = [_priced("lean", 100, 3.0), _priced("fast", 105, 1.0), _priced("fastest", 200, 0.5)]
    best, why = core.choose_form(forms, objective="time", saved_budget=0.1)
    assert best.form.name == "fast" and "fastest measured" in why and "10% of the fewest saved bytes" in why
    best, _ = core.choose_form(forms, objective="time", saved_budget=1.0)
    assert best.form.name == "fastest"


def test_time_objective_without_times_falls_back_to_saved_bytes():
    forms = [_priced("a", 100, None, flops=2), _priced("b", 50, None, flops=3)]
    best, why = core.choose_form(forms, objective="time")
    assert best.form.name == "b" and "no measured time" in why


def test_budgets_are_validated():
    with pytest.raises(ValueError, match="saved_budget"):
        Config(saved_budget=-1)
    with pytest.raises(ValueError, match="objective"):
        Config(objective="speed")


@pytest.mark.parametrize("objective", ["time", "saved_bytes", "flops"])
def test_every_objective_is_exact(objective):
    """The objective picks among exact forms: whatever wins, loss and gradients are eager PEFT's."""
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(2, 16)
    ref = loss_and_grads(model, batch)
    got = loss_and_grads(compiled(model, objective=objective), batch)
    assert_same_step(ref, got)
    decisions = fxlora.last_report().graphs[-1].decisions
    assert decisions and all(d.rewritten for d in decisions)
    if objective == "time":
        assert all(d.chosen.seconds is not None and ("fastest measured" in d.reason or "within noise" in d.reason)
                   for d in decisions)
        text = fxlora.last_report().format(verbose=True)
        assert " ms" in text and "time" in text


def test_eager_masks_follow_inductors_rule():
    assert Config(inner="aot_eager").eager_masks()
    assert not Config(inner="inductor").eager_masks()
    assert Config(inner="inductor", inductor={"fallback_random": True}).eager_masks()


def test_a_measured_margin_inside_the_spread_leaves_the_cost_models_choice():
    """The benchmark's rule for a decision: the fastest measured form replaces the cost model's only
    when it is ahead by more than the spread measured alongside; else "within noise"."""
    modelled = core.PricedForm(core.Form("lean", sympy.Integer(1), sympy.Integer(100)), sympy.Integer(1),
                               sympy.Integer(100), seconds=1.0, spread=0.10)
    close = core.PricedForm(core.Form("close", sympy.Integer(1), sympy.Integer(105)), sympy.Integer(1),
                            sympy.Integer(105), seconds=0.95, spread=0.02)
    best, why = core.choose_form([modelled, close], objective="time", saved_budget=0.1)
    assert best.form.name == "lean" and "within noise" in why and "close" in why
    far = dataclasses.replace(close, seconds=0.5)
    best, why = core.choose_form([modelled, far], objective="time", saved_budget=0.1)
    assert best.form.name == "close" and "faster than the cost model's lean" in why


def test_the_cache_keeps_each_figures_spread_and_reads_old_entries(tmp_path):
    path = tmp_path / "timings.json"
    timer = Timings(torch.device("cpu"), path, rounds=3)
    ((seconds, spread),) = timer.figures([_case("a", [])])
    assert spread is not None and spread >= 0
    data = json.loads(path.read_text())
    data[device_key(torch.device("cpu"))]["old"] = 0.25  # as written before spreads were kept
    path.write_text(json.dumps(data))
    assert Timings(torch.device("cpu"), path).figures([_case("old", [])]) == [(0.25, None)]
    assert set(timing.cached(path)[device_key(torch.device("cpu"))]) == {"a", "old"}


def _time_in_process(path, key):
    Timings(torch.device("cpu"), path, rounds=2).seconds([TimingCase(key, lambda: (lambda: None))])


def test_two_processes_timing_at_once_keep_both_figures(tmp_path):
    path = tmp_path / "timings.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_time_in_process, args=(path, f"case{k}")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert set(json.loads(path.read_text())[device_key(torch.device("cpu"))]) == {f"case{k}" for k in range(4)}


def test_timings_cli_shows_and_clears(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fxlora.cli import main

    monkeypatch.setenv("FXLORA_CACHE_DIR", str(tmp_path))
    Timings(torch.device("cpu"), rounds=2).seconds([_case("lora f1/b1 T=8", [])])
    shown = CliRunner().invoke(main, ["timings", "--show"])
    assert shown.exit_code == 0 and "lora f1/b1 T=8" in shown.output and "spread" in shown.output
    cleared = CliRunner().invoke(main, ["timings", "--clear"])
    assert cleared.exit_code == 0 and "cleared" in cleared.output
    assert "nothing cached" in CliRunner().invoke(main, ["timings"]).output
