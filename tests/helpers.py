"""Shared test helpers: run a step, collect adapter gradients, compare."""

from __future__ import annotations

import torch

# Tolerances per dtype (loss and every gradient; docs/robustness.md explains them).
FP32 = dict(rtol=1e-4, atol=1e-5)
# bf16: both sides round GEMM inputs/outputs to bf16, in different orders (the op fuses
# base + s*BA, PEFT adds after a cast); a few bf16 ulps on gradients of a 1-layer model.
BF16 = dict(rtol=5e-2, atol=5e-3)
# fp16 has 3 more mantissa bits than bf16 but a narrow range; the tiny models stay in range.
FP16 = dict(rtol=1e-2, atol=2e-3)


def compiled(model, **options):
    """`model` under backend="fxlora", its rewritten graphs run by aot_eager (no Inductor codegen: fast)."""
    return torch.compile(model, backend="fxlora", options={"inner": "aot_eager", **options})


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


def step(model, batch, seed=1):
    """One forward/backward from a fixed RNG state, so dropout draws the same masks on both sides."""
    torch.manual_seed(seed)
    return loss_and_grads(model, batch)


def assert_same_step(ref, got, rtol=1e-5, atol=1e-6):
    (loss_ref, g_ref), (loss_got, g_got) = ref, got
    torch.testing.assert_close(loss_got, loss_ref, rtol=rtol, atol=atol)
    assert g_ref.keys() == g_got.keys()
    assert g_ref, "no trainable parameters: the comparison would prove nothing"
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def dynamo_graph(model, *args):
    """The one Dynamo graph of `model(*args)` and the inputs it was called with (run eagerly)."""
    seen = []

    def capture(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture)(*args)
    (gm, inputs), = seen
    return gm, inputs
