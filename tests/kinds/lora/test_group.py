"""Shared-input groups: LoRA sites reading the same x run as one `fxlora::lora_group_linear`.
Exact against eager PEFT; must not fire with dropout, mixed dtypes or when turned off; a failing
group op costs its sites nothing but the sharing."""

import pytest
import torch

import importlib

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_lora
from tests.helpers import BF16, FP32, assert_same_step, compiled, step

GROUP_OP = "fxlora.lora_group_linear.default"


def _decisions():
    return [d for g in fxlora.last_report().graphs for d in g.decisions]


def _group_ops():
    return sum(g.graph_after.count(GROUP_OP + "(") for g in fxlora.last_report().graphs)


@pytest.mark.parametrize("form", [None, "f1/b1", "f3/b9", "f2/b5", "f4/b10"])
@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])  # slow: keeps `make test` under 15 min
def test_groups_equal_eager_peft(family, form):
    """q/k/v and gate/up become one op each (qwen2: q/k/v with biases), every gradient exact."""
    model = with_lora(tiny_model(family, layers=2), family, r=4)
    batch = token_batch(2, 16)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(compiled(model, **({"force_form": form} if form else {})), batch)
    assert_same_step(ref, got, **FP32)
    decisions = _decisions()
    assert all(d.rewritten for d in decisions) and len(decisions) == 14
    if form:  # the default choice may take forms whose dA or dB goes through dY^T X: those stay alone
        assert _group_ops() == 4
        assert sum("one op with sites" in d.reason for d in decisions) == 6  # q, k, v per layer
        assert sum("one op with site " in d.reason for d in decisions) == 4  # gate, up per layer


@pytest.mark.slow  # `make test` under 15 min cold (issue 31: Inductor now also compiles the op bodies)
def test_grouped_equals_ungrouped_under_inductor():
    """End to end through Inductor: same loss and gradients with and without groups."""
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(2, 32)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(torch.compile(model, backend="fxlora", options={"force_form": "f3/b9"}), batch)
    assert_same_step(ref, got, **FP32)
    assert _group_ops() == 2


def test_bf16_autocast_groups():
    model = with_lora(tiny_model("qwen2", layers=1), "qwen2", r=4)  # q/k/v with biases
    batch = token_batch(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = step(model, batch)
        fxlora.clear_reports()
        got = step(compiled(model, force_form="f1/b1"), batch)
    assert_same_step(ref, got, **BF16)


@pytest.mark.parametrize("case", ["dropout", "off", "mixed dtypes"])
def test_groups_do_not_form(case):
    model = tiny_model("llama", layers=1)
    if case == "mixed dtypes":  # PEFT's default: bf16 base, fp32 adapters
        model = model.to(torch.bfloat16)
    model = with_lora(model, "llama", r=4, dropout=0.1 if case == "dropout" else 0.0)
    batch = token_batch(2, 16)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(compiled(model, force_form="f1/b1", group_shared_input=case != "off"), batch)
    assert_same_step(ref, got, **(BF16 if case == "mixed dtypes" else FP32))
    assert _group_ops() == 0
    assert all(d.rewritten for d in _decisions())


def test_a_failing_group_op_leaves_its_sites_rewritten_alone(monkeypatch):
    def broken(chosen):
        raise RuntimeError("no group today")

    monkeypatch.setattr(importlib.import_module("fxlora.kinds.lora.rewrite"), "_replace_group", broken)
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    batch = token_batch(2, 16)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(compiled(model, force_form="f1/b1"), batch)
    assert_same_step(ref, got, **FP32)
    decisions = _decisions()
    assert all(d.rewritten for d in decisions) and _group_ops() == 0
    assert sum("rewritten alone: its group's op failed (RuntimeError: no group today)" in d.reason
               for d in decisions) == 5
