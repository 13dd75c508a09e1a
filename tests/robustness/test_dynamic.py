"""Dynamic shapes: `dynamic=True`, automatic dynamic after a shape change, varying batch and
sequence. Graphs are counted: by default fxlora compiles exactly the graphs the reference
backend does (form choices read the traced sizes, no guard); with form_guards=True, one more
per cost-guard crossing, never one per new shape."""

import pytest
import torch

import fxlora
from fxlora.backend import compile_graph
from fxlora.testing.models import HandLoRALinear, tiny_model, token_batch, with_lora
from fxlora.config import Config
from tests.helpers import assert_same_step
from tests.robustness.common import FP32, decisions, rewritten, step

# Batch 1 is left out: Dynamo specializes size-1 dims (its own recompile, not fxlora's).
SHAPES = [(2, 8), (2, 12), (3, 8), (3, 16), (4, 5)]


def _counting(config):
    """A backend that runs fxlora and records each graph's report: one report list per compile."""
    reports = []

    def backend(gm, example_inputs, **_):
        return compile_graph(gm, example_inputs, config, on_report=reports.append)

    return backend, reports


def _compiles(reports):
    """Distinct compile ids: Dynamo may call the backend twice for one compile (a restart)."""
    return len({r.compile_id for r in reports})


def _fxlora_guard_failures():
    """Every recompile reason Dynamo recorded, and whether each one is a guard fxlora's cost model installed."""
    reasons = [reason for failures in torch._dynamo.utils.guard_failures.values() for reason in failures]
    return reasons, ["fxlora/cost/guards.py" in r for r in reasons]


@pytest.mark.parametrize(
    "dynamic, expected",
    [
        pytest.param(True, [1, 1, 1, 1], id="dynamic-true"),
        # automatic dynamic marks a dim dynamic when it first changes: sequence, then batch
        pytest.param(None, [1, 2, 3, 3], id="automatic-dynamic", marks=pytest.mark.slow),
    ],
)
def test_varying_batch_and_sequence_without_a_choice_never_recompiles(dynamic, expected):
    """With the form fixed (no cost choice, so no cost guard): dynamic=True compiles once for
    every shape; automatic dynamic compiles static, then once per dim that starts to vary."""
    model = with_lora(tiny_model("llama", hidden=32), "llama", r=4)
    backend, reports = _counting(Config(inner="aot_eager", force_form="f1/b1"))
    run = torch.compile(model, backend=backend, dynamic=dynamic)
    compiles = []
    for b, s in SHAPES[:4]:
        batch = token_batch(b, s)
        assert_same_step(step(model, batch), step(run, batch), **FP32)
        compiles.append(_compiles(reports))
    assert compiles == expected
    assert all(len(r.decisions) == 7 and all(d.rewritten for d in r.decisions) for r in reports)
    assert any(not isinstance(t, int) for t in reports[-1].sites[0].tokens), "last compile is symbolic"


@pytest.mark.slow
def test_default_objective_recompiles_only_on_cost_guards():
    """The saved-bytes objective compares forms whose costs cross at some token count: each
    crossing is a guard, and every recompile must be one of those guards; a shape seen before
    hits the cache."""
    model = with_lora(tiny_model("llama", hidden=32), "llama", r=4)
    backend, reports = _counting(Config(inner="aot_eager", form_guards=True))
    run = torch.compile(model, backend=backend, dynamic=True)
    shapes = [(2, 8), (2, 12), (3, 8), (2, 8), (2, 12)]
    compiles = []
    for b, s in shapes:
        batch = token_batch(b, s)
        assert_same_step(step(model, batch), step(run, batch), **FP32)
        compiles.append(_compiles(reports))
    reasons, ours = _fxlora_guard_failures()
    assert all(ours), reasons
    assert compiles[-2:] == compiles[2:3] * 2, "shapes seen before recompile nothing"
    assert compiles[-1] == 1 + len({r.compile_id for r in reports} - {reports[0].compile_id})


CROSSING = (4, 7, 4096, 5000, 3, 4100, 9)  # token counts on both sides of the f1/f2 threshold


def _run_crossing(config):
    model = HandLoRALinear(64, 64, r=4, bias=False)
    backend, reports = _counting(config)
    run = torch.compile(model, backend=backend, dynamic=True)
    seen = []
    for tokens in CROSSING:
        x = torch.randn(tokens, 64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        torch.testing.assert_close(run(x), model(x_ref), **FP32)
        run(x).sum().backward()
        model(x_ref).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **FP32)
        seen.append(_compiles(reports))
    return seen, reports


def test_cost_guard_recompiles_once_per_crossing():
    """objective=flops on a square 64x64 site: forward 2 (merged weight) wins above a token
    threshold; with form_guards the guard makes crossing it recompile, once each way, and no more."""
    seen, reports = _run_crossing(Config(inner="aot_eager", objective="flops", form_guards=True))
    assert seen == [1, 1, 2, 2, 2, 2, 2], "small T and large T each compile once; cache hits after"
    # Per compile id the last report counts: Dynamo may restart a compile (here: nn.Dropout(0.0)'s
    # p first tensorified, then specialized), calling the backend again under the same id.
    forms = {r.compile_id: r.decisions[0].chosen and r.decisions[0].chosen.form.name[:2] for r in reports}
    assert list(forms.values()) == ["f4", "f2"]  # forward 1 keeping X A^T (fewest FLOPs) below, merged above
    reasons, ours = _fxlora_guard_failures()
    assert reasons and all(ours), reasons


def test_default_choices_add_no_graph_across_a_crossing():
    """Without form_guards the same sizes compile one graph: the form is chosen at the traced
    size and the report says no guard was installed."""
    seen, reports = _run_crossing(Config(inner="aot_eager", objective="flops"))
    assert seen == [1] * len(CROSSING)
    assert "no guard (form_guards=False)" in reports[-1].decisions[0].reason


def _graphs(backend, config=None):
    """Graphs compiled for a plain loop over padded variable-length batches, with an eval every 6 steps."""
    compiled_ids = set()

    def counting(gm, example_inputs, **kw):
        compiled_ids.add(str(torch._guards.CompileContext.current_compile_id()))
        if backend == "fxlora":
            return compile_graph(gm, example_inputs, config, on_report=lambda r: None)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    model = with_lora(tiny_model("llama", hidden=32), "llama", r=4, seed=0)
    run = torch.compile(model, backend=counting)
    lengths = torch.randint(8, 201, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    for step_index, seq in enumerate(lengths):
        batch = token_batch(2, seq, seed=step_index)
        run(**batch).loss.backward()
        if step_index % 6 == 5:
            model.eval()
            with torch.no_grad():
                run(input_ids=batch["input_ids"])
            model.train()
    return len(compiled_ids)


@pytest.mark.slow  # slow: keeps `make test` under 15 minutes cold (`make test-all` runs it)
def test_variable_length_loop_compiles_no_more_graphs_than_the_reference():
    """The loop that hit recompile_limit when every form switch was a guard: fxlora must compile
    the graphs the reference backend compiles (aot_eager here: Dynamo's guards are the same for
    Inductor, which only costs 30 s a graph on this CPU), and no more."""
    reference = _graphs("aot_eager")
    ours = _graphs("fxlora", Config(inner="aot_eager"))
    assert ours == reference, (ours, reference)
    assert reference <= torch._dynamo.config.recompile_limit


@pytest.mark.slow
def test_dynamic_with_dropout_is_exact_and_says_why_left_alone():
    """Under dynamic=True Dynamo may turn dropout's p into a runtime tensor; fxlora then keeps
    the site as graph ops (exact) and says so, rather than guessing p."""
    model = with_lora(tiny_model("llama", hidden=32), "llama", r=4, dropout=0.1)
    fxlora.clear_reports()
    run_dyn = torch.compile(model, backend="fxlora", dynamic=True, options={"inner": "aot_eager"})
    for b, s in SHAPES[:3]:
        batch = token_batch(b, s)
        assert_same_step(step(model, batch), step(run_dyn, batch), **FP32)
    for d in decisions():
        assert d.rewritten or "dropout p is a runtime value" in d.reason, d.reason


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_dynamic_true_other_families(family):
    from tests.robustness.families import family_batch, family_lora

    model = family_lora(family, "all-linear")
    fxlora.clear_reports()
    run = torch.compile(model, backend="fxlora", dynamic=True, options={"inner": "aot_eager"})
    for b, s in ((2, 8), (3, 6), (1, 10)):
        batch = family_batch(family, b, s)
        assert_same_step(step(model, batch), step(run, batch), **FP32)
    assert rewritten()
