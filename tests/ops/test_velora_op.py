"""fxlora::velora_linear alone: shapes, saved bytes as the cost model predicts, gradients equal VeLoRA's formula."""

import pytest
import sympy
import torch
import torch.nn.functional as F

from fxlora.cost.core import I, O, R, T
from fxlora.kinds.lora import forms as cost
from fxlora.bench.run import SavedBytes
from fxlora.ops.velora import compress, reconstruct, velora_linear, velora_linear_backward


def _inputs(conv1d=False, a_trainable=True, b_trainable=True, m=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    i, o, r = 24, 20, 4
    x = torch.randn(3, 5, i, generator=gen, requires_grad=True)
    W = torch.randn(i, o, generator=gen) if conv1d else torch.randn(o, i, generator=gen)
    bias = torch.randn(o, generator=gen, requires_grad=True)
    A = torch.randn(r, i, generator=gen).requires_grad_(a_trainable)
    B = torch.randn(o, r, generator=gen).requires_grad_(b_trainable)
    v = F.normalize(torch.randn(m, generator=gen), dim=0)
    return x, W, bias, A, B, v


def test_compress_then_reconstruct_is_the_projection_on_v():
    x = torch.randn(2, 3, 12)
    v = F.normalize(torch.randn(4), dim=0)
    zp = compress(x, v)
    assert zp.shape == (2, 3, 3)
    sub = x.view(2, 3, 3, 4)
    want = ((sub @ v).unsqueeze(-1) * v).view(2, 3, 12)
    torch.testing.assert_close(reconstruct(zp, v), want)
    # A sub-token already on v survives exactly.
    on_v = (torch.randn(2, 3, 3, 1) * v).view(2, 3, 12)
    torch.testing.assert_close(reconstruct(compress(on_v, v), v), on_v)


@pytest.mark.parametrize("conv1d", [False, True])
def test_gradients_equal_the_velora_formula(conv1d):
    x, W, bias, A, B, v = _inputs(conv1d)
    s = 1.5
    gy = torch.randn(3, 5, 20)
    y, zp, xa = velora_linear(x, W, bias, A, B, torch.tensor(s), v, torch.float32, torch.float32, conv1d, True)
    base = x @ W + bias if conv1d else F.linear(x, W, bias)
    torch.testing.assert_close(y, base + s * F.linear(F.linear(x, A), B), rtol=1e-5, atol=1e-5)
    assert zp.shape == (3, 5, 24 // 4) and xa.shape == (3, 5, 4)
    dx, db, dA, dB = torch.autograd.grad(y, (x, bias, A, B), gy)
    # By hand: dA from x_hat = reconstruct(compress(x)), everything else exact.
    x_hat = reconstruct(compress(x.detach(), v), v)
    z1 = s * gy.flatten(0, 1) @ B.detach()
    torch.testing.assert_close(dA, z1.t() @ x_hat.flatten(0, 1), rtol=1e-5, atol=1e-5)
    # dX, db, dB stay exact: autograd on the plain formula.
    xr, Ar, Br, br = (t.detach().requires_grad_() for t in (x, A, B, bias))
    yr = (xr @ W + br if conv1d else F.linear(xr, W, br)) + s * F.linear(F.linear(xr, Ar), Br)
    dx_ref, db_ref, dB_ref = torch.autograd.grad(yr, (xr, br, Br), gy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db, db_ref)
    torch.testing.assert_close(dB, dB_ref, rtol=1e-5, atol=1e-4)


def test_with_m_equal_one_and_v_one_it_is_exact():
    """M = 1, v = [1]: every sub-token is a scalar on v, nothing is lost."""
    x, W, bias, A, B, _ = _inputs()
    v = torch.ones(1)
    gy = torch.randn(3, 5, 20)
    y, _, _ = velora_linear(x, W, bias, A, B, torch.tensor(2.0), v, torch.float32, torch.float32, False, True)
    dA = torch.autograd.grad(y, A, gy)[0]
    Ar = A.detach().requires_grad_()
    yr = F.linear(x, W, bias) + 2.0 * F.linear(F.linear(x, Ar), B)
    torch.testing.assert_close(dA, torch.autograd.grad(yr, Ar, gy)[0], rtol=1e-5, atol=1e-4)


def test_saved_bytes_are_what_the_cost_model_predicts():
    x, W, bias, A, B, v = _inputs(m=4)
    params = frozenset(t.untyped_storage().data_ptr() for t in (W, bias, A, B, v))
    counter = SavedBytes(params)
    with counter:
        y, _, _ = velora_linear(x, W, bias, A, B, torch.tensor(2.0), v, torch.float32, torch.float32, False, True)
    shape = cost.LoraShape(tokens=sympy.Integer(15), in_features=sympy.Integer(24), out_features=sympy.Integer(20),
                           rank=sympy.Integer(4), x_bytes=4, adapter_bytes=4)
    form = cost.velora_form(shape, 4)
    predicted = int(form.saved_bytes.subs({T: 15, I: 24, O: 20, R: 4}))
    scale_bytes = 4  # the 0-d scale tensor built here is not a parameter
    assert counter.activation_bytes - scale_bytes == predicted == 15 * (24 // 4) * 4 + 15 * 4 * 4
    assert predicted < int(cost.saved_bytes(shape, False).subs({T: 15, I: 24}))


def test_opcheck():
    x, W, bias, A, B, v = _inputs()
    torch.library.opcheck(velora_linear, (x, W, bias, A, B, torch.tensor(2.0), v, torch.float32, torch.float32, False, True))


@pytest.mark.parametrize("needs", [[True, True, True, True], [True, False, True, False], [False, False, False, True]])
def test_opcheck_backward(needs):
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 2, generator=gen), torch.randn(2, 3, 2, generator=gen),
            torch.randn(6, 8, generator=gen), torch.randn(2, 8, generator=gen), torch.randn(6, 2, generator=gen),
            torch.tensor(2.0), F.normalize(torch.randn(4, generator=gen), dim=0), torch.float32, torch.float32, False,
            torch.float32, needs)
    torch.library.opcheck(velora_linear_backward, args)
