"""ReFT (LoReFT, DiReFT, NodiReFT) on a linear layer's output: matched by math, priced, the
weight form rewritten exactly; and where it must not fire (docs/reft.md)."""

import pytest
import sympy
import torch
import torch.nn as nn

import fxlora
from fxlora.cost.core import crossover
from fxlora.kinds.base import LayerShape
from fxlora.kinds.reft.forms import candidate_forms
from fxlora.reft import attach_reft
from tests.helpers import FP32, assert_same_step, compiled, loss_and_grads



class Block(nn.Module):
    """x -> up -> relu -> o_proj, like a tiny MLP."""

    def __init__(self, i=12, d=16, hidden=24, bias=True):
        super().__init__()
        self.up = nn.Linear(i, hidden)
        self.o_proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        return self.o_proj(torch.relu(self.up(x)))


def _decisions():
    return fxlora.last_report().decisions_of("reft")


def _run(model, x, **options):
    fxlora.clear_reports()
    return loss_and_grads(compiled(model, **options), x)


@pytest.mark.parametrize("kind", ["loreft", "direft", "nodireft"])
@pytest.mark.parametrize("form", [None, "act", "weight"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_form_equals_eager(kind, form, bias):
    model = attach_reft(Block(bias=bias), ["o_proj"], kind=kind, r=3)
    x = torch.randn(2, 5, 12)
    ref = loss_and_grads(model, x)
    expected = {"loreft": {"rotate.parametrizations.weight.original", "learned_source.weight", "learned_source.bias"},
                "direft": {"proj.parametrizations.weight.original", "learned_source.weight", "learned_source.bias"},
                "nodireft": {"proj.weight", "learned_source.weight", "learned_source.bias"}}[kind]
    assert {n.removeprefix("o_proj.intervention.") for n in ref[1]} == expected
    assert_same_step(ref, _run(model, x, scaling_form=form), **FP32)
    (d,) = _decisions()
    assert d.chosen is not None and d.shape.kind == ("loreft" if kind == "loreft" else "direft")
    if form:
        assert d.chosen.form.name == form and d.rewritten == (form == "weight")


def test_auto_choice_follows_saved_bytes_crossover():
    """Narrow input, wide output, many tokens: saving x and W' beats saving h; few tokens: the reverse.
    (x needs grad here, so the weight form must keep W' for dx.)"""
    model = attach_reft(Block(i=8, hidden=8, d=64), ["o_proj"], r=2)
    for tokens, form in ((256, "weight"), (2, "act")):
        x = torch.randn(1, tokens, 8, requires_grad=True)
        torch._dynamo.reset()
        assert_same_step(loss_and_grads(model, x), _run(model, x), **FP32)
        (d,) = _decisions()
        assert d.chosen.form.name == form, (tokens, d.candidates)
    shape = LayerShape("loreft", sympy.Integer(1), sympy.Integer(8), sympy.Integer(64), sympy.Integer(2), 4, 4)
    t = crossover(candidate_forms(shape), shape, "act", "weight", "saved_bytes")
    assert t is not None and 2 < t < 256


def test_llama_o_proj_and_down_proj():
    from fxlora.testing.models import tiny_model, token_batch

    model = attach_reft(tiny_model("llama", layers=1), ["o_proj", "down_proj"], kind="loreft", r=4)
    batch = token_batch(2, 8)
    ref = loss_and_grads(model, batch)
    assert_same_step(ref, _run(model, batch, scaling_form="weight"), **FP32)
    sites = fxlora.last_report().sites_of("reft")
    assert sorted(s.module.rsplit(".", 1)[-1] for s in sites) == ["down_proj", "o_proj"]
    assert all(d.rewritten for d in _decisions())


def test_explain_shows_sites_and_candidates():
    model = attach_reft(Block(), ["o_proj"], kind="loreft", r=3)
    text = fxlora.explain(model, torch.randn(2, 5, 12), options={"inner": "aot_eager"}).format(verbose=True)
    assert "1 ReFT site" in text and "candidates for LoReFT sites 0" in text
    assert "act" in text and "weight" in text


# --- where it must not fire ------------------------------------------------------------


def test_trainable_base_weight_is_rejected():
    model = attach_reft(Block(), ["o_proj"], r=3)
    model.o_proj.base.weight.requires_grad_(True)
    x = torch.randn(2, 5, 12)
    assert_same_step(loss_and_grads(model, x), _run(model, x, scaling_form="weight"), **FP32)
    report = fxlora.last_report()
    assert not report.sites_of("reft")
    rejections = report.rejections_of("reft")
    assert any("W requires grad" in r.reason for r in rejections)


class Escape(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        h = self.inner.base(x)
        return self.inner.intervention(h) + h.sum()


def test_h_read_elsewhere_is_rejected():
    model = attach_reft(Block(), ["o_proj"], r=3)
    model.o_proj = Escape(model.o_proj)
    x = torch.randn(2, 5, 12)
    assert_same_step(loss_and_grads(model, x), _run(model, x, scaling_form="weight"), **FP32)
    report = fxlora.last_report()
    assert not report.sites_of("reft")
    rejections = report.rejections_of("reft")
    assert any("also read by" in r.reason for r in rejections)


def test_position_restricted_is_matched_not_rewritten():
    model = attach_reft(Block(), ["o_proj"], r=3, positions=2)
    x = torch.randn(2, 5, 12)
    assert_same_step(loss_and_grads(model, x), _run(model, x, scaling_form="weight"), **FP32)
    report = fxlora.last_report()
    (site,) = report.sites_of("reft")
    (d,) = report.decisions_of("reft")
    assert site.kind == "loreft" and not d.rewritten and "position-restricted" in d.reason
    assert "position-restricted" in str(report)


def test_bf16_weight_form_is_illegal():
    """W' = W + R^T U W in bf16 would round the small delta away: the act form is kept.
    (NodiReFT: torch's orthogonal parametrization has no bf16 CPU kernel.)"""
    model = attach_reft(Block(), ["o_proj"], kind="nodireft", r=3).to(torch.bfloat16)
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16)
    assert_same_step(loss_and_grads(model, x), _run(model, x, scaling_form="weight"), rtol=1e-2, atol=1e-3)
    (d,) = _decisions()
    assert d.chosen.form.name == "act" and not d.rewritten and "illegal" in d.reason


def test_rewrite_gives_new_nodes_fake_values():
    """kinds/README.md: later passes and explain read shapes from every node."""
    from fxlora.config import Config
    from fxlora.graph.read import value
    from fxlora.kinds import reft
    from fxlora.normalize import normalize
    from fxlora.pipeline import run_kinds

    seen = []

    def backend(gm, example_inputs):
        normalize(gm)  # matchers read the canonical graph (`matmul(D, R)` is `linear(D, R.t())`)
        (result,) = run_kinds(gm, Config(inner="aot_eager", scaling_form="weight"), [reft.KIND])
        seen.extend(d.rewritten for d in result.decisions)
        missing = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method") and value(n) is None]
        assert not missing, missing
        return gm.forward

    model = attach_reft(Block(), ["o_proj"], kind="loreft", r=3)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x), rtol=1e-4, atol=1e-5)
    assert seen == [True]


def test_bf16_autocast_is_matched_left_as_traced_and_exact():
    """Under bf16 autocast the weight form would round differently than the traced chain: the
    site is matched, left as it is with the reason in explain, and the step equals eager."""
    model = attach_reft(Block(), ["o_proj"], kind="loreft", r=3)
    x = torch.randn(2, 5, 12)

    def step(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_grads(m, x)

    ref = step(model)
    fxlora.clear_reports()
    got = step(compiled(model))
    assert_same_step(ref, got, rtol=1e-2, atol=1e-3)
    (d,) = _decisions()
    assert not d.rewritten and "autocast" in d.reason
