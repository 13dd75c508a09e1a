"""Inductor compiles what runs inside fxlora's ops (fxlora/ops/inline.py): every kind's ops inlined,
exact against eager PEFT (or, with hashed dropout masks, against the same graph with opaque ops:
same seeds, same masks); ops whose bodies read outside state stay opaque and the report says why."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import fxlora
from fxlora.ops.inline import inline_ops
from fxlora.testing.models import tiny_model, token_batch, with_ia3, with_lora, with_vera
from tests.helpers import assert_same_step, step

ATTACH = {
    "lora": lambda m: with_lora(m, r=4),
    "dora": lambda m: with_lora(m, r=4, use_dora=True),
    "ia3": lambda m: with_ia3(m),
    "vera": lambda m: with_vera(m, r=4),
}
FAST = ("lora",)  # the others compile in the slow set (`make test-all`): `make test` under 15 min cold
CHEAP = {"objective": "saved_bytes"}  # no timing: the test compiles, it does not race forms


@pytest.fixture(autouse=True)
def no_compile_caches():
    """The pass runs when Inductor compiles; a graph loaded from its caches was inlined when first compiled."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _model(attach, **kw):
    return attach(tiny_model("llama", hidden=32, layers=1, **kw)).train()


def _inlined(report) -> tuple[int, list[tuple[str, str]]]:
    g = report.graphs[-1]
    return sum(sum(r.inlined.values()) for r in g.inlined), [o for r in g.inlined for o in r.opaque]


@pytest.mark.parametrize("kind", [k if k in FAST else pytest.param(k, marks=pytest.mark.slow) for k in ATTACH])
def test_every_op_body_compiled_and_exact(kind):
    batch = token_batch(2, 8)
    ref = step(_model(ATTACH[kind]), batch)
    got = step(torch.compile(_model(ATTACH[kind]), backend="fxlora", options=CHEAP), batch)
    n, opaque = _inlined(fxlora.last_report())
    assert n >= 2 and not opaque, opaque  # forward and backward ops of every site
    assert "op bodies compiled by Inductor" in fxlora.last_report().format()
    assert_same_step(ref, got, rtol=1e-4, atol=1e-5)


def test_dropout_masks_hashed_inline_equal_opaque():
    """Hashed masks are a function of (seed, index): the inlined step equals the eager-body step drawn
    from the same global seed (same graph seeds), loss and every gradient."""
    batch = token_batch(2, 8)
    attach = lambda m: with_lora(m, r=4, dropout=0.25)  # noqa: E731
    inlined = step(torch.compile(_model(attach), backend="fxlora", options=CHEAP), batch, seed=5)
    n, opaque = _inlined(fxlora.last_report())
    assert n >= 2 and not opaque
    torch._dynamo.reset()
    eager_bodies = step(torch.compile(_model(attach), backend="fxlora", options={**CHEAP, "inline_ops": False}),
                        batch, seed=5)
    assert not fxlora.last_report().graphs[-1].inlined
    assert_same_step(eager_bodies, inlined, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # `make test` under 15 min cold (issue 31: Inductor now also compiles the op bodies)
def test_eager_masks_stay_opaque_and_say_why():
    # (tests/test_backend.py::test_inductor_dropout_sites_draw_eager_masks_under_fallback_random checks it in `make test`)
    """Must not fire: under fallback_random the masks are eager's, drawn from the global RNG."""
    batch = token_batch(2, 8)
    model = _model(lambda m: with_lora(m, r=4, dropout=0.25))
    step(torch.compile(model, backend="fxlora", options={**CHEAP, "inductor": {"fallback_random": True}}), batch)
    _, opaque = _inlined(fxlora.last_report())
    assert opaque and all("eager's dropout masks" in why for _, why in opaque)
    assert "left opaque (eager body): lora_linear" in fxlora.last_report().format()


@torch.library.custom_op("fxlora::_test_unchecked", mutates_args=())
def _unchecked(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_unchecked.register_fake
def _(x):
    return torch.empty_like(x)


def _graph_calling(op) -> fx.Graph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = FakeTensorMode().from_tensor(torch.randn(4))
    y = graph.call_function(op, (x,))
    graph.output(y)
    return graph


def test_an_op_without_a_check_stays_opaque():
    graph = _graph_calling(torch.ops.fxlora._test_unchecked.default)
    result = inline_ops(graph)
    assert result.opaque == [("fxlora::_test_unchecked", "no inline check registered")] and not result.inlined
    assert any(n.target is torch.ops.fxlora._test_unchecked.default for n in graph.nodes)


def test_inline_replaces_the_op_and_its_getitems():
    from torch._inductor.virtualized import V

    from fxlora.ops.lora import lora_linear  # noqa: F401

    def f(x, W, A, B, s):
        return operator.getitem(torch.ops.fxlora.lora_linear.default(
            x, W, None, A, B, s, 0.0, torch.float32, torch.float32, torch.float32, 1, 1, False, False), 0)

    args = (torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), torch.tensor(2.0))
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(f, tracing_mode="fake")(*args)
    fake_mode = next(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder").fake_mode
    with V.set_fake_mode(fake_mode):
        result = inline_ops(gm.graph)
    gm.recompile()
    assert result.inlined == {"fxlora::lora_linear": 1}
    assert not any(getattr(n.target, "namespace", None) == "fxlora" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*args), f(*args))


@pytest.mark.slow  # `make test` under 15 min cold (issue 31: Inductor now also compiles the op bodies)
def test_a_graph_from_inductors_cache_says_so():
    from fxlora.backend import CACHED_NOTE

    batch = token_batch(2, 8)
    with torch._inductor.config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            step(torch.compile(_model(ATTACH["lora"]), backend="fxlora", options=CHEAP), batch)
    g = fxlora.last_report().graphs[-1]
    assert g.inlined or CACHED_NOTE in g.notes
