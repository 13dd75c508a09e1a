"""`fxlora::dora_dropped_linear`: one DoRA linear with PEFT's dropout, as a custom op.

With dropout PEFT applies the magnitude to the base on the *dropped* input (peft/tuners/lora/dora.py):

    y = x W^T + b + (c - 1) * (d W^T) + c * s (d A^T) B^T,   d = drop(x) = k x * keep,  k = 1 / (1 - p)

Written densely that is two GEMMs over the tokens forward and two for dX (the mask sits between
them). Only a fraction p of x is dropped, so with S = x * (1 - keep) (density p):

    d W^T = k (x W^T - S W^T)                      forward: x W^T once, S W^T sparse (CSR)
    keep * (H W) = H W - (1 - keep) * (H W)        backward: H W only at the dropped positions
                                                   (an SDDMM, `torch.sparse.sampled_addmm`)

so a step costs one dense GEMM each way plus sparse work in p: on this CPU (T 2048, i 512,
o 1376, p 0.05) the CSR product with its build costs 62% of the dense GEMM and the SDDMM 28%.
Every product is the same sum, associated differently: equal within float rounding.

Returns (y, z, the mask packed 1 bit per element); z = d W^T + s (d A^T) B^T is kept for the
magnitude's gradient (dc = sum_t dY * z). The mask is drawn here, as fxlora::lora_linear draws
it (eager's `bernoulli_`, or the fast generator under Inductor's rule), so this op is not used
where a forward is recomputed (checkpointed regions keep the traced dropout).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fxlora.ops._common import base_weight
from fxlora.ops.inline import inline_check
from fxlora.ops.lora import _draw_keep, _dy_b, _dyt_xa, _keep_scale, _pack_mask, _unpacked_keep


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("fxlora::dora_dropped_linear", mutates_args=())
def dora_dropped_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    mag_scale: Tensor,
    dropout_p: float,
    conv1d: bool,
    fast_rng: bool = False,
    after: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`after`: ordering only (the previous site's mask), never read. `mag_scale`: c = m / n, (1, out)."""
    W = base_weight(weight, conv1d)
    o = W.shape[0]
    keep = _draw_keep(x.shape, dropout_p, x.dtype, x.device, fast_rng)
    k = _keep_scale(dropout_p, x.dtype, x.device).item()
    x2, keep2 = _flat(x), _flat(keep)
    both = x2 @ torch.cat([W, lora_A]).t()  # [x W^T | x A^T] from one GEMM (N = out + r)
    base, xa = both[:, :o], both[:, o:]
    dropped = torch.where(keep2, 0, x2).to_sparse_csr()  # S = x * (1 - keep), density p
    z = torch.addmm(base, dropped, W.t().contiguous(), beta=k, alpha=-k)  # d W^T = k (x W^T - S W^T)
    xa = (xa - dropped @ lora_A.t()) * (scale * k).to(x.dtype)  # s (d A^T) = s k (x A^T - S A^T)
    z.addmm_(xa, lora_B.t())  # z = d W^T + s (d A^T) B^T
    c = mag_scale.reshape(1, -1)
    y = torch.addcmul(base, c - 1, z).addmm_(xa, lora_B.t())  # P + (c - 1) z + s (d A^T) B^T
    if bias is not None:
        y = y.add_(bias)
    out_shape = (*x.shape[:-1], o)
    return y.view(out_shape), z.view(out_shape), _pack_mask(keep)


@dora_dropped_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, mag_scale, dropout_p, conv1d, fast_rng=False, after=None):
    out = weight.shape[1] if conv1d else weight.shape[0]
    y = x.new_empty((*x.shape[:-1], out))
    return y, x.new_empty((*x.shape[:-1], out)), x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, mag_scale, p, conv1d, *_ = inputs
    _y, z, bits = output
    ctx.conf = (p, conv1d)
    ctx.has_bias = bias is not None
    ctx.n_inputs = len(inputs)
    # What backward keeps alive: x, z (for dc), the mask at 1 bit per element; parameters exist anyway.
    ctx.save_for_backward(x, weight, lora_A, lora_B, scale, mag_scale, z, bits)


def _backward(ctx, dy, _dz, _dbits):
    x, weight, lora_A, lora_B, scale, mag_scale, z, bits = ctx.saved_tensors
    need_x, _, need_b, need_A, need_B, _, need_c = ctx.needs_input_grad[:7]
    needs = [need_x, need_b and ctx.has_bias, need_A, need_B, need_c]
    grads = dora_dropped_linear_backward(dy, x, weight, lora_A, lora_B, scale, mag_scale, z, bits, *ctx.conf, needs)
    dX, db, dA, dB, dc = (g if need else None for g, need in zip(grads, needs))
    return (dX, None, db, dA, dB, None, dc) + (None,) * (ctx.n_inputs - 7)


@torch.library.custom_op("fxlora::dora_dropped_linear_backward", mutates_args=())
def dora_dropped_linear_backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: Tensor, mag_scale: Tensor,
    z: Tensor, bits: Tensor, dropout_p: float, conv1d: bool, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dX, db, dA, dB, dc (empty where not needed). With H = (c - 1) dY and G = c dY:
    dX = (dY + k H) W - k (1 - keep) * (H W) + k keep * (s (G B) A)   (one dense GEMM, one SDDMM;
    c and c - 1 scale the rows of W and B, not the tokens x out dY)
    dA = k s (G B)^T (x * keep),  dB = k s G^T ((x * keep) A^T),  dc = sum_t dY * z."""
    need_x, need_b, need_A, need_B, need_c = needs
    W = base_weight(weight, conv1d)
    k = _keep_scale(dropout_p, x.dtype, x.device).item()
    x2, dy2 = _flat(x), _flat(dy)
    keep = _unpacked_keep(bits, x2.shape)
    c = mag_scale.reshape(-1, 1)  # per output: scale W's and B's rows, never a tokens x out pass
    sk = scale.to(x.dtype) * k
    dX, db, dA, dB, dc = (x.new_empty((0,)) for _ in range(5))  # distinct: outputs may not alias
    xm = torch.where(keep, x2, 0) if (need_A or need_B) else None
    i = x2.shape[1]
    if need_x:  # [(dY + k H) W | k s (G B)] from one GEMM (N = in + r), H = (c - 1) dY, G = c dY
        both = dy2 @ torch.cat([W * (1 + k * (c - 1)), lora_B * c * sk], dim=1)
        dX, gb = both[:, :i], both[:, i:]
        dropped = (~keep).to(x.dtype).to_sparse_csr()
        at = torch.sparse.sampled_addmm(dropped, dy2, W * (c - 1), beta=0.0)  # H W at the dropped positions
        rows = torch.repeat_interleave(torch.arange(x2.shape[0], device=x.device), at.crow_indices().diff())
        dX.index_put_((rows, at.col_indices()), at.values() * -k, accumulate=True)
        dX.addcmul_(keep, gb @ lora_A)
        dX = dX.contiguous().view(x.shape)
    elif need_A:
        gb = _dy_b(dy2, lora_B * c * sk)  # k s (G B): (T, r)
    if need_A:
        dA = gb.t() @ xm
    if need_B:
        dB = _dyt_xa(dy2, xm @ lora_A.t()) * (c * sk)
    if need_c:
        dc = torch.linalg.vecdot(dy2, _flat(z), dim=0).view(mag_scale.shape).to(mag_scale.dtype)
    if need_b:
        db = dy2.sum(0)
    return dX, db, dA, dB, dc


@dora_dropped_linear_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, scale, mag_scale, z, bits, dropout_p, conv1d, needs):
    need_x, need_b, need_A, need_B, need_c = needs
    out = weight.shape[1] if conv1d else weight.shape[0]

    def maybe(need, shape, like):
        return like.new_empty(shape if need else (0,))

    return (maybe(need_x, x.shape, x), maybe(need_b, (out,), x), maybe(need_A, lora_A.shape, x),
            maybe(need_B, lora_B.shape, x), maybe(need_c, mag_scale.shape, x))


dora_dropped_linear.register_autograd(_backward, setup_context=_setup_context)


@inline_check("fxlora::dora_dropped_linear")
@inline_check("fxlora::dora_dropped_linear_backward")
def _(**_) -> str:
    return "its mask is drawn by the RNG and its dropped fraction runs as sparse products (CSR, SDDMM), which Inductor does not lower"
