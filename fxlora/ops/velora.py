"""`fxlora::velora_linear`: a LoRA linear whose saved input is VeLoRA-compressed (lossy, opt-in).

    y = x W^T + b + s (x A^T) B^T                         exactly as `fxlora::lora_linear` forward 1

What backward needs of x is only dA = s (dY B)^T x (dB needs x A^T, dX needs no x at all).
VeLoRA (arXiv:2405.17991, Sec. 3): split every token of x (T x D) into D/M sub-tokens of size M,
project each on a fixed unit vector v (M,), and save only the projections

    z_p = group(x) v                  (T, D/M)        instead of x (T, D)

Backward rebuilds x_hat = group^-1(z_p v^T) and uses it for dA only:

    dA = s (dY B)^T x_hat   (approximate)     dB = s dY^T (x A^T)   (exact: x A^T, T x r, is saved)
    dX = dY W + s (dY B) A  (exact)

With A frozen there is nothing to compress (LoRA-FA saves x A^T instead of x, exact): the
rewrite uses `fxlora::lora_linear` there. Dropout sites are not compressed (left exact).
Like the exact op, backward is one opaque op so the partitioner cannot hoist x_hat into forward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fxlora.ops._common import NO_TENSOR, base_weight
from fxlora.ops.inline import inline_check, pure
from fxlora.ops.lora import fake_grads



def compress(x: Tensor, v: Tensor) -> Tensor:
    """z_p = group(x) v: (..., D) -> (..., D/M), M = v.numel()."""
    m = v.shape[0]
    return (x.unflatten(-1, (x.shape[-1] // m, m)) @ v.to(x.dtype))


def reconstruct(zp: Tensor, v: Tensor) -> Tensor:
    """x_hat = group^-1(z_p v^T): (..., D/M) -> (..., D)."""
    return (zp.unsqueeze(-1) * v.to(zp.dtype)).flatten(-2)


@torch.library.custom_op("fxlora::velora_linear", mutates_args=())
def velora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    v: Tensor,
    base_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    conv1d: bool,
    save_xa: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, z_p: (..., D/M), x A^T if save_xa (B trains) else empty)."""
    W = base_weight(weight, conv1d).to(base_dtype)
    A, B = lora_A.to(adapter_dtype), lora_B.to(adapter_dtype)
    s = scale.to(adapter_dtype)
    x_in = x.to(adapter_dtype)
    b = None if bias is None else bias.to(base_dtype)
    base = torch.nn.functional.linear(x.to(base_dtype), W, b)
    xa = torch.nn.functional.linear(x_in, A)
    if base_dtype == adapter_dtype:
        y = base.view(-1, base.shape[-1]).addmm_(xa.flatten(0, -2), (s * B).t()).view(base.shape)
    else:
        y = base + s * torch.nn.functional.linear(xa, B)
    zp = compress(x_in, v.to(adapter_dtype))
    return y, zp, xa if save_xa else x.new_empty(NO_TENSOR, dtype=adapter_dtype)


@velora_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, v, base_dtype, adapter_dtype, conv1d, save_xa):
    out_features = weight.shape[1] if conv1d else weight.shape[0]
    y = x.new_empty((*x.shape[:-1], out_features), dtype=torch.promote_types(base_dtype, adapter_dtype))
    zp = x.new_empty((*x.shape[:-1], x.shape[-1] // v.shape[0]), dtype=adapter_dtype)
    xa = x.new_empty((*x.shape[:-1], lora_A.shape[0]) if save_xa else NO_TENSOR, dtype=adapter_dtype)
    return y, zp, xa


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, v, base_dtype, adapter_dtype, conv1d, save_xa = inputs
    _y, zp, xa = output
    ctx.conf = (base_dtype, adapter_dtype, conv1d, x.dtype)
    ctx.has_bias = bias is not None
    # Saved: z_p (T x D/M) and x A^T (T x r); never x.
    ctx.save_for_backward(zp, xa if save_xa else None, weight, lora_A, lora_B, scale, v)


def _backward(ctx, dy, _dzp, _dxa):
    zp, xa, weight, lora_A, lora_B, scale, v = ctx.saved_tensors
    need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    needs = [need_x, need_b and ctx.has_bias, need_A, need_B and xa is not None]
    grads = velora_linear_backward(dy, zp, xa, weight, lora_A, lora_B, scale, v, *ctx.conf, needs)
    dX, db, dA, dB = (g if need else None for g, need in zip(grads, needs))
    return dX, None, db, dA, dB, None, None, None, None, None, None


@torch.library.custom_op("fxlora::velora_linear_backward", mutates_args=())
def velora_linear_backward(
    dy: Tensor,
    zp: Tensor,
    xa: Optional[Tensor],
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    v: Tensor,
    base_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    conv1d: bool,
    x_dtype: torch.dtype,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX, db, dA, dB); dA from the rebuilt x_hat, the rest exact; a gradient not in `needs` is empty."""
    need_x, need_b, need_A, need_B = needs
    A, B, s = lora_A.to(adapter_dtype), lora_B.to(adapter_dtype), scale.to(adapter_dtype)
    W = base_weight(weight, conv1d).to(base_dtype)
    x_shape = (*dy.shape[:-1], W.shape[1])
    dy_a = dy.to(adapter_dtype).flatten(0, -2)
    z1 = dy_a @ (s * B) if need_A or need_x else None  # s dY B: (T, r)
    dX, db, dA, dB = (dy.new_empty(NO_TENSOR) for _ in range(4))
    if need_A:
        x_hat = reconstruct(zp, v.to(adapter_dtype)).flatten(0, -2)
        dA = (z1.t() @ x_hat).to(lora_A.dtype)
    if need_B:
        dB = (s * (dy_a.t() @ xa.flatten(0, -2))).to(lora_B.dtype)
    if need_x:
        dy_b = dy.to(base_dtype)
        if base_dtype == adapter_dtype:
            dX = (dy_b.flatten(0, -2) @ W).addmm_(z1, A).view(x_shape)
        else:
            dX = dy_b @ W + (z1 @ A).view(x_shape)
        dX = dX.to(x_dtype)
    if need_b:
        db = dy.flatten(0, -2).sum(0)
    return dX, db, dA, dB


@velora_linear_backward.register_fake
def _(dy, zp, xa, weight, lora_A, lora_B, scale, v, base_dtype, adapter_dtype, conv1d, x_dtype, needs):
    return fake_grads(dy, weight, lora_A, lora_B, conv1d, x_dtype, needs)


velora_linear.register_autograd(_backward, setup_context=_setup_context)

inline_check("fxlora::velora_linear")(pure)
inline_check("fxlora::velora_linear_backward")(pure)
