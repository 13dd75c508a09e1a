"""Inference after training: eval() + generate() under inference_mode on a model compiled with fxlora."""

import torch

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_lora
from fxlora.inference import NO_BACKWARD_NOTE
from tests.helpers import loss_and_grads


def test_generate_after_training_matches_eager():
    model = with_lora(tiny_model("llama", layers=2), "llama", r=4)
    model.train()
    compiled = torch.compile(model, backend="fxlora", options={"inner": "aot_eager"})
    loss_and_grads(compiled, token_batch(2, 16))  # a training step's graphs first
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))  # trained adapters, not the initial ones
    model.eval()
    prompt = token_batch(1, 8)["input_ids"]
    with torch.inference_mode():
        expected = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        expected_logits = model(input_ids=prompt).logits
    fxlora.clear_reports()
    base = model.get_base_model()
    base.forward = torch.compile(base.forward, backend="fxlora", options={"inner": "aot_eager"})
    with torch.inference_mode():
        got = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        logits = model(input_ids=prompt).logits
    assert got.tolist() == expected.tolist()
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    graphs = fxlora.last_report().graphs
    with_sites = [g for g in graphs if g.sites]
    assert with_sites and all(NO_BACKWARD_NOTE in g.notes for g in with_sites)
    assert all(d.rewritten for g in with_sites for d in g.decisions)  # exact forms, chosen by FLOPs
    assert "saved for backward" not in str(fxlora.last_report())
