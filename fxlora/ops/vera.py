"""`fxlora::vera_linear`: one VeRA layer as a custom op.

    y = x W^T + b + lambda_b * ((lambda_d * (x A^T)) B^T)
    A: (r, in), B: (out, r): slices of frozen random matrices shared by every layer;
    lambda_d: (r,), lambda_b: (out,): trainable.

Forms (weight-based: "Activations are not cheap in LoRA, weights are", Table 1, row VeRA):
    act     forward as PEFT; saves u = x A^T (T x r) only -- PEFT's autograd also keeps
            B(lambda_d u) (T x out) for d lambda_b; backward rebuilds it (2 T r out FLOPs)
    weight  y = x (W + diag(lambda_b) B diag(lambda_d) A)^T + b; saves x (T x in);
            backward rebuilds u = x A^T and Q = dy^T u (out x r), then
            d lambda_b = rowsum(Q * B * lambda_d), d lambda_d = colsum(lambda_b * Q * B):
            no out x in gradient GEMM. The merged weight is transient, never saved.
A and B are buffers: nothing of them is saved beyond the storage that exists anyway.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fxlora.ops._common import NO_TENSOR, base_weight
from fxlora.ops.inline import inline_check, pure


def _delta(A: Tensor, B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    return (lambda_b[:, None] * B) @ (lambda_d[:, None] * A)  # (out, in)


@torch.library.custom_op("fxlora::vera_linear", mutates_args=())
def vera_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    form: str,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    conv1d: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (y, u = x A^T if the form saves it else empty)."""
    cd = compute_dtype
    W = base_weight(weight, conv1d).to(cd)
    b = None if bias is None else bias.to(cd)
    xc = x.to(cd)
    if form == "weight":
        merged = W + _delta(A.to(cd), B.to(cd), lambda_d.to(cd), lambda_b.to(cd))
        return torch.nn.functional.linear(xc, merged, b).to(out_dtype), x.new_empty(NO_TENSOR, dtype=cd)
    u = torch.nn.functional.linear(xc, A.to(cd))
    v = torch.nn.functional.linear((lambda_d * u).to(cd), B.to(cd))
    y = torch.nn.functional.linear(xc, W, b) + lambda_b * v
    return y.to(out_dtype), u


@vera_linear.register_fake
def _(x, weight, bias, A, B, lambda_d, lambda_b, form, compute_dtype, out_dtype, conv1d):
    out_features = weight.shape[1] if conv1d else weight.shape[0]
    y = x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)
    u_shape = (*x.shape[:-1], A.shape[0]) if form == "act" else NO_TENSOR
    return y, x.new_empty(u_shape, dtype=compute_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, form, cd, _out, conv1d = inputs
    _y, u = output
    ctx.conf = (form, cd, conv1d, x.dtype)
    ctx.has_bias = bias is not None
    act = form == "act"
    ctx.save_for_backward(None if act else x, u if act else None, weight, bias, A, B, lambda_d, lambda_b)


def _backward(ctx, dy, _du):
    x, u, weight, bias, A, B, lambda_d, lambda_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[2] and ctx.has_bias, need[5], need[6]]
    grads = vera_linear_backward(dy, x, u, weight, bias, A, B, lambda_d, lambda_b, *ctx.conf, needs)
    dx, db, dd, dbb = (g if n else None for g, n in zip(grads, needs))
    return dx, None, db, None, None, dd, dbb, None, None, None, None


@torch.library.custom_op("fxlora::vera_linear_backward", mutates_args=())
def vera_linear_backward(
    dy: Tensor,
    x: Optional[Tensor],
    u: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    form: str,
    compute_dtype: torch.dtype,
    conv1d: bool,
    x_dtype: torch.dtype,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, db, d lambda_d, d lambda_b); a gradient not in `needs` is empty."""
    need_x, need_b, need_d, need_bb = needs
    cd = compute_dtype
    W, Ac, Bc = base_weight(weight, conv1d).to(cd), A.to(cd), B.to(cd)
    x_shape = (*dy.shape[:-1], W.shape[1])
    dy2 = dy.flatten(0, -2)
    dx, db, dd, dbb = (dy.new_empty(NO_TENSOR) for _ in range(4))
    if form == "weight":
        dyc = dy2.to(cd)
        if need_d or need_bb:
            q = dyc.t() @ (x.flatten(0, -2).to(cd) @ Ac.t())  # (out, r) = dy^T (x A^T)
            if need_bb:
                dbb = (q * Bc * lambda_d.to(cd)).sum(1)
            if need_d:
                dd = (q * Bc * lambda_b.to(cd)[:, None]).sum(0)
        if need_x:
            merged = W + _delta(Ac, Bc, lambda_d.to(cd), lambda_b.to(cd))
            dx = (dyc @ merged).view(x_shape).to(x_dtype)
    else:
        u2 = u.flatten(0, -2)
        if need_bb:
            v = (lambda_d * u2).to(cd) @ Bc.t()
            dbb = (dy2 * v).sum(0)
        dm = (dy2 * lambda_b).to(cd) @ Bc  # gradient of lambda_d * u, (T, r)
        if need_d:
            dd = (dm * u2).sum(0)
        if need_x:
            dx = (dy2.to(cd) @ W + (dm * lambda_d).to(cd) @ Ac).view(x_shape).to(x_dtype)
    if need_b:
        db = dy2.sum(0).to(bias.dtype)
    if need_d:
        dd = dd.to(lambda_d.dtype)
    if need_bb:
        dbb = dbb.to(lambda_b.dtype)
    return dx, db, dd, dbb


@vera_linear_backward.register_fake
def _(dy, x, u, weight, bias, A, B, lambda_d, lambda_b, form, compute_dtype, conv1d, x_dtype, needs):
    need_x, need_b, need_d, need_bb = needs
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    empty = lambda: dy.new_empty(NO_TENSOR)  # noqa: E731
    dx = dy.new_empty((*dy.shape[:-1], in_features), dtype=x_dtype) if need_x else empty()
    db = bias.new_empty(bias.shape) if need_b else empty()
    dd = lambda_d.new_empty(lambda_d.shape) if need_d else empty()
    dbb = lambda_b.new_empty(lambda_b.shape) if need_bb else empty()
    return dx, db, dd, dbb


vera_linear.register_autograd(_backward, setup_context=_setup_context)

inline_check("fxlora::vera_linear")(pure)
inline_check("fxlora::vera_linear_backward")(pure)
