"""options={"verify": True}: the first call checks the rewrite against the untouched graph."""

import pytest
import torch

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_lora
from fxlora.ops import lora as lora_ops
from tests.helpers import assert_same_step, compiled, loss_and_grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_verify_passes_on_a_correct_rewrite(dropout):
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4, dropout=dropout)
    batch = token_batch(2, 16)
    torch.manual_seed(0)
    ref = loss_and_grads(model, batch)
    fast = compiled(model, verify=True)
    torch.manual_seed(0)
    assert_same_step(ref, loss_and_grads(fast, batch), rtol=1e-4, atol=1e-5)
    assert all(d.rewritten for d in fxlora.last_report().graphs[-1].decisions)


def test_verify_names_the_input_whose_gradient_is_wrong(monkeypatch):
    """A planted bug in the op's backward (dA doubled) must be caught, naming lora_A."""
    real = lora_ops.lora_linear_backward

    def wrong_dA(*args, **kwargs):
        dX, db, dA, dB, dXa = real(*args, **kwargs)
        return dX, db, dA * 2, dB, dXa

    monkeypatch.setattr(lora_ops, "lora_linear_backward", wrong_dA)
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    fast = compiled(model, verify=True)
    with pytest.raises(Exception) as caught:
        fast(**token_batch(2, 16)).loss.backward()
    err = caught.value
    while not isinstance(err, fxlora.VerificationError) and err.__cause__ is not None:
        err = err.__cause__
    err = getattr(err, "inner_exception", err)
    assert isinstance(err, fxlora.VerificationError), repr(caught.value)
    assert "lora_A" in str(err) and "rewritten sites" in str(err)
