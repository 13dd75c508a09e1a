"""The exact LoRA rewrite against eager PEFT: loss and every adapter gradient, each form, must-not-fire cases."""

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora.backend import compile_graph
from fxlora.testing.models import HandLoRALinear, tiny_model, token_batch, with_lora
from fxlora.config import Config
from tests.helpers import BF16, FP32, assert_same_step, compiled, loss_and_grads

# bf16 autocast: both sides round GEMM inputs to bf16, in different orders; gradients of
# a 1-layer model agree to a few bf16 ulps.



def _step(model, batch, seed=1):
    torch.manual_seed(seed)
    return loss_and_grads(model, batch)


def _rewritten(report=None):
    report = report or fxlora.last_report()
    return [d for g in report.graphs for d in g.decisions if d.rewritten]


@pytest.mark.parametrize("form", [None, "f1/b1", "f1/b2", "f1/b3", "f2/b4", "f1/b5", "f2/b5"])
def test_llama_every_form_equals_eager_peft(form):
    fxlora.clear_reports()
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(2, 16)
    ref = _step(model, batch)
    got = _step(compiled(model, force_form=form), batch)
    assert_same_step(ref, got, **FP32)
    decisions = _rewritten()
    assert len(decisions) == 7
    if form:
        assert {d.chosen.form.name for d in decisions} == {form}


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_families_with_and_without_dropout_same_mask(family, dropout):
    """Dropout stays exact: the op draws the mask from the same RNG stream in the same order as PEFT."""
    model = with_lora(tiny_model(family, layers=1), family, r=4, dropout=dropout)
    batch = token_batch(2, 16)
    ref = _step(model, batch)
    fxlora.clear_reports()
    got = _step(compiled(model), batch)
    assert_same_step(ref, got, **FP32)
    assert len(_rewritten()) == len(fxlora.last_report().sites) > 0


def test_bf16_autocast_drops_the_fp32_copy_and_keeps_gradients():
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _step(model, batch)
        fxlora.clear_reports()
        got = _step(compiled(model), batch)
    assert_same_step(ref, got, **BF16)
    report = fxlora.last_report()
    assert len(_rewritten(report)) == 7
    assert all(s.autocast == "cpu:bfloat16" for s in report.sites)


def test_bf16_weights_with_fp32_adapters():
    """PEFT's default autocast_adapter_dtype: bf16 base, fp32 A/B, x cast up per site."""
    model = with_lora(tiny_model("llama", layers=1).to(torch.bfloat16), "llama", r=4)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.dtype == torch.float32
    batch = token_batch(2, 16)
    ref = _step(model, batch)
    fxlora.clear_reports()
    got = _step(compiled(model), batch)
    assert_same_step(ref, got, **BF16)
    (graph,) = fxlora.last_report().graphs
    assert len(_rewritten()) == 7
    cast = "to(dtype = torch.float32)"  # PEFT's per-layer x.to(adapter dtype): gone after the rewrite
    assert graph.graph_before.count(cast) >= 4 and graph.graph_after.count(cast) == 0


def test_frozen_A_saves_xa():
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    batch = token_batch(2, 16)
    ref = _step(model, batch)
    fxlora.clear_reports()
    got = _step(compiled(model), batch)
    assert_same_step(ref, got, **FP32)
    assert all(d.shape.a_trainable is False for d in _rewritten())
    assert all(d.chosen.saved_bytes == 32 * 4 * 4 for d in _rewritten())  # T * r * 4 bytes


def test_adamw_steps_give_the_same_weights():
    batch = token_batch(2, 16)
    trained = []
    for compile_it in (False, True):
        model = with_lora(tiny_model("llama", layers=1), "llama", r=4, dropout=0.1)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        run = compiled(model) if compile_it else model
        torch.manual_seed(3)
        for _ in range(3):
            run(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        trained.append([p.detach().clone() for p in params])
    for a, b in zip(*trained):
        torch.testing.assert_close(b, a, **FP32)


def test_dynamic_batch_crossing_the_threshold_recompiles_into_the_other_form():
    """forward 2 (merged weight) pays off above T = i*o/(i+o)-ish; a guard makes T crossing it recompile."""
    model = HandLoRALinear(64, 64, r=4, bias=False)
    reports = []
    compiled = torch.compile(
        model, dynamic=True,
        backend=lambda gm, ex: compile_graph(gm, ex, Config(inner="aot_eager", objective="flops", form_guards=True), on_report=reports.append),
    )
    compiles_after = []
    for tokens in (4, 6, 4096, 3000, 5):
        x = torch.randn(tokens, 64, requires_grad=True)
        ref_x = x.detach().clone().requires_grad_(True)
        torch.testing.assert_close(compiled(x), model(ref_x), **FP32)
        compiles_after.append(len({r.compile_id for r in reports}))
    assert compiles_after == [1, 1, 2, 2, 2], "one compile for small T, one for large T, no more"
    first = [r for r in reports if r.compile_id == reports[0].compile_id][-1].decisions[0].chosen.form.name
    second = reports[-1].decisions[0].chosen.form.name
    assert first[:2] in ("f1", "f4") and second.startswith("f2")  # forward 1 (4 = 1 keeping X A^T), then merged


# --- where it must not fire ------------------------------------------------------------


def test_stacked_adapter_is_left_as_graph_ops():
    from peft import LoraConfig

    model = with_lora(tiny_model("llama", layers=1), "llama", targets=["q_proj"], r=4)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["second"].weight)
    batch = token_batch(2, 8)
    ref = _step(model, batch)
    fxlora.clear_reports()
    got = _step(compiled(model), batch)
    assert_same_step(ref, got, **FP32)
    decisions = fxlora.last_report().graphs[0].decisions
    assert [d.rewritten for d in decisions] == [True, False]
    assert "stacked" in decisions[1].reason and "stacked" in str(fxlora.last_report())


def test_rewrite_false_reports_without_rewriting():
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    fxlora.clear_reports()
    compiled(model, rewrite=False)(**token_batch(1, 8))
    (graph,) = fxlora.last_report().graphs
    assert not any(d.rewritten for d in graph.decisions)
    assert "fxlora.lora_linear" not in graph.graph_after
    assert all("would choose" in d.reason for d in graph.decisions)


def test_rejected_sites_are_not_rewritten():
    class Escaping(HandLoRALinear):
        def forward(self, x):
            xa = self.down(x)
            return self.base(x) + self.scale * self.up(xa) + xa.sum()

    model = Escaping(16, 16)
    x = torch.randn(2, 16, requires_grad=True)
    fxlora.clear_reports()
    torch.testing.assert_close(compiled(model)(x), model(x))
    (graph,) = fxlora.last_report().graphs
    assert not graph.decisions and graph.rejections
