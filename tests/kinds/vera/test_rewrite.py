"""VeRA rewrites against eager PEFT: each form, Llama and GPT-2 Conv1D; where they must not fire."""

import pytest

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_vera
from tests.helpers import FP32, assert_same_step, compiled, step


def _decisions():
    return fxlora.last_report().decisions_of("vera")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("form", [None, "act", "weight"])
def test_vera_every_form_equals_eager_peft(family, form):
    model = with_vera(tiny_model(family, layers=1), family, r=4)
    batch = token_batch(2, 16)
    ref = step(model, batch)
    fxlora.clear_reports()
    assert_same_step(ref, step(compiled(model, scaling_form=form), batch), **FP32)
    decisions = _decisions()
    assert decisions and all(d.kind == "vera" and d.shape.kind == "vera" and d.rewritten for d in decisions)
    if form:
        assert {d.chosen.form.name for d in decisions} == {form}


def test_vera_with_trainable_A_or_dropout_is_rejected():
    model = with_vera(tiny_model("llama", layers=1), "llama", dropout=0.1)
    fxlora.clear_reports()
    step(compiled(model), token_batch(1, 8))
    report = fxlora.last_report()
    assert not report.sites
    assert "dropout" in str(report)


@pytest.mark.parametrize("form", [None, "act", "weight"])
def test_vera_after_the_models_own_dropout_equals_eager_peft(form):
    """PEFT's custom MLP: lin1 reads the model's own nn.Dropout(0.5), and so does VeRA's A. A dropout the base
    layer reads too is part of x (vera_dropout is 0): the site is rewritten, exact, the dropout stays."""
    from peft import VeraConfig

    from fxlora.testing.peft_custom import custom_model

    model, x = custom_model("MLP", VeraConfig(r=4, target_modules=["lin1"]))
    ref = step(model, x)
    fxlora.clear_reports()
    assert_same_step(ref, step(compiled(model, scaling_form=form), x), **FP32)
    decisions = _decisions()
    assert len(decisions) == 1 and decisions[0].rewritten
    assert not fxlora.last_report().rejections
