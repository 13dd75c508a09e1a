"""The backend end to end: entry point, hand-off to the inner compiler, equality with plain torch.compile."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxlora
from fxlora.backend import CACHED_NOTE
from fxlora.testing.models import tiny_model, token_batch, with_lora
from tests.helpers import assert_same_step, compiled, loss_and_grads


def test_backend_name_works_without_importing_fxlora():
    script = textwrap.dedent(
        """
        import torch
        m = torch.nn.Linear(8, 8)
        out = torch.compile(m, backend="fxlora", options={"inner": "eager"})(torch.randn(2, 8))
        print(tuple(out.shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 8)"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_aot_eager_equals_eager(dropout):
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4, dropout=dropout)
    batch = token_batch(2, 16)
    torch.manual_seed(1)
    ref = loss_and_grads(model, batch)
    fast = compiled(model)
    torch.manual_seed(1)
    assert_same_step(ref, loss_and_grads(fast, batch))


@pytest.mark.inductor
def test_inductor_hand_off_equals_plain_inductor():
    """With nothing rewritten, fxlora + Inductor must be plain torch.compile: same loss, same gradients."""
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(2, 16)
    plain = loss_and_grads(torch.compile(model), batch)
    torch._dynamo.reset()
    ours = loss_and_grads(torch.compile(model, backend="fxlora"), batch)
    assert_same_step(plain, ours)
    assert len(fxlora.last_report().graphs[-1].sites) == 7


def test_last_report_and_graph_dumps(tmp_path):
    fxlora.clear_reports()
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4, targets="attention")
    fast = torch.compile(model, backend="fxlora", options={"inner": "eager", "dump_graphs": str(tmp_path)})
    fast(**token_batch(1, 8))
    report = fxlora.last_report()
    assert len(report.sites) == 4
    dumped = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".before.txt") for f in dumped) and any(f.endswith(".report.txt") for f in dumped)
    assert "4 LoRA sites" in (tmp_path / [f for f in dumped if f.endswith(".report.txt")][0]).read_text()


def test_matching_failure_falls_back_to_untouched_graph(monkeypatch):
    import fxlora.backend as backend

    def broken(gm, config):
        raise RuntimeError("boom")

    monkeypatch.setattr(backend, "run_pipeline", broken)
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(1, 8)
    ref = loss_and_grads(model, batch)
    got = loss_and_grads(torch.compile(model, backend="fxlora", options={"inner": "eager"}), batch)
    assert_same_step(ref, got)
    assert "passes failed (RuntimeError: boom)" in str(fxlora.last_report())


def test_inner_compile_failure_on_rewritten_graph_compiles_it_untouched(monkeypatch):
    """A rewritten graph the inner compiler rejects is compiled as traced, and the report says so."""
    import fxlora.backend as backend

    real = backend._inner_compile

    def rejects_fxlora_ops(gm, *args, **kwargs):
        if any(getattr(n.target, "namespace", None) == "fxlora" for n in gm.graph.nodes):
            raise RuntimeError("no kernel for fxlora::lora_linear")
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(backend, "_inner_compile", rejects_fxlora_ops)
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(1, 8)
    ref = loss_and_grads(model, batch)
    got = loss_and_grads(compiled(model), batch)
    assert_same_step(ref, got)
    text = str(fxlora.last_report())
    assert "compiling the rewritten graph failed (RuntimeError: no kernel for fxlora::lora_linear)" in text


@pytest.mark.inductor
def test_inductor_dropout_sites_draw_eager_masks_under_fallback_random():
    """Inductor's rule for randomness: with `fallback_random=True` the rewritten dropout sites draw
    eager PEFT's masks (in program order, though Inductor may reorder independent ops) and replay
    or unpack them in backward: same loss, same gradients. Without it they draw from the fast
    generator, as Inductor's own dropout does: not eager's masks, and the report says so."""
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4, dropout=0.1)
    batch = token_batch(2, 16)
    torch.manual_seed(2)
    ref = loss_and_grads(model, batch)
    fxlora.clear_reports()
    torch.manual_seed(2)
    got = loss_and_grads(torch.compile(model, backend="fxlora", options={"fallback_random": True}), batch)
    assert_same_step(ref, got, rtol=1e-4, atol=1e-5)
    graph = fxlora.last_report().graphs[-1]
    decisions = graph.decisions
    assert len(decisions) == 7 and all(d.rewritten and not d.chosen.form.spec.fast_rng for d in decisions)
    # Must not inline: eager's masks come from the global RNG (fxlora/ops/inline.py says why).
    opaque = [why for r in graph.inlined for _, why in r.opaque]
    assert (opaque or CACHED_NOTE in graph.notes) and all("eager's dropout masks" in why for why in opaque)

    torch._dynamo.reset()
    torch.manual_seed(2)
    fast = loss_and_grads(torch.compile(model, backend="fxlora"), batch)
    decisions = fxlora.last_report().graphs[-1].decisions
    assert all(d.rewritten and d.chosen.form.spec.fast_rng and "hashed from a graph-drawn seed" in d.reason for d in decisions)
    assert not torch.equal(fast[0], ref[0])  # other masks, so another loss


def _saved_activation_bytes(model, batch) -> int:
    from fxlora.bench.run import SavedBytes

    counter = SavedBytes(frozenset(p.untyped_storage().data_ptr() for p in model.parameters()))
    with counter:
        loss = model(**batch).loss
    loss.backward()
    return counter.activation_bytes


@pytest.mark.inductor
def test_rewritten_graph_saves_less_than_peft_under_inductor():
    """A byte count, not a timing: with every site rewritten and `rematerialize` on, the step
    saves less than PEFT under plain Inductor, and exactly as eager PEFT computes."""
    model = with_lora(tiny_model("llama", hidden=128, layers=2), "llama", r=4)
    batch = token_batch(1, 64)
    ref = loss_and_grads(model, batch)
    peft = torch.compile(model)
    peft(**batch).loss.backward()
    peft_bytes = _saved_activation_bytes(peft, batch)
    torch._dynamo.reset()
    ours = torch.compile(model, backend="fxlora")
    assert_same_step(ref, loss_and_grads(ours, batch), rtol=1e-4, atol=1e-5)
    assert _saved_activation_bytes(ours, batch) < peft_bytes


@pytest.mark.inductor
@pytest.mark.parametrize("form", ["f3/b9", "f4/b10"])
def test_inductor_concatenated_forms_are_exact(form):
    """Forward 3's y and backward 9's dX are strided views of one GEMM's output; Inductor must
    read them through the strides their fakes give (and forward 4 / backward 10 keep X A^T)."""
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(2, 16)
    ref = loss_and_grads(model, batch)
    fxlora.clear_reports()
    got = loss_and_grads(torch.compile(model, backend="fxlora", options={"force_form": form}), batch)
    assert_same_step(ref, got, rtol=1e-4, atol=1e-5)
    decisions = fxlora.last_report().graphs[-1].decisions
    assert sum(d.chosen.form.name == form for d in decisions if d.rewritten) >= 4
