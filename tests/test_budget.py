"""The memory_budget option (fxlora/budget.py): each graph lands within its bytes (or says why not),
no cliff, exact against the unbudgeted step, the budget part of what decides the compiled graph."""

from __future__ import annotations

import pytest
import torch

import fxlora
from fxlora.budget import BudgetPartitioner, node_flops
from fxlora.config import Config, MemoryBudget
from fxlora.ops._common import is_fxlora_op
from fxlora.testing.models import tiny_model, token_batch, with_lora
from tests.helpers import FP32, assert_same_step, compiled, step

CHEAP = {"objective": "saved_bytes"}  # no timing: these tests partition, they do not race forms


@pytest.fixture(autouse=True)
def fresh():
    """Each test's report holds its own compiles only."""
    torch._dynamo.reset()
    fxlora.clear_reports()
    yield


def _model(dropout: float = 0.0, seed: int = 0):
    return with_lora(tiny_model("llama", hidden=64, layers=2, seed=seed), r=4, dropout=dropout).train()


def _budget(report=None):
    (result,) = (report or fxlora.last_report()).graphs[-1].budget
    return result


# ----------------------------------------------------------------------------- the option


@pytest.mark.parametrize("value, bytes_, fraction", [
    (0.5, None, 0.5), ("50%", None, 0.5), (0, 0, None), (1.0, None, 1.0),
    ("512MiB", 512 * 2**20, None), ("2 GiB", 2 * 2**30, None), ("1.5GB", 1_500_000_000, None), (4096, 4096, None),
    ("0.5", None, 0.5), ("4096", 4096, None),
])
def test_budget_parsed(value, bytes_, fraction):
    b = MemoryBudget.parse(value)
    assert (b.bytes, b.fraction) == (bytes_, fraction)


@pytest.mark.parametrize("value", [1.5, -0.1, -1, True, "lots", "3 parsecs", "150%", [1], 1, "1", 512])
def test_bad_budget_says_what_is_allowed(value):
    with pytest.raises(ValueError, match="memory_budget' must be bytes"):
        Config(memory_budget=value)


def test_budget_needs_a_partitioner():
    with pytest.raises(ValueError, match="needs a partitioner"):
        Config(memory_budget=0.5, inner="eager")


# ----------------------------------------------------------------------------- meeting it, exactly


@pytest.mark.parametrize("fraction", [pytest.param(0.7, marks=pytest.mark.slow), 0.4, pytest.param(0.2, marks=pytest.mark.slow)])
def test_budget_met_within_its_bytes_and_exact(fraction):
    """Each budget lands at or just below its bytes (no cliff to the least), and the step is the unbudgeted one's."""
    batch = token_batch(2, 32)
    ref = step(compiled(_model(), **CHEAP), batch)
    got = step(compiled(_model(), **CHEAP, memory_budget=fraction), batch)
    r = _budget()
    assert r.met, r.format()
    assert r.target_bytes == int(fraction * r.unbudgeted_bytes)
    assert 0.8 * r.target_bytes <= r.reached_bytes <= r.target_bytes, r.format()
    assert r.recomputed and r.partitions >= 3
    assert "memory budget" in fxlora.last_report().format() and "recomputed in backward" in r.format()
    assert_same_step(ref, got, **FP32)


@pytest.mark.slow  # `make test` under 15 min cold: the core cases run there, these in `make test-all`
def test_budget_in_bytes():
    batch = token_batch(2, 32)
    step(compiled(_model(), **CHEAP), batch)
    torch._dynamo.reset()
    step(compiled(_model(), **CHEAP, memory_budget="1MiB"), batch)
    r = _budget()
    assert r.target_bytes == 2**20 and r.met and r.reached_bytes <= 2**20, r.format()


def test_ops_drawing_eager_masks_never_recomputed():
    """Must not fire: an op whose dropout mask comes from the RNG state (eager's masks, as under aot_eager)
    would redraw it if run again in backward; it is kept, whatever the budget. Same seeds, same step."""
    batch = token_batch(2, 32)
    ref = step(compiled(_model(dropout=0.25), **CHEAP), batch, seed=3)
    assert "lora_linear" in fxlora.last_report().graphs[0].graph_after  # the precondition: ops with eager masks
    torch._dynamo.reset()
    got = step(compiled(_model(dropout=0.25), **CHEAP, memory_budget=0.3), batch, seed=3)
    r = _budget()
    assert r.recomputed and not any("fxlora" in op for op in r.recomputed), r.format()
    assert_same_step(ref, got, **FP32)


@pytest.mark.slow
def test_without_protection_the_masks_would_be_redrawn(monkeypatch):
    """The control of the test above: with nothing kept, the knapsack recomputes those ops and dA goes wrong."""
    import fxlora.budget

    monkeypatch.setattr(fxlora.budget, "_protect", lambda graph: None)
    batch = token_batch(2, 32)
    ref = step(compiled(_model(dropout=0.25), **CHEAP), batch, seed=3)
    torch._dynamo.reset()
    got = step(compiled(_model(dropout=0.25), **CHEAP, memory_budget=0.3), batch, seed=3)
    assert any("fxlora" in op for op in _budget().recomputed)
    with pytest.raises(AssertionError):
        assert_same_step(ref, got, **FP32)


def test_explain_with_a_budget_runs_eagerly():
    """explain() runs what was decided eagerly: no partitioner, so the budget is set aside, not an error."""
    report = fxlora.explain(_model(), **token_batch(2, 16), options={"memory_budget": 0.5, **CHEAP})
    assert report.graphs and report.graphs[0].all_rewritten


def test_loose_budget_changes_nothing():
    """Must not fire: a budget the unbudgeted step already fits recomputes nothing more."""
    step(compiled(_model(), **CHEAP, memory_budget="1GiB"), token_batch(2, 32))
    r = _budget()
    assert r.met and r.reached_bytes == r.unbudgeted_bytes and not r.recomputed and r.partitions == 1
    assert "met without recomputing more" in r.format()


def test_unreachable_budget_says_the_least_it_can_keep():
    batch = token_batch(2, 32)
    ref = step(compiled(_model(dropout=0.25), **CHEAP), batch, seed=2)
    torch._dynamo.reset()
    got = step(compiled(_model(dropout=0.25), **CHEAP, memory_budget=0), batch, seed=2)
    r = _budget()
    assert not r.met and "NOT met" in r.format() and "the least the partitioner can keep" in r.note
    assert r.reached_bytes < r.unbudgeted_bytes
    assert_same_step(ref, got, **FP32)


def test_partitioner_answering_before_its_knapsack_is_said():
    """torch's partitioner normalises by the graph's inputs (frozen weights included): where the activations
    weigh less than those (a large vocabulary, short sequences) it answers before its knapsack. The report
    says so instead of claiming a search, and the step stays exact."""
    model = lambda: with_lora(tiny_model("llama", hidden=64, layers=2, vocab=32768), r=4).train()  # noqa: E731
    batch = token_batch(2, 8, 32768)
    ref = step(model(), batch)
    got = step(compiled(model(), **CHEAP, memory_budget=0.3), batch)
    r = _budget()
    assert "answered before its knapsack" in r.note and not r.met
    assert_same_step(ref, got, **FP32)


def test_each_model_gets_its_own_budget():
    """Dynamo reuses a compiled graph for every model of the same code in a process; a budget given
    to fxlora is part of its options, so the second model compiles again under its own."""
    batch = token_batch(2, 16)
    small = lambda seed: with_lora(tiny_model("llama", hidden=32, layers=1, seed=seed), r=4).train()  # noqa: E731
    step(compiled(small(0), **CHEAP, memory_budget=0.7), batch)
    first = _budget()
    step(compiled(small(1), **CHEAP, memory_budget=0.3), batch)
    second = _budget()
    assert first.requested != second.requested and second.reached_bytes < first.reached_bytes


@pytest.mark.slow  # `make test` under 15 min cold: the core cases run there, these in `make test-all`
def test_budget_applies_to_a_graph_fxlora_did_not_rewrite():
    model = tiny_model("llama", hidden=64, layers=2).train()
    step(compiled(model, **CHEAP, memory_budget=0.5), token_batch(2, 32))
    g = fxlora.last_report().graphs[-1]
    assert not g.all_rewritten and g.budget and g.budget[0].met


@pytest.mark.slow  # `make test` under 15 min cold: the core cases run there, these in `make test-all`
def test_dora_exact_under_a_budget():
    batch = token_batch(2, 32)
    dora = lambda: with_lora(tiny_model("llama", hidden=64, layers=2), r=4, use_dora=True).train()  # noqa: E731
    ref = step(dora(), batch)
    got = step(compiled(dora(), **CHEAP, memory_budget=0.4), batch)
    assert _budget().met
    assert_same_step(ref, got, **FP32)


@pytest.mark.slow  # `make test` under 15 min cold: the core cases run there, these in `make test-all`
def test_qlora_exact_under_a_budget():
    """4-bit bases: the dequantised weights stay recomputed (their tags), the budget prices the rest."""
    pytest.importorskip("bitsandbytes")
    from tests.kinds.lora.test_qlora import batch as qlora_batch, qlora

    ref = step(qlora(), qlora_batch())
    got = step(compiled(qlora(), **CHEAP, memory_budget=0.5), qlora_batch())
    assert _budget().met
    assert_same_step(ref, got, **FP32)


@pytest.mark.slow  # `make test` under 15 min cold: the core cases run there, these in `make test-all`
def test_checkpointed_layers_keep_their_regions_under_a_budget():
    """HF gradient checkpointing: the regions stay recomputed (the partitioner honours their tags); the budget
    prices what is kept outside them; exact."""
    def checkpointed():
        model = _model()
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    batch = token_batch(2, 32)
    ref = step(checkpointed(), batch)
    got = step(compiled(checkpointed(), **CHEAP, memory_budget=0.5), batch)
    graphs = fxlora.last_report().graphs
    assert any(g.regions for g in graphs), [g.format() for g in graphs]
    assert all(g.budget for g in graphs if not g.no_backward), [g.format() for g in graphs]
    assert_same_step(ref, got, **FP32)


def test_failed_partition_falls_back_to_the_unbudgeted_one(monkeypatch):
    """A budget the partitioner cannot apply is reported, never why a training run stops."""
    def broken(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(BudgetPartitioner, "partition", broken)
    batch = token_batch(2, 32)
    ref = step(_model(), batch)
    got = step(compiled(_model(), **CHEAP, memory_budget=0.5), batch)
    r = _budget()
    assert not r.met and "NOT applied: RuntimeError: boom" in r.format()
    assert_same_step(ref, got, **FP32)


# ----------------------------------------------------------------------------- prices


def test_fxlora_op_priced_by_its_body():
    """FlopCounterMode counts a custom op as 0 FLOPs; the knapsack must see the base GEMM inside."""
    from torch.fx.experimental.proxy_tensor import make_fx

    tokens, d_in, d_out, r = 64, 32, 48, 4

    def site(x, w, a, b):
        return torch.ops.fxlora.lora_linear(x, w, None, a, b, torch.tensor(2.0), 0.0, torch.float32, torch.float32,
                                            torch.float32, 1, 1, False, False)[0]

    gm = make_fx(site, tracing_mode="fake")(torch.randn(tokens, d_in), torch.randn(d_out, d_in),
                                             torch.randn(r, d_in), torch.randn(d_out, r))
    (op,) = [n for n in gm.graph.nodes if is_fxlora_op(n)]
    base = 2 * tokens * d_in * d_out
    assert base <= node_flops(op) <= base + 2 * 2 * tokens * r * (d_in + d_out)


@pytest.mark.inductor
def test_inductor_budget_exact():
    """End to end on Inductor: the budget partitioner is Inductor's custom_partitioner_fn; exact."""
    batch = token_batch(2, 32)
    ref = step(_inductor_model(), batch)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got = step(torch.compile(_inductor_model(), backend="fxlora", options={**CHEAP, "memory_budget": 0.4}), batch)
    r = _budget()
    assert r.met and r.reached_bytes <= r.target_bytes
    assert_same_step(ref, got, **FP32)


@pytest.mark.inductor
@pytest.mark.slow
def test_inductor_cache_keys_on_the_budget(tmp_path, monkeypatch):
    """Another budget never loads a graph compiled under this one: the partitioner's uuid holds it.
    Its own cache directory: a rerun must not find the 0.3 graph of the run before."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    batch = token_batch(2, 32)
    options = lambda budget: {**CHEAP, "memory_budget": budget}  # noqa: E731
    with torch._inductor.config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        step(torch.compile(_inductor_model(), backend="fxlora", options=options(0.4)), batch)  # into the caches
        torch._dynamo.reset()
        fxlora.clear_reports()
        step(torch.compile(_inductor_model(), backend="fxlora", options=options(0.3)), batch)
        assert _budget().requested == "0.3 of the unbudgeted step"  # partitioned, not loaded
        torch._dynamo.reset()
        fxlora.clear_reports()
        step(torch.compile(_inductor_model(), backend="fxlora", options=options(0.3)), batch)  # the same: loaded
    g = fxlora.last_report().graphs[-1]
    assert g.budget or "partitioned under the same budget when first compiled" in g.format()
    a = BudgetPartitioner(MemoryBudget.parse(0.4), []).uuid()
    assert a == BudgetPartitioner(MemoryBudget.parse("40%"), []).uuid() != BudgetPartitioner(MemoryBudget.parse(0.3), []).uuid()


def _inductor_model():
    return with_lora(tiny_model("llama", hidden=32, layers=1), r=4).train()
