"""Property tests (hypothesis): random shapes, ranks, bias/dropout/trainability flags for one
LoRA linear under each form; output and every gradient equal to plain autograd on PEFT's math.

The op-level test is fast (no compile) and runs in `make test`; the compiled one is slow.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxlora
from fxlora.testing.models import HandLoRALinear
from fxlora.ops import lora as lora_ops  # noqa: F401  (registers torch.ops.fxlora.*)
from tests.robustness.common import FP32, compiled

SETTINGS = dict(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def lora_cases(draw):
    in_f, out_f = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    return dict(
        lead=tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))),
        in_f=in_f,
        out_f=out_f,
        r=draw(st.integers(1, min(in_f, out_f) - 1 or 1)),
        bias=draw(st.booleans()),
        bias_trainable=draw(st.booleans()),
        p=draw(st.sampled_from([0.0, 0.1, 0.5])),
        a_trainable=draw(st.booleans()),
        b_trainable=draw(st.booleans()),
        x_grad=draw(st.booleans()),
        conv1d=draw(st.booleans()),
        scale=draw(st.floats(0.25, 4.0)),
        seed=draw(st.integers(0, 2**16)),
    )


def _tensors(c):
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(*c["lead"], c["in_f"], generator=gen)
    W = torch.randn(c["out_f"], c["in_f"], generator=gen) / c["in_f"] ** 0.5
    b = torch.randn(c["out_f"], generator=gen) if c["bias"] else None
    A = torch.randn(c["r"], c["in_f"], generator=gen) / c["in_f"] ** 0.5
    B = torch.randn(c["out_f"], c["r"], generator=gen) / c["r"] ** 0.5
    cot = torch.randn(*c["lead"], c["out_f"], generator=gen)
    return x, W, b, A, B, cot


def _leaves(c, x, W, b, A, B):
    x = x.clone().requires_grad_(c["x_grad"])
    W = (W.t().contiguous() if c["conv1d"] else W.clone())
    b = None if b is None else b.clone().requires_grad_(c["bias_trainable"])
    A = A.clone().requires_grad_(c["a_trainable"])
    B = B.clone().requires_grad_(c["b_trainable"])
    return x, W, b, A, B


def _grads(out, cot, leaves):
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, wrt, cot, allow_unused=True) if wrt and out.requires_grad else []
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(got, wrt)]


def _legal(c, fwd, bwd):
    # with dropout the adapter sees drop(x) and the base x: no merged weight, forward or dX
    return not (c["p"] > 0 and (fwd in lora_ops.MERGED_FORWARD or lora_ops.BACKWARD_FORMS[bwd][2] in lora_ops.MERGED_DX))


FAST_FORMS = {(1, 1), (1, 3), (2, 4), (1, 5), (2, 8), (3, 9), (1, 10), (4, 1)}


@pytest.mark.parametrize(
    "fwd, bwd",
    [pytest.param(f, b, marks=() if (f, b) in FAST_FORMS else (pytest.mark.slow,)) for f in lora_ops.FORWARD_FORMS for b in lora_ops.BACKWARD_FORMS],
)
@settings(**SETTINGS)
@given(c=lora_cases())
def test_op_form_equals_autograd_reference(fwd, bwd, c):
    if not _legal(c, fwd, bwd):
        return
    x0, W0, b0, A0, B0, cot = _tensors(c)
    scale = torch.tensor(c["scale"])

    x, W, b, A, B = _leaves(c, x0, W0, b0, A0, B0)
    torch.manual_seed(c["seed"])
    Wl = W.t() if c["conv1d"] else W
    ref = F.linear(x, Wl, b) + scale * F.linear(F.linear(F.dropout(x, c["p"], True), A), B)
    ref_grads = _grads(ref, cot, (x, b, A, B))

    x, W, b, A, B = _leaves(c, x0, W0, b0, A0, B0)
    save_xa = not c["a_trainable"] and c["b_trainable"]
    torch.manual_seed(c["seed"])
    y, _, _ = torch.ops.fxlora.lora_linear(
        x, W, b, A, B, scale, c["p"], torch.float32, torch.float32, torch.float32, fwd, bwd, c["conv1d"], save_xa
    )
    got_grads = _grads(y, cot, (x, b, A, B))
    torch.testing.assert_close(y, ref, **FP32)
    assert len(got_grads) == len(ref_grads)
    for got, want in zip(got_grads, ref_grads):
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.slow
@settings(**SETTINGS)
@given(c=lora_cases(), objective=st.sampled_from(["saved_bytes", "flops"]))
def test_compiled_hand_lora_equals_eager(c, objective):
    """The whole path (match, price, rewrite, aot_eager) on a hand-written LoRA linear."""
    torch._dynamo.reset()
    torch.manual_seed(c["seed"])
    model = HandLoRALinear(c["in_f"], c["out_f"], r=c["r"], scale=c["scale"], bias=c["bias"], dropout=c["p"])
    model.down.weight.requires_grad_(c["a_trainable"])
    model.up.weight.requires_grad_(c["b_trainable"] or not c["a_trainable"])
    if c["bias"]:
        model.base.bias.requires_grad_(c["bias_trainable"])
    x0 = torch.randn(*c["lead"], c["in_f"])
    results = []
    fxlora.clear_reports()
    for run in (model, compiled(model, objective=objective)):
        x = x0.clone().requires_grad_(c["x_grad"])
        torch.manual_seed(c["seed"])
        out = run(x)
        out.pow(2).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
    for got, want in zip(*results[::-1]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **FP32)
    report = fxlora.last_report()
    assert report.sites and all(d.rewritten for g in report.graphs for d in g.decisions)
