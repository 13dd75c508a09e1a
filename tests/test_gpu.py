"""What can only be checked on a GPU: the ops on CUDA (every concatenated form, both dropout
generators), and a compiled step under Inductor + Triton against eager PEFT. Skipped without
CUDA; run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch
import torch.nn.functional as F

from fxlora.ops.lora import lora_linear
from tests.helpers import assert_same_step, loss_and_grads
from fxlora.testing.models import tiny_model, token_batch, with_lora

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("forward, backward", [(1, 1), (2, 5), (3, 9), (1, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_on_cuda_matches_autograd(forward, backward, dtype):
    dev = "cuda"
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randn(4, 64, 96, device=dev, dtype=dtype, generator=gen, requires_grad=True)
    W = torch.randn(80, 96, device=dev, dtype=dtype, generator=gen) * 0.1
    A = (torch.randn(8, 96, device=dev, dtype=dtype, generator=gen) * 0.1).requires_grad_()
    B = (torch.randn(80, 8, device=dev, dtype=dtype, generator=gen) * 0.1).requires_grad_()
    dy = torch.randn(4, 64, 80, device=dev, dtype=dtype, generator=gen)
    ref = F.linear(x, W) + F.linear(F.linear(x, A), B) * 2.0
    want = torch.autograd.grad(ref, (x, A, B), dy)
    y = lora_linear(x, W, None, A, B, torch.tensor(2.0, device=dev), 0.0, dtype, dtype, dtype,
                    forward, backward, False, False)[0]
    got = torch.autograd.grad(y, (x, A, B), dy)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, ref, **tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("fast_rng", [False, True])
def test_dropout_on_cuda_keeps_one_minus_p(fast_rng):
    from fxlora.ops.lora import _draw_keep

    keep = _draw_keep((1 << 20,), 0.1, torch.float32, torch.device("cuda"), fast_rng).double()
    assert abs(keep.mean().item() - 0.9) < 5 * (0.09 / (1 << 20)) ** 0.5


@pytest.mark.inductor
def test_compiled_step_on_cuda_is_exact():
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4).cuda()
    batch = {k: v.cuda() for k, v in token_batch(2, 32).items()}
    ref = loss_and_grads(model, batch)
    got = loss_and_grads(torch.compile(model, backend="fxlora"), batch)
    assert_same_step(ref, got, rtol=1e-4, atol=1e-5)


def test_hashed_masks_are_the_same_on_cpu_and_cuda():
    """Counter-based masks (integer arithmetic only): one seed, one mask, whatever the device or compiler."""
    from fxlora.ops.lora import hashed_keep

    seed = torch.tensor(2**50 + 7, dtype=torch.int64)
    cpu = hashed_keep(seed, (5, 333, 17), 0.1)
    assert torch.equal(hashed_keep(seed.cuda(), (5, 333, 17), 0.1).cpu(), cpu)
    compiled = torch.compile(lambda s: hashed_keep(s, (5, 333, 17), 0.1), fullgraph=True)
    assert torch.equal(compiled(seed.cuda()).cpu(), cpu)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_step_with_dropout_runs_inlined_under_cudagraphs(mode):
    """Every op body compiled (no host-side RNG state, no sync): CUDA graphs take the step; the step
    equals the same graph with eager op bodies (same seeds, same masks)."""
    import fxlora

    def run(**options):
        torch.manual_seed(0)
        model = with_lora(tiny_model("llama", layers=1), "llama", r=4, dropout=0.1).cuda()
        batch = {k: v.cuda() for k, v in token_batch(2, 32).items()}
        compiled = torch.compile(model, backend="fxlora", mode=mode, options=options)
        for _ in range(3):  # cudagraph trees record on a later call
            torch.manual_seed(1)
            out = loss_and_grads(compiled, batch)
        return out

    got = run()
    inlined = fxlora.last_report().graphs[-1].inlined
    assert inlined and not [o for r in inlined for o in r.opaque]
    torch._dynamo.reset()
    assert_same_step(run(inline_ops=False), got, rtol=1e-4, atol=1e-5)
