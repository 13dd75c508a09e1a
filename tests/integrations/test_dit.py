"""A diffusers DiT with PEFT LoRA fine-tunes under backend="fxlora" exactly as in eager."""

import pytest
import torch

import fxlora

pytest.importorskip("diffusers")
from fxlora.testing.diffusion import diffusion_loss, dit_batch, tiny_dit, with_dit_lora  # noqa: E402
from tests.helpers import compiled  # noqa: E402


def _step(model, batch, noise):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # DiT's label embedding drops class labels at random in training (classifier-free guidance)
    loss = diffusion_loss(model, batch, noise)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_dit_lora_sites_rewritten_and_gradients_equal_eager():
    model = with_dit_lora(tiny_dit(hidden=64, layers=1, heads=4), r=4)
    batch = dit_batch(2, 16)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    loss_ref, g_ref = _step(model, batch, noise)
    fxlora.clear_reports()
    loss_got, g_got = _step(compiled(model), batch, noise)
    torch.testing.assert_close(loss_got, loss_ref, rtol=1e-5, atol=1e-6)
    assert g_ref.keys() == g_got.keys() and len(g_ref) == 12  # A and B of 6 adapters
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    report = fxlora.last_report()
    found = {s.module.split(".")[-1] if not s.module.endswith(".0") else "to_out.0" for s in report.sites}
    # q, k, v (one shared-input group), the output projection (whose input is a cast the base
    # reads too) and the feed-forward pair: all matched and rewritten.
    assert {"to_q", "to_k", "to_v", "to_out.0", "proj", "2"} <= found, str(report)
    assert not report.rejections, str(report)
    assert all(d.rewritten for g in report.graphs for d in g.decisions)
