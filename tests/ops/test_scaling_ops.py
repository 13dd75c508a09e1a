"""fxlora::ia3_linear and fxlora::vera_linear alone, every form, against the plain-autograd formula."""

import pytest
import torch

from fxlora.ops.ia3 import ia3_linear
from fxlora.ops.vera import vera_linear

TOL = dict(rtol=1e-5, atol=1e-5)
# Every form the cost model can choose (fxlora/kinds/*/forms.py), by name.
IA3_FORMS = {"ia3_out": ("act", "recompute", "weight"), "ia3_in": ("act", "weight")}
VERA_FORMS = ("act", "weight")


def _grads(y, tensors):
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(y, tensors, g)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind,form", [(k, f) for k, forms in IA3_FORMS.items() for f in forms])
def test_ia3_op_matches_autograd(kind, form, bias, conv1d):
    torch.manual_seed(0)
    i, o = 12, 10
    x = torch.randn(3, 5, i, requires_grad=True)
    W = torch.randn(o, i)
    b = torch.randn(o) if bias else None
    scale_input = kind == "ia3_in"
    l = torch.randn((1, i) if scale_input else (o, 1), requires_grad=True)
    if scale_input:
        ref = torch.nn.functional.linear(x * l.flatten(), W, b)
    else:
        ref = torch.nn.functional.linear(x, W, b) * l.flatten()
    weight = W.t().contiguous() if conv1d else W
    y, _ = ia3_linear(x, weight, b, l, scale_input, form, torch.float32, torch.float32, torch.float32, conv1d)
    torch.testing.assert_close(y, ref, **TOL)
    for got, want in zip(_grads(y, (x, l)), _grads(ref, (x, l))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("form", VERA_FORMS)
def test_vera_op_matches_autograd(form, bias):
    torch.manual_seed(0)
    i, o, r = 12, 10, 4
    x = torch.randn(3, 5, i, requires_grad=True)
    W, A, B = torch.randn(o, i), torch.randn(r, i), torch.randn(o, r)
    b = torch.randn(o) if bias else None
    ld, lb = torch.randn(r, requires_grad=True), torch.randn(o, requires_grad=True)
    ref = torch.nn.functional.linear(x, W, b) + lb * torch.nn.functional.linear(ld * torch.nn.functional.linear(x, A), B)
    y, u = vera_linear(x, W, b, A, B, ld, lb, form, torch.float32, torch.float32, False)
    torch.testing.assert_close(y, ref, **TOL)
    assert u.numel() == (3 * 5 * r if form == "act" else 0)  # act keeps x A^T (T x r), never T x out
    for got, want in zip(_grads(y, (x, ld, lb)), _grads(ref, (x, ld, lb))):
        torch.testing.assert_close(got, want, **TOL)


def test_ops_pass_opcheck():
    x = torch.randn(2, 3, 6, requires_grad=True)
    W, l = torch.randn(4, 6), torch.randn(4, 1, requires_grad=True)
    torch.library.opcheck(ia3_linear, (x, W, None, l, False, "weight", torch.float32, torch.float32, torch.float32, False))
    A, B = torch.randn(2, 6), torch.randn(4, 2)
    ld, lb = torch.randn(2, requires_grad=True), torch.randn(4, requires_grad=True)
    torch.library.opcheck(vera_linear, (x, W, None, A, B, ld, lb, "act", torch.float32, torch.float32, False))
