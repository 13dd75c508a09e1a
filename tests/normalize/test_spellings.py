"""Match the math, not the spelling (issue 16, docs/recognises.md): every spelling of a LoRA,
weight-side LoRA and LoReFT is found, rewritten and exact; each normalisation rule turns a
spelling into the canonical graph and keeps its values; plain models report no near miss."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fxlora
from fxlora.graph.edit import copy_graph_module
from fxlora.normalize import RULES, normalize
from tests.helpers import assert_same_step, dynamo_graph, loss_and_grads
from tests.normalize.spellings import (
    D_IN, D_OUT, LORA_SPELLINGS, R, S, HandLoreft, LoraSpelling, PyreftStyleLoreft, WeightSide, lora_spelling,
    minlora_model,
)

FP32 = dict(rtol=1e-4, atol=1e-5)


def _x(*shape):
    torch.manual_seed(1)
    return torch.randn(*shape) if shape else torch.randn(2, 3, D_IN)


def _compiled_step(model, x, **options):
    torch._dynamo.reset()  # hypothesis draws many spellings of one forward: no recompile limit to hit
    fxlora.clear_reports()
    compiled = torch.compile(model, backend="fxlora", options={"inner": "aot_eager", **options})
    return loss_and_grads(compiled, x)


def _trace(model, x) -> tuple[fx.GraphModule, list]:
    """The Dynamo graph of model(x) and the inputs it was called with."""
    return dynamo_graph(model, x)


def _normalized(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    copy = copy_graph_module(gm)
    return copy, normalize(copy)


def _ops(gm: fx.GraphModule) -> list[str]:
    """The graph's computation as (op, target) names, placeholders and output left out."""
    return [f"{n.op}:{getattr(n.target, '__name__', n.target)}" for n in gm.graph.nodes
            if n.op in ("call_function", "call_method")]


# --- every spelling: one site, the same site, rewritten, exact -------------------------------


@pytest.mark.parametrize("name", sorted(LORA_SPELLINGS))
def test_lora_spelling_is_found_rewritten_and_exact(name):
    model = lora_spelling(name)
    x = _x()
    report = fxlora.explain(model, x)
    (site,) = report.sites
    assert (site.rank, site.in_features, site.out_features, float(site.scaling)) == (R, D_IN, D_OUT, S)
    assert not report.rejections and not report.near_misses
    assert_same_step(loss_and_grads(model, x), _compiled_step(model, x), **FP32)
    (d,) = fxlora.last_report().graphs[0].decisions
    assert d.rewritten


def test_explain_names_the_canonical_form_and_the_rules():
    text = str(fxlora.explain(lora_spelling("litgpt"), _x()))
    assert "normalised before matching: transpose x2, matmul_to_linear x2" in text
    assert "lora matched as linear(x, W, b) + linear(linear(drop(x), A), B) * s after normalising: site 0" in text
    assert "site 0 (matmul_to_linear, transpose)" in text


@pytest.mark.parametrize("where", ["product", "A", "B", "mm"])
def test_weight_side_lora_is_an_activation_site(where):
    """`F.linear(x, W + s * B @ A)`: the same LoRA seen from the weight; priced and rewritten like any site."""
    model, x = WeightSide(where), _x()
    report = fxlora.explain(model, x)
    (site,) = report.sites
    assert (site.rank, float(site.scaling)) == (R, S)
    assert "weight_side_lora" in report.graphs[0].rules
    assert_same_step(loss_and_grads(model, x), _compiled_step(model, x), **FP32)
    assert fxlora.last_report().graphs[0].decisions[0].rewritten


def test_minlora_parametrization():
    """minLoRA: `register_parametrization(layer, "weight", LoRAParametrization)` on every linear."""
    model, x = minlora_model(), _x()
    report = fxlora.explain(model, x)
    assert len(report.sites) == 2 and all(s.rank == R for s in report.sites)
    assert_same_step(loss_and_grads(model, x), _compiled_step(model, x), **FP32)
    assert all(d.rewritten for d in fxlora.last_report().graphs[0].decisions)


@pytest.mark.parametrize("cls", [PyreftStyleLoreft, HandLoreft])
def test_loreft_spellings(cls):
    """pyreft's `matmul(h, R_t)` ... `@ R_t.T` (R_t read twice through `orthogonal`) and a hand-written
    `h + (W_L(h) - h @ R.T) @ R` are the LoReFT of fxlora.reft."""
    torch.manual_seed(0)
    model, x = cls(), _x()
    report = fxlora.explain(model, x)
    (site,) = report.sites_of("reft")
    assert (site.kind, site.rank, site.out_features) == ("loreft", R, D_OUT)
    assert not report.near_misses
    assert_same_step(loss_and_grads(model, x), _compiled_step(model, x, scaling_form="weight"), **FP32)
    (d,) = fxlora.last_report().decisions_of("reft")
    assert d.rewritten


# --- each rule: a spelling, its canonical graph, the same values ------------------------------


class _Fn(nn.Module):
    """A frozen linear and trainable A, B, R (d, d) around a function of them."""

    def __init__(self, fn):
        super().__init__()
        self.base = nn.Linear(D_IN, D_OUT)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(R, D_IN) / 4)
        self.B = nn.Parameter(torch.randn(D_OUT, R) / 2)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


_PEFT = lambda m, x: m.base(x) + F.linear(F.linear(x, m.A), m.B) * S  # noqa: E731
# rule -> (spelling, canonical): normalising the spelling must give the canonical graph's ops
RULE_PAIRS = {
    "same_weight": (lambda m, x: F.linear(x, m.A * 2.0) + F.linear(x, m.A * 2.0), lambda m, x: F.linear(x, m.A * 2.0) * 2),
    "noop": (lambda m, x: F.linear(F.dropout(x.to(torch.float32).contiguous(), 0.0, True), m.A).view(2, 3, R),
             lambda m, x: F.linear(x, m.A)),
    "transpose": (lambda m, x: m.A.T.t() + m.A.permute(1, 0).transpose(0, 1), lambda m, x: m.A + m.A),
    "matmul_to_linear": (lambda m, x: x @ m.A.t(), lambda m, x: F.linear(x, m.A)),
    "einsum_to_linear": (lambda m, x: torch.einsum("bti,ri->btr", x, m.A), lambda m, x: F.linear(x, m.A)),
    "bias_into_linear": (lambda m, x: F.linear(x, m.base.weight) + m.base.bias, lambda m, x: m.base(x)),
    "add_alpha": (lambda m, x: torch.add(m.base(x), F.linear(F.linear(x, m.A), m.B), alpha=S), _PEFT),
    "scalar_last": (lambda m, x: m.base(x) + S * F.linear(F.linear(x, m.A), m.B), _PEFT),
    "div_scale": (lambda m, x: m.base(x) + F.linear(F.linear(x, m.A), m.B) / (1 / S), _PEFT),
    "scale_out_of_linear": (lambda m, x: m.base(x) + F.linear(F.linear(x, m.A) * S, m.B), _PEFT),
    "merge_scales": (lambda m, x: m.base(x) + F.linear(F.linear(x, m.A), m.B) * 2.0 * (S / 2), _PEFT),
    "identity_product": (lambda m, x: F.linear(F.linear(torch.eye(D_IN), m.A), m.B).T + x.sum(),  # PEFT's DoRA B A
                         lambda m, x: m.B @ m.A + x.sum()),
    "weight_side_lora": (lambda m, x: F.linear(x, m.base.weight + m.B @ m.A * S, m.base.bias),
                         lambda m, x: m.base(x) + F.linear(F.linear(x, m.A), m.B) * S),
}


QUANT_RULES = ("linear_4bit", "bnb_4bit_gemm")  # need bitsandbytes: tests/kinds/lora/test_qlora.py


def test_every_rule_has_a_pair():
    assert set(RULE_PAIRS) | set(QUANT_RULES) == {r.name for r in RULES}
    assert all(r.comment for r in RULES)


@pytest.mark.parametrize("rule", sorted(RULE_PAIRS))
def test_rule_turns_spelling_into_canonical_and_keeps_values(rule):
    spelling, canonical = RULE_PAIRS[rule]
    torch.manual_seed(0)
    model, x = _Fn(spelling), _x()
    gm, inputs = _trace(model, x)
    counters.clear()
    normed, fired = _normalized(gm)
    assert fired.get(rule), fired
    assert counters["fxlora"][f"normalize.{rule}"] == fired[rule]
    torch.testing.assert_close(normed(*inputs), gm(*inputs), **FP32)  # the traced and the normalised graph
    model.fn = canonical
    ref, _ = _trace(model, x)
    ref_normed, _ = _normalized(ref)
    if rule == "same_weight":  # A * 2 computed once, read twice: the canonical `f(A * 2) * 2` differs in ops
        assert _ops(normed).count("call_function:mul") == 1
    else:
        assert _ops(normed) == _ops(ref_normed), (normed.code, ref_normed.code)


def test_normalising_keeps_values_on_every_spelling():
    for name in LORA_SPELLINGS:
        torch.manual_seed(0)
        model, x = lora_spelling(name), _x()
        gm, inputs = _trace(model, x)
        normed, _ = _normalized(gm)
        torch.testing.assert_close(normed(*inputs), gm(*inputs), **FP32, msg=name)


def test_counters_and_no_global_state():
    counters.clear()
    fxlora.explain(lora_spelling("litgpt"), _x())
    assert counters["fxlora"]["normalize.matmul_to_linear"] == 2
    assert counters["fxlora"]["normalize.transpose"] == 2


def test_nothing_rewritten_compiles_the_traced_graph():
    """Normalising alone never changes what runs: with no site rewritten the traced graph is compiled."""
    model = lora_spelling("litgpt")
    fxlora.clear_reports()
    torch.compile(model, backend="fxlora", options={"inner": "aot_eager", "rewrite": False})(_x())
    g = fxlora.last_report().graphs[0]
    assert g.rules and not any(d.rewritten for d in g.decisions)
    assert g.graph_after == g.graph_before


# --- near misses: adapter-like, matched by no kind, never silent ----------------------------


class _NearMiss(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.base = nn.Linear(D_IN, D_OUT)
        self.base.requires_grad_(False)
        r = D_OUT if kind == "full_rank" else R
        self.A = nn.Parameter(torch.randn(r, D_IN) / 4)
        self.B = nn.Parameter(torch.randn(D_OUT, r) / 2)
        self.E = nn.Parameter(torch.randn(r, 1))
        self.s = nn.Parameter(torch.tensor(0.5))
        self.M = nn.Parameter(torch.ones(D_OUT, D_IN))
        self.Rot = nn.Parameter(torch.eye(D_IN) + 0.01 * torch.randn(D_IN, D_IN))
        self.kind = kind

    def forward(self, x):
        m, k = self, self.kind
        if k == "adalora":  # PEFT AdaLoRA: A scaled by the trainable singular values E
            return m.base(x) + (x @ (m.A * m.E).T @ m.B.T) * S
        if k == "tanh_between":
            return m.base(x) + F.linear(torch.tanh(F.linear(x, m.A)), m.B)
        if k == "full_rank":
            return m.base(x) + F.linear(F.linear(x, m.A), m.B)
        if k == "trainable_scale":
            return m.base(x) + F.linear(F.linear(x, m.A), m.B) * m.s
        if k == "masked_weight":
            return F.linear(x, m.base.weight * m.M, m.base.bias)
        if k == "input_rotation":  # OFT-style: x rotated by a matrix computed from trainable tensors
            Q = m.Rot - m.Rot.T + torch.eye(D_IN)
            return m.base(x @ Q)
        raise ValueError(k)


@pytest.mark.parametrize("kind, why", [
    ("adalora", "computed in the graph"),
    ("tanh_between", "tanh between them"),
    ("full_rank", "rank 12, not low"),
    ("trainable_scale", "the scale is a trainable tensor"),
    ("masked_weight", "its weight is computed in the graph"),
    ("input_rotation", "input rotation"),
])
def test_near_misses_are_explained(kind, why):
    report = fxlora.explain(_NearMiss(kind), _x())
    assert not report.sites
    reasons = [r.reason for r in report.rejections] + [r.reason for r in report.near_misses]
    assert any(why in r for r in reasons), reasons
    assert "matched by no kind" in str(report) or report.rejections


def test_plain_models_have_no_near_misses():
    """Residual adds, SwiGLU, attention: nothing adapter-like in a PEFT LoRA Llama beyond its sites."""
    from fxlora.testing.models import tiny_model, token_batch, with_lora

    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    report = fxlora.explain(model, **token_batch(2, 8))
    assert len(report.sites) == 7 and not report.near_misses and not report.rejections
    plain = nn.Sequential(nn.Linear(D_IN, 32), nn.GELU(), nn.Linear(32, D_OUT))
    assert not fxlora.explain(plain, _x()).near_misses


# --- property: random spellings of one LoRA match identically ------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

PROJECTIONS = {  # u -> u @ W^T for W (out, in)
    "linear": lambda u, W: F.linear(u, W),
    "matmul_t": lambda u, W: torch.matmul(u, W.t()),
    "at_T": lambda u, W: u @ W.T,
    "transpose": lambda u, W: u @ W.transpose(0, 1),
    "permute": lambda u, W: u @ W.permute(1, 0),
    "mT": lambda u, W: u @ W.mT,
    "einsum": lambda u, W: torch.einsum("...i,ri->...r", u, W),
}
SCALES = {  # (project_A, project_B) -> branch(x) = s * B A x
    "after": lambda pa, pb, x: pb(pa(x)) * S,
    "before": lambda pa, pb, x: S * pb(pa(x)),
    "on_x": lambda pa, pb, x: pb(pa(x * S)),
    "between": lambda pa, pb, x: pb(S * pa(x)),
    "div": lambda pa, pb, x: pb(pa(x)) / (1 / S),
    "split": lambda pa, pb, x: pb(pa(x) * 2.0) * (S / 2.0),
}


@settings(max_examples=12, deadline=None, derandomize=True)
@given(a=st.sampled_from(sorted(PROJECTIONS)), b=st.sampled_from(sorted(PROJECTIONS)), s=st.sampled_from(sorted(SCALES)))
def test_random_spellings_match_identically(a, b, s):
    pa, pb, scale = PROJECTIONS[a], PROJECTIONS[b], SCALES[s]
    torch.manual_seed(0)
    model = LoraSpelling(lambda m, x, base: base + scale(lambda u: pa(u, m.A), lambda u: pb(u, m.B), x))
    x = _x()
    torch._dynamo.reset()
    (site,) = fxlora.explain(model, x).sites
    assert (site.rank, site.in_features, site.out_features, site.base_kind) == (R, D_IN, D_OUT, "linear")
    assert float(site.scaling) == pytest.approx(S)
    assert_same_step(loss_and_grads(model, x), _compiled_step(model, x), **FP32)


@pytest.mark.parametrize("name", ["litgpt", "scale_on_x", "minlora"])
def test_dynamic_shapes(name):
    """dynamic=True: sizes are symbols and a Python-float scale arrives as `S.item()` (a SymFloat)."""
    model = minlora_model() if name == "minlora" else lora_spelling(name)
    torch._dynamo.reset()
    fxlora.clear_reports()
    compiled = torch.compile(model, backend="fxlora", dynamic=True, options={"inner": "aot_eager"})
    for tokens in (3, 7):
        x = torch.randn(2, tokens, D_IN)
        assert_same_step(loss_and_grads(model, x), loss_and_grads(compiled, x), **FP32)
    graphs = fxlora.last_report().graphs
    assert graphs and all(d.rewritten for g in graphs for d in g.decisions)
    assert all(len(g.decisions) == (2 if name == "minlora" else 1) for g in graphs)
