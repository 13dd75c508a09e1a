"""IA3 rewrites (and VeRA under bf16 autocast) against eager PEFT: loss and every trainable gradient, each form,
Llama and GPT-2 Conv1D, bias and no bias, fp32 and bf16 autocast; and where they must not fire."""

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_ia3, with_vera
from tests.helpers import BF16, FP32, assert_same_step, compiled, step


def _decisions():
    return [d for kind in ("ia3", "vera") for d in fxlora.last_report().decisions_of(kind)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("form", [None, "act", "recompute", "weight"])
def test_ia3_every_form_equals_eager_peft(family, form):
    model = with_ia3(tiny_model(family, layers=1), family)
    batch = token_batch(2, 16)
    ref = step(model, batch)
    fxlora.clear_reports()
    assert_same_step(ref, step(compiled(model, scaling_form=form), batch), **FP32)
    decisions = _decisions()
    assert {d.shape.kind for d in decisions} == {"ia3_out", "ia3_in"} and all(d.rewritten for d in decisions)
    if form:  # recompute exists for output scaling only
        assert all(d.chosen.form.name == form for d in decisions if d.shape.kind == "ia3_out")


def test_llama_with_bias_all_linears():
    """Llama with attention_bias: output scaling folds b * l, and dl gets b * sum(dy)."""
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    for form in ("weight", "recompute"):
        model = with_ia3(tf.LlamaForCausalLM(cfg), "llama")
        batch = token_batch(2, 8)
        ref = step(model, batch)
        fxlora.clear_reports()
        assert_same_step(ref, step(compiled(model, scaling_form=form), batch), **FP32)
        assert all(s.has_bias for s in fxlora.last_report().sites)


@pytest.mark.parametrize("adapter", ["ia3", "vera"])
def test_bf16_autocast(adapter):
    """Under autocast the vectors scale in fp32 a bf16 matmul output: merging them into W would
    round differently, so the weight form is illegal and the report says why."""
    model = (with_ia3 if adapter == "ia3" else with_vera)(tiny_model("llama", layers=1), "llama")
    batch = token_batch(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = step(model, batch)
        fxlora.clear_reports()
        got = step(compiled(model, scaling_form="weight"), batch)
    assert_same_step(ref, got, **BF16)
    decisions = _decisions()
    assert decisions and all(d.rewritten and d.chosen.form.name != "weight" for d in decisions)
    assert "illegal" in str(fxlora.last_report(verbose=True))


def test_explain_shows_candidates_and_choice():
    model = with_ia3(tiny_model("llama", layers=1), "llama")
    text = fxlora.explain(model, **token_batch(1, 8), options={"inner": "aot_eager"}).format(verbose=True)
    assert "3 IA3 sites" in text and "candidates for IA3 (output scaling)" in text
    assert "recompute" in text and "weight" in text and "fewest saved bytes" in text


# --- where it must not fire ------------------------------------------------------------


class HandIA3(nn.Module):
    def __init__(self, trainable_w=False, escape=False, reuse_l=False):
        super().__init__()
        self.base = nn.Linear(16, 8).requires_grad_(trainable_w)
        self.l = nn.Parameter(torch.randn(8))
        self.escape, self.reuse_l = escape, reuse_l

    def forward(self, x):
        h = self.base(x)
        y = h * self.l
        if self.escape:
            y = y + h.sum()
        if self.reuse_l:
            y = y + self.l.sum()
        return y


@pytest.mark.parametrize("case,reason", [
    (dict(trainable_w=True), "W requires grad"),
    (dict(escape=True), "also read by"),
    (dict(reuse_l=True), "also read by"),
])
def test_ia3_must_not_fire(case, reason):
    model = HandIA3(**case)
    x = torch.randn(2, 3, 16, requires_grad=True)
    fxlora.clear_reports()
    fast = compiled(model)
    torch.testing.assert_close(fast(x), model(x))
    report = fxlora.last_report()
    assert not report.sites
    rejections = report.rejections
    assert rejections and reason in rejections[0].reason


def test_frozen_vector_is_not_a_site():
    model = HandIA3()
    model.l.requires_grad_(False)
    fxlora.clear_reports()
    compiled(model)(torch.randn(2, 16))
    assert not fxlora.last_report().sites


