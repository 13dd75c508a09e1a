"""fxlora::lora_linear alone against the autograd reference, every form."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fxlora.ops.lora import BACKWARD_FORMS, lora_linear, lora_linear_backward

FORMS = [(f, b) for f, b in itertools.product((1, 2), BACKWARD_FORMS)]


def _reference(x, W, bias, A, B, s, p, conv1d):
    d = F.dropout(x, p, True) if p else x
    base = x @ W + bias if conv1d else F.linear(x, W, bias)
    return base + F.linear(F.linear(d, A), B) * s


@pytest.mark.parametrize("forward, backward", FORMS)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("a_trainable", [True, False])
def test_every_form_matches_autograd(forward, backward, p, conv1d, a_trainable):
    if p and (forward == 2 or BACKWARD_FORMS[backward][2] == "merged"):
        pytest.skip("illegal with dropout; the cost model never picks it")
    gen = torch.Generator().manual_seed(0)
    i, o, r = 24, 20, 4
    x = torch.randn(3, 5, i, generator=gen, requires_grad=True)
    W = torch.randn(i, o, generator=gen) if conv1d else torch.randn(o, i, generator=gen)
    bias = torch.randn(o, generator=gen, requires_grad=True)
    A = torch.randn(r, i, generator=gen).requires_grad_(a_trainable)
    B = torch.randn(o, r, generator=gen, requires_grad=True)
    grad_out = torch.randn(3, 5, o, generator=gen)
    wrt = [t for t in (x, bias, A, B) if t.requires_grad]

    torch.manual_seed(7)
    ref = _reference(x, W, bias, A, B, 1.5, p, conv1d)
    ref_grads = torch.autograd.grad(ref, wrt, grad_out)
    torch.manual_seed(7)
    y, xa, rng = lora_linear(
        x, W, bias, A, B, torch.tensor(1.5), p, torch.float32, torch.float32, torch.float32,
        forward, backward, conv1d, not a_trainable,
    )
    got_grads = torch.autograd.grad(y, wrt, grad_out)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g, want in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-4)
    assert xa.numel() == (0 if a_trainable else 15 * r)
    assert (rng.numel() > 0) == (p > 0)


def test_dropout_replay_leaves_the_callers_rng_alone():
    x = torch.randn(4, 8, requires_grad=True)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    y, _, _ = lora_linear(x, torch.randn(8, 8), None, A, B, torch.tensor(1.0), 0.5, torch.float32,
                          torch.float32, torch.float32, 1, 1, False, False)
    torch.manual_seed(3)
    y.sum().backward()
    after_backward = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), after_backward)


def test_opcheck():
    x = torch.randn(2, 3, 8, requires_grad=True)
    args = (x, torch.randn(6, 8), torch.randn(6), torch.randn(2, 8, requires_grad=True),
            torch.randn(6, 2, requires_grad=True), torch.tensor(2.0), 0.0, torch.float32,
            torch.float32, torch.float32, 1, 5, False, False)
    torch.library.opcheck(lora_linear, args)


@pytest.mark.parametrize("needs", [[True, True, True, True], [True, False, False, True], [False, False, True, False]])
@pytest.mark.parametrize("backward", [1, 4])
def test_opcheck_backward(needs, backward):
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 8, generator=gen), torch.randn(6, 8, generator=gen),
            torch.randn(2, 8, generator=gen), torch.randn(6, 2, generator=gen), torch.tensor(2.0), None, None,
            0.0, torch.float32, torch.float32, torch.float32, backward, False, False, torch.float32, needs)
    torch.library.opcheck(lora_linear_backward, args)


def test_after_only_orders_the_draws():
    """`after` is a data dependency and nothing else: the result does not depend on it."""
    x = torch.randn(4, 8)
    args = (x, torch.randn(8, 8), None, torch.randn(2, 8), torch.randn(8, 2), torch.tensor(1.0), 0.5,
            torch.float32, torch.float32, torch.float32, 1, 1, False, False)
    torch.manual_seed(0)
    plain = lora_linear(*args)[0]
    torch.manual_seed(0)
    ordered = lora_linear(*args, after=torch.zeros(3))[0]
    assert torch.equal(plain, ordered)
