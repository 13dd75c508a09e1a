"""Adapter state changes between steps of one compiled model: two named adapters (one active),
`set_adapter` switching, `disable_adapter()`, merge/unmerge, freezing A mid-run. Each must
recompile (or hit the right cache entry) and equal eager PEFT: no stale rewrite."""

import pytest
import torch
from peft import LoraConfig

import fxlora
from fxlora.testing.models import randomize_lora_B, tiny_model, token_batch, with_lora
from tests.helpers import assert_same_step
from tests.robustness.common import FP32, compiled, step


def _two_adapters():
    model = with_lora(tiny_model("llama", hidden=32), "llama", r=4, targets="attention")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model, seed=5)
    return model


def _forward_equal(model, run, batch):
    with torch.no_grad():
        torch.testing.assert_close(run(**batch).loss, model(**batch).loss, **FP32)


def _trainable(model):
    return {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def test_set_adapter_disable_merge_and_back():
    model = _two_adapters()
    run = compiled(model)
    batch = token_batch(2, 8)
    fxlora.clear_reports()

    assert _trainable(model) == {"default"}
    assert_same_step(step(model, batch), step(run, batch), **FP32)
    assert len(fxlora.last_report().graphs[-1].sites) == 4

    model.set_adapter("second")  # other parameters, other sites (q, v only)
    assert _trainable(model) == {"second"}
    assert_same_step(step(model, batch), step(run, batch), **FP32)
    last = fxlora.last_report().graphs[-1]
    assert len(last.sites) == 2 and all(s.rank == 2 for s in last.sites)

    with model.disable_adapter():  # the base model only: no site, and nothing trainable runs
        _forward_equal(model, run, batch)
        assert not fxlora.last_report().graphs[-1].sites

    model.merge_adapter()  # W += s B A in place; PEFT then skips the branch
    _forward_equal(model, run, batch)
    assert not fxlora.last_report().graphs[-1].sites
    model.unmerge_adapter()

    model.set_adapter("default")
    assert_same_step(step(model, batch), step(run, batch), **FP32)
    assert len(fxlora.last_report().graphs[-1].sites) == 4


@pytest.mark.slow
def test_training_steps_across_switches_match_eager():
    """AdamW steps while switching adapters and disabling in between: same weights as eager."""
    results = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        model = _two_adapters()
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(params, lr=1e-2)
        run = compiled(model) if compile_it else model
        torch.manual_seed(3)
        for i, name in enumerate(["default", "second", "default", "second"]):
            model.set_adapter(name)
            batch = token_batch(2, 8, seed=i)
            run(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with model.disable_adapter(), torch.no_grad():
                run(**batch)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **FP32)


def test_freezing_A_mid_run_recompiles_into_the_frozen_A_form():
    """requires_grad changes between steps: Dynamo guards on it, fxlora recompiles and picks the
    frozen-A form (saves X A^T, no dA); the stale form (computing dA) is not reused."""
    model = with_lora(tiny_model("llama", hidden=32), "llama", r=4, targets="attention")
    run = compiled(model)
    batch = token_batch(2, 8)
    fxlora.clear_reports()
    assert_same_step(step(model, batch), step(run, batch), **FP32)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    ref, got = step(model, batch), step(run, batch)
    assert_same_step(ref, got, **FP32)
    assert not any("lora_A" in n for n in got[1])
    graphs = fxlora.last_report().graphs
    assert len({g.compile_id for g in graphs}) == 2
    assert all(s.a_trainable for s in graphs[0].sites) and not any(s.a_trainable for s in graphs[-1].sites)
    # and back: A trainable again uses the first compile's form and gets its gradient
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(True)
    ref, got = step(model, batch), step(run, batch)
    assert_same_step(ref, got, **FP32)
    assert any("lora_A" in n for n in got[1])


@pytest.mark.slow
def test_two_active_adapters_stacked_are_exact():
    model = _two_adapters()
    model.base_model.set_adapter(["default", "second"])
    batch = token_batch(2, 8)
    fxlora.clear_reports()
    assert_same_step(step(model, batch), step(compiled(model), batch), **FP32)
    decisions = fxlora.last_report().graphs[-1].decisions
    assert sum(d.rewritten for d in decisions) == 4
    assert all("stacked" in d.reason for d in decisions if not d.rewritten)
