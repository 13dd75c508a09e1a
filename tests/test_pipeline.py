"""The one driver (fxlora/pipeline.py): every kind counted, node ownership between kinds, and
the editing invariant that every node a rewrite inserts carries a fake value."""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import fxlora
from fxlora.config import Config
from fxlora.graph.read import value
from fxlora.kinds import KINDS
from fxlora.pipeline import count, run_kinds, run_pipeline
from fxlora.reft import attach_reft
from fxlora.testing.models import tiny_model, token_batch, with_ia3, with_lora, with_vera
from tests.helpers import compiled, loss_and_grads
from tests.kinds.reft.test_reft import Block


def _model(kind):
    if kind == "lora":
        return with_lora(tiny_model("llama", layers=1), "llama", r=4, dropout=0.1), token_batch(1, 8)
    if kind == "ia3":
        return with_ia3(tiny_model("llama", layers=1), "llama"), token_batch(1, 8)
    if kind == "vera":
        return with_vera(tiny_model("llama", layers=1), "llama", r=4), token_batch(1, 8)
    return attach_reft(Block(), ["o_proj"], kind="loreft", r=3), torch.randn(2, 5, 12)


EXPECTED_SITES = {"lora": 7, "ia3": 3, "vera": 2, "reft": 1}  # PEFT default targets for IA3 and VeRA


@pytest.mark.parametrize("kind", ["lora", "ia3", "vera", "reft"])
def test_every_kind_is_counted(kind):
    model, batch = _model(kind)
    counters.clear()
    options = {"inner": "aot_eager", **({"scaling_form": "weight"} if kind == "reft" else {})}
    loss_and_grads(torch.compile(model, backend="fxlora", options=options), batch)
    stats = counters["fxlora"]
    n = EXPECTED_SITES[kind]
    assert stats[f"{kind}_sites"] == n and stats[f"{kind}_rewritten"] == n and stats[f"{kind}_kept"] == 0
    assert sum(v for k, v in stats.items() if k.endswith("_sites")) == n, dict(stats)
    assert fxlora.last_report().graphs[-1].rewritten == n


@pytest.mark.parametrize("kind", ["lora", "ia3", "vera", "reft"])
def test_every_inserted_node_has_a_fake_value(kind):
    """Normalisation and every kind's rewrite: no node they add lacks its fake value."""
    model, batch = _model(kind)
    missing, rewritten = [], []

    def backend(gm, example_inputs):
        traced = set(gm.graph.nodes)
        result = run_pipeline(gm, Config(inner="aot_eager", scaling_form="weight" if kind == "reft" else None))
        rewritten.extend(d.rewritten for r in result.kinds for d in r.decisions)
        missing.extend(n.name for n in gm.graph.nodes if n not in traced and value(n) is None)
        return gm.forward

    loss_and_grads(torch.compile(model, backend=backend), batch)
    assert rewritten and all(rewritten)
    assert not missing, missing


def test_a_node_claimed_by_an_earlier_kind_rejects_the_later_site():
    """First match wins: IA3 run twice over kept sites, the second pass rejects each one, naming the owner."""
    model, batch = _model("ia3")
    ia3 = next(k for k in KINDS if k.name == "ia3")
    twice = [ia3, dataclasses.replace(ia3, name="ia3_again", title="IA3 again")]
    seen = []

    def backend(gm, example_inputs):
        seen.extend(run_kinds(gm, Config(inner="aot_eager", rewrite=False), twice))
        count(seen)
        return gm.forward

    counters.clear()
    loss_and_grads(torch.compile(model, backend=backend), batch)
    first, second = seen
    assert len(first.match.sites) == 3 and not second.match.sites
    assert len(second.match.rejections) == 3
    assert all("is already part of IA3 site" in r.reason for r in second.match.rejections)
    assert counters["fxlora"]["ia3_again_rejected"] == 3 and counters["fxlora"]["ia3_kept"] == 3


def test_info_log_names_every_kind():
    import io

    model, batch = _model("ia3")
    stream = io.StringIO()
    fxlora.set_logs("info", stream)
    try:
        loss_and_grads(compiled(model), batch)
    finally:
        fxlora.set_logs(None)
    assert "3 IA3 sites, 3 rewritten, 0 rejected" in stream.getvalue(), stream.getvalue()
