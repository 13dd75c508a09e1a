"""Shared test helpers: run a step, collect adapter gradients, compare."""

from __future__ import annotations

import torch


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward: the loss and every trainable parameter's gradient (then cleared)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = out.loss if hasattr(out, "loss") else out.float().pow(2).mean()
    loss.backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_step(ref, got, rtol=1e-5, atol=1e-6):
    (loss_ref, g_ref), (loss_got, g_got) = ref, got
    torch.testing.assert_close(loss_got, loss_ref, rtol=rtol, atol=atol)
    assert g_ref.keys() == g_got.keys()
    assert g_ref, "no trainable parameters: the comparison would prove nothing"
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
