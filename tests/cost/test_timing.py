"""objective="time": forms measured once per shape and device, cached on disk, chosen by time
within a saved-bytes budget; never a timed assertion (the figures are whatever they are)."""

import json

import pytest
import sympy
import torch

import fxlora
from fxlora.config import Config
from fxlora.cost import core
from fxlora.cost.timing import Timings, TimingCase, device_key
from tests.helpers import compiled, loss_and_grads, assert_same_step
from fxlora.testing.models import tiny_model, token_batch, with_lora


def _case(key, calls):
    def build():
        def call():
            calls.append(key)
        return call
    return TimingCase(key, build)


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
        assert all(d.chosen.seconds is not None and "fastest measured" in d.reason for d in decisions)
        text = fxlora.last_report().format(verbose=True)
        assert " ms" in text and "time" in text


def test_eager_masks_follow_inductors_rule():
    assert Config(inner="aot_eager").eager_masks()
    assert not Config(inner="inductor").eager_masks()
    assert Config(inner="inductor", inductor={"fallback_random": True}).eager_masks()
