"""fxlora::lora_group_linear against autograd on n separate LoRA linears reading one x."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxlora.ops.lora_group  # noqa: F401  (registers the op)


def _group(outs, ranks, i, dtype, biases=(), trainable_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(o, i, generator=g, dtype=dtype) for o in outs]
    b = [torch.randn(o, generator=g, dtype=dtype).requires_grad_(trainable_bias) if k in biases else None
         for k, o in enumerate(outs)]
    A = [torch.randn(r, i, generator=g, dtype=dtype).requires_grad_() for r in ranks]
    B = [torch.randn(o, r, generator=g, dtype=dtype).requires_grad_() for o, r in zip(outs, ranks)]
    s = [torch.tensor(0.5 + k, dtype=torch.float32) for k in range(len(outs))]
    return W, b, A, B, s


def _check(x, W, b, A, B, s, forms, merged, dtype, tol):
    wrt = [t for t in (x, *A, *B, *[v for v in b if v is not None]) if t.requires_grad]
    dys = [torch.randn(*x.shape[:-1], w.shape[0], dtype=dtype) for w in W]
    ref = [F.linear(x, w, v) + k.to(dtype) * F.linear(F.linear(x, a), bb) for w, v, a, bb, k in zip(W, b, A, B, s)]
    want = (*ref, *torch.autograd.grad(ref, wrt, dys))
    ys = torch.ops.fxlora.lora_group_linear(x, W, [v for v in b if v is not None], A, B, s, dtype, list(forms),
                                            list(merged), [False] * len(W), [v is not None for v in b])[:len(W)]
    got = (*ys, *torch.autograd.grad(ys, wrt, dys))
    for k, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, msg=f"output {k}", **tol)


@pytest.mark.parametrize("forms", [(1, 1, 1), (3, 3, 3), (2, 4, 3), (4, 1)])
@pytest.mark.parametrize("merged", [True, False, "mixed"])
def test_group_equals_separate_sites(forms, merged):
    n = len(forms)
    merged = [k % 2 == 0 for k in range(n)] if merged == "mixed" else [merged] * n
    W, b, A, B, s = _group([12, 8, 8][:n], [2, 3, 2][:n], 16, torch.float64, biases=(1,), trainable_bias=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    _check(x, W, b, A, B, s, forms, merged, torch.float64, dict(rtol=1e-10, atol=1e-10))


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 9), i=st.integers(1, 12), outs=st.lists(st.integers(1, 10), min_size=2, max_size=3),
       r=st.integers(1, 4), forms=st.lists(st.sampled_from([1, 2, 3, 4]), min_size=3, max_size=3),
       x_grad=st.booleans())
def test_group_fuzzed_shapes(tokens, i, outs, r, forms, x_grad):
    W, b, A, B, s = _group(outs, [r] * len(outs), i, torch.float32)
    x = torch.randn(tokens, i, requires_grad=x_grad)
    _check(x, W, b, A, B, s, forms[:len(outs)], [f % 2 == 0 for f in forms[:len(outs)]], torch.float32,
           dict(rtol=1e-4, atol=1e-4))


def test_bf16_group():
    W, b, A, B, s = _group([8, 8], [2, 2], 16, torch.bfloat16)
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    _check(x, W, b, A, B, s, (3, 1), (True, False), torch.bfloat16, dict(rtol=5e-2, atol=5e-2))


def test_opcheck():
    W, b, A, B, s = _group([8, 6], [2, 3], 16, torch.float32, biases=(0,))
    x = torch.randn(4, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.fxlora.lora_group_linear.default,
                          (x, W, [b[0]], A, B, s, torch.float32, [3, 1], [True, False], [False, False], [True, False]))
