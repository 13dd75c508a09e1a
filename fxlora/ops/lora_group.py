"""`fxlora::lora_group_linear`: the LoRA sites that read the same x (q/k/v, gate/up) as one op.

    y_k = x W_k^T + b_k + s_k (x A_k^T) B_k^T          k = 1..n, one x, no dropout

Each site keeps its own forward form (fxlora.ops.lora: 1..4) and its own dX bracketing
(merged W + s B A, or split), as the cost model chose them; what the group shares is every
GEMM whose other operand is the group's x or sums over the group:

    forward   X [A_k; ...]^T for the sites of forwards 1 and 4: one rank-R GEMM (R = sum r_k)
              where each site read x again (forward 3 keeps X A^T riding on its base GEMM)
    backward  D = sum_k dY_k [M_k | 0 .. s_k B_k .. 0]: every site's dX and s Z1_k = dY_k s_k B_k
              accumulate into one (T, i + R) buffer (M_k = W_k + s_k B_k A_k, or W_k for split
              sites, whose adapter terms then add as one GEMM [s Z1_split] [A_split]), so the
              graph's adds of the sites' dX disappear;
              dA_all = [s Z1_1 | ... | s Z1_n]^T X: one GEMM reads X once for every site's dA
              (it read X once per site); X A^T of forwards 1 and 2 is rebuilt by one GEMM.
    dB_k = s_k dY_k^T (X A_k^T) stays per site: each dY_k is its own.

So per group x is read by n base GEMMs (+1 shared down-projection) forward and 1 + (1 if a
site rebuilds X A^T) times backward, against n forward and n (or 2n) backward as single ops;
each dY_k is read twice (the dX/Z1 GEMM and dB), as before.

Dropout stays per-site (fxlora.ops.lora): PEFT draws one mask per site, so the masked inputs
differ and no GEMM over drop_k(x) can be shared.

Backward is its own opaque op, for the reason fxlora.ops.lora gives.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fxlora.ops._common import NO_TENSOR, base_weight
from fxlora.ops.inline import inline_check, pure
from fxlora.ops.lora import KEEPS_XA, _dy_b, _dyt_xa, strided_rows

SHARED_DOWN = (1, 4)  # forwards whose X A^T comes from the group's one down-projection GEMM
REBUILDS_XA = (1, 2)  # forwards that do not keep X A^T: backward rebuilds it (one GEMM for the group)


def _per_site(present: Sequence, has: Sequence[bool]) -> list:
    """`present` (one entry per True of `has`) spread over every site, None where `has` is False."""
    it = iter(present)
    return [next(it) if h else None for h in has]


def _offsets(sizes: Sequence[int]) -> list[int]:
    return list(itertools.accumulate(sizes, initial=0))[:-1]


def _columns(sites: Sequence[int], ranks: Sequence[int]) -> dict[int, int]:
    """Where each of `sites`' r_k columns start in a (T, sum r_k) block holding them side by side."""
    return dict(zip(sites, _offsets([ranks[k] for k in sites])))


def _operands(x: Tensor, weights, lora_As, lora_Bs, scales, conv1d, dtype: torch.dtype):
    """What forward and backward both read, in the compute dtype: x as (T, in), each W as (out, in),
    A, s and s B; with the ranks."""
    Ws = [base_weight(w, c).to(dtype) for w, c in zip(weights, conv1d)]
    As = [a.to(dtype) for a in lora_As]
    ss = [s.to(dtype) for s in scales]
    sBs = [s * b.to(dtype) for s, b in zip(ss, lora_Bs)]
    return x.to(dtype).flatten(0, -2), Ws, As, ss, sBs, [a.shape[0] for a in As]


@torch.library.custom_op("fxlora::lora_group_linear", mutates_args=())
def lora_group_linear(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scales: list[Tensor],
    dtype: torch.dtype,
    forward_forms: list[int],
    merged_dx: list[bool],
    conv1d: list[bool],
    has_bias: list[bool],
) -> list[Tensor]:
    """Returns [y_1, ..., y_n, X A^T of the sites of forwards 3 and 4 as one (T, R_kept) tensor].
    `biases` holds the biases of the sites with `has_bias` only (a list with a None in it would
    get no gradient through a custom op)."""
    lead, i = x.shape[:-1], x.shape[-1]
    x2, Ws, As, _, sBs, ranks = _operands(x, weights, lora_As, lora_Bs, scales, conv1d, dtype)
    bs = _per_site([b.to(dtype) for b in biases], has_bias)
    kept = [k for k, f in enumerate(forward_forms) if f in KEEPS_XA]
    kept_at = _columns(kept, ranks)
    xa_kept = x2.new_empty((x2.shape[0], sum(ranks[k] for k in kept)))
    down = [k for k, f in enumerate(forward_forms) if f in SHARED_DOWN]
    down_at = _columns(down, ranks)
    xa_down = x2 @ torch.cat([As[k] for k in down]).t() if down else None  # one GEMM over x
    ys = []
    for k, form in enumerate(forward_forms):
        W, A, sB, b, r = Ws[k], As[k], sBs[k], bs[k], ranks[k]
        o = W.shape[0]
        if form == 3:  # x [W + s B A; A]^T: y and X A^T from one GEMM (fxlora.ops.lora forward 3)
            cat = torch.empty((o + r, i), dtype=dtype, device=W.device)
            torch.addmm(W, sB, A, out=cat[:o])
            cat[o:].copy_(A)
            b_cat = None if b is None else torch.cat([b, b.new_zeros(r)])
            out = torch.nn.functional.linear(x2, cat, b_cat)
            y = out[:, :o]
            xa_kept[:, kept_at[k]:kept_at[k] + r].copy_(out[:, o:])
        elif form == 2:  # x (W + s B A)^T
            y = torch.nn.functional.linear(x2, torch.addmm(W, sB, A), b)
        else:  # x W^T + (X A^T)(s B)^T, X A^T from the shared down-projection
            xa = xa_down[:, down_at[k]:down_at[k] + r]
            y = torch.nn.functional.linear(x2, W, b).addmm_(xa, sB.t())
            if form in KEEPS_XA:
                xa_kept[:, kept_at[k]:kept_at[k] + r].copy_(xa)
        ys.append(y.view(*lead, o))
    return [*ys, xa_kept]


@lora_group_linear.register_fake
def _(x, weights, biases, lora_As, lora_Bs, scales, dtype, forward_forms, merged_dx, conv1d, has_bias):
    lead = x.shape[:-1]
    ys = []
    for w, a, form, c in zip(weights, lora_As, forward_forms, conv1d):
        o = w.shape[1] if c else w.shape[0]
        if form == 3:
            ys.append(strided_rows(x.new_empty(NO_TENSOR, dtype=dtype), lead, o, a.shape[0]))
        else:
            ys.append(x.new_empty((*lead, o), dtype=dtype))
    kept = sum(a.shape[0] for a, f in zip(lora_As, forward_forms) if f in KEEPS_XA)
    return [*ys, x.new_empty((math.prod(lead), kept), dtype=dtype)]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_As, lora_Bs, scales, dtype, forms, merged, conv1d, has_bias = inputs
    ctx.conf = (dtype, list(forms), list(merged), list(conv1d), x.dtype)
    ctx.n = len(weights)
    ctx.has_bias = list(has_bias)
    ctx.save_for_backward(x, output[-1], *weights, *lora_As, *lora_Bs, *scales)


def _backward(ctx, *grads):
    if len(grads) == 1 and isinstance(grads[0], (list, tuple)):
        grads = grads[0]
    x, xa_kept, *params = ctx.saved_tensors
    n = ctx.n
    weights, As, Bs, scales = (params[j * n:(j + 1) * n] for j in range(4))
    need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    need_b = _per_site(need_b, ctx.has_bias)
    needs = [bool(need_x)]
    for k in range(n):
        needs += [bool(need_b[k]), bool(need_A[k]), bool(need_B[k])]
    dys = [torch.zeros(y_shape, dtype=ctx.conf[0], device=x.device) if g is None else g
           for g, y_shape in zip(grads[:n], _out_shapes(x, weights, ctx.conf[3]))]
    out = lora_group_linear_backward(dys, x, xa_kept, list(weights), list(As), list(Bs), list(scales), *ctx.conf, needs)
    dX, rest = out[0], out[1:]
    pick = lambda j: [rest[3 * k + j] if needs[1 + 3 * k + j] else None for k in range(n)]  # noqa: E731
    db = [g for g, h in zip(pick(0), ctx.has_bias) if h]
    return (dX if needs[0] else None, [None] * n, db, pick(1), pick(2), [None] * n, None, None, None, None, None)


def _out_shapes(x: Tensor, weights, conv1d) -> list[tuple]:
    return [(*x.shape[:-1], w.shape[1] if c else w.shape[0]) for w, c in zip(weights, conv1d)]


@torch.library.custom_op("fxlora::lora_group_linear_backward", mutates_args=())
def lora_group_linear_backward(
    dys: list[Tensor],
    x: Tensor,
    xa_kept: Tensor,
    weights: list[Tensor],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scales: list[Tensor],
    dtype: torch.dtype,
    forward_forms: list[int],
    merged_dx: list[bool],
    conv1d: list[bool],
    x_dtype: torch.dtype,
    needs: list[bool],
) -> list[Tensor]:
    """[dX, then (db_k, dA_k, dB_k) per site]; a gradient not in `needs` (need_x, then
    (bias, A, B) per site) is empty."""
    n, i = len(weights), x.shape[-1]
    need_x = needs[0]
    need_b, need_A, need_B = needs[1::3], needs[2::3], needs[3::3]
    x2, Ws, As, ss, sBs, ranks = _operands(x, weights, lora_As, lora_Bs, scales, conv1d, dtype)
    T = x2.shape[0]
    dy2 = [dy.to(dtype).flatten(0, -2) for dy in dys]
    at = _offsets(ranks)
    R = sum(ranks)

    z1 = dX = None  # z1: (T, R), site k's s dY_k B_k in columns at[k]:at[k] + r_k
    if need_x:
        D = torch.empty((T, i + R), dtype=dtype, device=x.device)
        for k in range(n):
            C = Ws[0].new_zeros((Ws[k].shape[0], i + R))
            if merged_dx[k]:
                torch.addmm(Ws[k], sBs[k], As[k], out=C[:, :i])
            else:
                C[:, :i].copy_(Ws[k])
            C[:, i + at[k]:i + at[k] + ranks[k]].copy_(sBs[k])
            if k == 0:
                torch.mm(dy2[k], C, out=D)
            else:
                D.addmm_(dy2[k], C)
        z1 = D[:, i:]
        split = [k for k in range(n) if not merged_dx[k]]
        if split:  # the split sites' adapter terms: one GEMM [s Z1_split] [A_split]
            z1_split = z1 if len(split) == n else torch.cat([z1[:, at[k]:at[k] + ranks[k]] for k in split], 1)
            D[:, :i].addmm_(z1_split, torch.cat([As[k] for k in split]))
        dX = D[:, :i].view(*x.shape).to(x_dtype)  # in x's dtype: the strided view its fake describes
    elif any(need_A):
        z1 = torch.empty((T, R), dtype=dtype, device=x.device)
        for k in range(n):
            z1[:, at[k]:at[k] + ranks[k]].copy_(_dy_b(dy2[k], sBs[k]))

    dA_all = z1.t() @ x2 if any(need_A) else None  # every site's dA from one GEMM over X
    rebuilt = [k for k in range(n) if need_B[k] and forward_forms[k] in REBUILDS_XA]
    rebuilt_at = _columns(rebuilt, ranks)
    xa_rebuilt = x2 @ torch.cat([As[k] for k in rebuilt]).t() if rebuilt else None
    kept = [k for k in range(n) if forward_forms[k] in KEEPS_XA]
    kept_at = _columns(kept, ranks)

    out = [dX if dX is not None else x.new_empty(NO_TENSOR)]
    for k in range(n):
        r = ranks[k]
        db = dys[k].flatten(0, -2).sum(0) if need_b[k] else x.new_empty(NO_TENSOR)
        dA = dA_all[at[k]:at[k] + r].to(lora_As[k].dtype, copy=True) if need_A[k] else x.new_empty(NO_TENSOR)
        dB = x.new_empty(NO_TENSOR)
        if need_B[k]:
            xa = (xa_kept[:, kept_at[k]:kept_at[k] + r] if k in kept_at
                  else xa_rebuilt[:, rebuilt_at[k]:rebuilt_at[k] + r])
            dB = (ss[k] * _dyt_xa(dy2[k], xa)).to(lora_Bs[k].dtype)
        out += [db, dA, dB]
    return out


@lora_group_linear_backward.register_fake
def _(dys, x, xa_kept, weights, lora_As, lora_Bs, scales, dtype, forward_forms, merged_dx, conv1d, x_dtype, needs):
    R = sum(a.shape[0] for a in lora_As)
    if not needs[0]:
        out = [x.new_empty(NO_TENSOR)]
    elif x_dtype == dtype:  # dX comes out of D = (T, i + R)
        out = [strided_rows(x.new_empty(NO_TENSOR, dtype=x_dtype), x.shape[:-1], x.shape[-1], R)]
    else:
        out = [x.new_empty(x.shape, dtype=x_dtype)]
    for k, (dy, a, b) in enumerate(zip(dys, lora_As, lora_Bs)):
        nb, na, nB = needs[1 + 3 * k:4 + 3 * k]
        out += [dy.new_empty((dy.shape[-1],)) if nb else x.new_empty(NO_TENSOR),
                a.new_empty(a.shape) if na else x.new_empty(NO_TENSOR),
                b.new_empty(b.shape) if nB else x.new_empty(NO_TENSOR)]
    return out


lora_group_linear.register_autograd(_backward, setup_context=_setup_context)


inline_check("fxlora::lora_group_linear")(pure)  # no dropout, no state
inline_check("fxlora::lora_group_linear_backward")(pure)
