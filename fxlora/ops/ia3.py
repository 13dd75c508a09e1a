"""`fxlora::ia3_linear`: one IA3 layer as a custom op, so fxlora decides what backward keeps.

    output scaling (attention-style targets):   y = (x W^T + b) * l          l: (out,)
    input scaling (PEFT feedforward_modules):   y = (x * l) W^T + b          l: (in,)

Forms (the weight-based ones are "Activations are not cheap in LoRA, weights are", Table 1, row (IA)^3):
    out/act        forward as PEFT; saves h = x W^T + b (T x out) for dl = sum_t dy * h
    out/recompute  forward as PEFT; saves x (T x in), rebuilds h in backward (one base GEMM)
    out/weight     y = x (diag(l) W)^T + b * l; saves x; dl = rowsum(dW' * W) + b * sum_t dy,
                   dW' = dy^T x (one base-size GEMM); diag(l) W is rebuilt, never kept
    in/act         forward as PEFT; saves x for dl = sum_t x * (dy W)
    in/weight      y = x (W diag(l))^T + b; saves x; dl = colsum(dW' * W)
x is often shared (k and v read one normed hidden state), so the x-saving forms cost the
saved x once per group; the cost model (fxlora/kinds/ia3/forms.py) prices that.

Backward is one opaque op, as for `fxlora::lora_linear`: traced as ATen ops its tangent-free
parts (diag(l) W, the recomputed h) would be hoisted into forward by the partitioner and saved.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fxlora.ops._common import NO_TENSOR, base_weight
from fxlora.ops.inline import inline_check, pure

def _saves_h(scale_input: bool, form: str) -> bool:
    return not scale_input and form == "act"


@torch.library.custom_op("fxlora::ia3_linear", mutates_args=())
def ia3_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    l: Tensor,
    scale_input: bool,
    form: str,
    compute_dtype: torch.dtype,
    vector_dtype: torch.dtype,
    out_dtype: torch.dtype,
    conv1d: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (y, h if the form saves it else empty). `l` is the parameter as stored ((out, 1) or (1, in))."""
    cd = compute_dtype
    W = base_weight(weight, conv1d).to(cd)
    b = None if bias is None else bias.to(cd)
    lv = l.reshape(-1).to(vector_dtype)
    h = x.new_empty(NO_TENSOR, dtype=cd)
    if scale_input:
        if form == "weight":
            y = torch.nn.functional.linear(x.to(cd), W * lv.to(cd), b)
        else:  # PEFT: (x.to(l dtype) * l).to(W dtype), then the layer
            xs = (x.to(vector_dtype) * lv).to(weight.dtype)
            y = torch.nn.functional.linear(xs.to(cd), W, b)
    elif form == "weight":
        y = torch.nn.functional.linear(x.to(cd), W * lv.to(cd)[:, None], None if b is None else b * lv.to(cd))
    else:
        base = torch.nn.functional.linear(x.to(cd), W, b)
        y = base * lv
        if form == "act":
            h = base
    return y.to(out_dtype), h


@ia3_linear.register_fake
def _(x, weight, bias, l, scale_input, form, compute_dtype, vector_dtype, out_dtype, conv1d):
    out_features = weight.shape[1] if conv1d else weight.shape[0]
    y = x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)
    h_shape = (*x.shape[:-1], out_features) if _saves_h(scale_input, form) else NO_TENSOR
    return y, x.new_empty(h_shape, dtype=compute_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, l, scale_input, form, cd, vd, _out, conv1d = inputs
    _y, h = output
    ctx.conf = (scale_input, form, cd, vd, conv1d, x.dtype)
    ctx.has_bias = bias is not None
    keep_h = _saves_h(scale_input, form)
    # What backward keeps alive: h (act, output scaling) or x (every other form), and parameters.
    ctx.save_for_backward(None if keep_h else x, h if keep_h else None, weight, bias, l)


def _backward(ctx, dy, _dh):
    x, h, weight, bias, l = ctx.saved_tensors
    need_x, _, need_b, need_l = ctx.needs_input_grad[:4]
    needs = [need_x, need_b and ctx.has_bias, need_l]
    dx, db, dl = ia3_linear_backward(dy, x, h, weight, bias, l, *ctx.conf, needs)
    dx, db, dl = (g if need else None for g, need in zip((dx, db, dl), needs))
    return dx, None, db, dl, None, None, None, None, None, None


@torch.library.custom_op("fxlora::ia3_linear_backward", mutates_args=())
def ia3_linear_backward(
    dy: Tensor,
    x: Optional[Tensor],
    h: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    l: Tensor,
    scale_input: bool,
    form: str,
    compute_dtype: torch.dtype,
    vector_dtype: torch.dtype,
    conv1d: bool,
    x_dtype: torch.dtype,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, db, dl); a gradient not in `needs` is empty."""
    need_x, need_b, need_l = needs
    cd = compute_dtype
    W = base_weight(weight, conv1d).to(cd)
    lv = l.reshape(-1).to(vector_dtype)
    x_shape = (*dy.shape[:-1], W.shape[1])
    dy2 = dy.flatten(0, -2)  # (T, out)
    x2 = None if x is None else x.flatten(0, -2)
    dx, db, dl = (dy.new_empty(NO_TENSOR) for _ in range(3))
    if scale_input:
        if form == "weight":
            if need_x:
                dx = (dy2.to(cd) @ (W * lv.to(cd))).view(x_shape).to(x_dtype)
            if need_l:
                dl = ((dy2.to(cd).t() @ x2.to(cd)) * W).sum(0)
        else:
            g = (dy2.to(cd) @ W).to(vector_dtype)  # gradient of x * l
            if need_l:
                dl = (x2.to(vector_dtype) * g).sum(0)
            if need_x:
                dx = (g * lv).view(x_shape).to(x_dtype)
        if need_b:
            db = dy2.sum(0).to(bias.dtype)
    else:
        if form == "weight":
            dyc = dy2.to(cd)
            if need_x:
                dx = (dyc @ (W * lv.to(cd)[:, None])).view(x_shape).to(x_dtype)
            if need_l:
                dl = ((dyc.t() @ x2.to(cd)) * W).sum(1)  # rowsum(dW' * W)
                if bias is not None:
                    dl = dl + bias.to(cd) * dyc.sum(0)
            if need_b:
                db = (dyc.sum(0) * lv.to(cd)).to(bias.dtype)
        else:
            if need_l:
                if h is None:  # recompute: one base GEMM instead of a saved T x out product
                    h = torch.nn.functional.linear(x2.to(cd), W, None if bias is None else bias.to(cd))
                dl = (dy2 * h.flatten(0, -2)).sum(0)
            dh = (dy2 * lv).to(cd)
            if need_x:
                dx = (dh @ W).view(x_shape).to(x_dtype)
            if need_b:
                db = dh.sum(0).to(bias.dtype)
    if need_l:
        dl = dl.to(l.dtype).reshape(l.shape)
    return dx, db, dl


@ia3_linear_backward.register_fake
def _(dy, x, h, weight, bias, l, scale_input, form, compute_dtype, vector_dtype, conv1d, x_dtype, needs):
    need_x, need_b, need_l = needs
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    dx = dy.new_empty((*dy.shape[:-1], in_features), dtype=x_dtype) if need_x else dy.new_empty(NO_TENSOR)
    db = bias.new_empty(bias.shape) if need_b else dy.new_empty(NO_TENSOR)
    dl = l.new_empty(l.shape) if need_l else dy.new_empty(NO_TENSOR)
    return dx, db, dl


ia3_linear.register_autograd(_backward, setup_context=_setup_context)

inline_check("fxlora::ia3_linear")(pure)
inline_check("fxlora::ia3_linear_backward")(pure)
