"""fxlora::dora_dropped_linear against autograd on PEFT's dense spelling, with the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxlora.ops.dora  # noqa: F401  (registers the op)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_sparse_mask_op_equals_the_dense_graph(conv1d, p):
    torch.manual_seed(0)
    T, I, O, r, s = 40, 24, 36, 4, 2.0
    x = torch.randn(2, T // 2, I, requires_grad=True)
    W, b = torch.randn(O, I), torch.randn(O)
    A, B = torch.randn(r, I, requires_grad=True), torch.randn(O, r, requires_grad=True)
    m = torch.randn(O, requires_grad=True)
    g = torch.randn(2, T // 2, O)

    def scale():
        return (m / W.norm(dim=1)).view(1, -1)

    torch.manual_seed(5)  # the op draws eager's mask: ATen dropout's bernoulli_, in the same order
    y, _z, bits = torch.ops.fxlora.dora_dropped_linear(x, W.t().contiguous() if conv1d else W, b, A, B,
                                                       torch.tensor(s), scale(), p, conv1d)
    got = (y, *torch.autograd.grad((y * g).sum(), (x, A, B, m)))
    torch.manual_seed(5)
    c, d = scale(), F.dropout(x, p, True)
    ref = F.linear(x, W, b) + (c - 1) * F.linear(d, W) + c * F.linear(F.linear(d, A), B) * s
    want = (ref, *torch.autograd.grad((ref * g).sum(), (x, A, B, m)))
    for name, a, e in zip(("y", "dx", "dA", "dB", "dm"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)
    assert bits.numel() == (x.numel() + 7) // 8  # the mask kept at 1 bit per element
