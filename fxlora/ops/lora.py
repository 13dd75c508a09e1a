"""`fxlora::lora_linear`: one LoRA linear as a custom op, so fxlora (not autograd) decides
what is saved for backward and in which order the GEMMs run.

    y = x W^T + b + s * (drop(x) A^T) B^T          W: (out, in), A: (r, in), B: (out, r)

Forward forms (RunLoRA, "Run LoRA Run: Faster and Lighter LoRA Implementations", arXiv:2312.03415, Sec. 3 / Table 1; weight-based form: "Activations are not cheap in LoRA, weights are", Table 1):
    1: x W^T + s (x A^T) B^T                  2: x (W + s B A)^T
    3: x [W + s B A; A]^T: y and X A^T from one GEMM (N = out + r), X A^T kept for dB
       (T r bytes more than X alone), so backward rebuilds nothing.
    4: forward 1, keeping the X A^T it computed anyway (T r bytes) instead of rebuilding it.
Backward forms are RunLoRA's eight bracketings of dA, dB, dX (Table 1); in PEFT's
layout (A: r x in, B: out x r), with Z1 = dY B and Z2 = dY^T X (out x in):
    dA: "z1"   s Z1^T X            | "xtdy" s B^T Z2
    dB: "xa"   s dY^T (X A^T)      | "xtdy" s Z2 A^T
    dX: "split" dY W + s (Z1 A)    | "merged" dY (W + s B A)
fxlora adds two dX bracketings that read dY once for dX and Z1 (backward 9 and 10):
    "merged_cat" dY [W + s B A | s B] -> dX and s Z1 in one GEMM (N = in + r)
    "split_cat"  dY [W | s B], then dX += (s Z1 A)(mask): legal with dropout
With forward 3 and backward 9 the rank-r work left is dA = (s Z1)^T X and dB = s dY^T (X A^T).
Outputs that come out of a concatenated GEMM (y of forward 3, dX of backward 9) are views
with row stride out + r (in + r), as their fake says: slicing them out would copy them.
Forwards 1 and 2 do not save X A^T (RunLoRA): backward rebuilds it (2 T r in FLOPs), unless A
is frozen, where X A^T (T x r) is saved *instead of* X (T x in) (LoRA-FA, arXiv:2308.03303: exact).

Dropout never keeps a full-size `dropout(x)`. Its mask is either replayed (the op returns
the RNG state it drew from and backward draws again: no bytes, one more draw) or kept
packed, 1 bit per element (T*i/8 bytes, 1/32 of an fp32 x: no second draw); the cost
model picks. Masks come from one of two generators, following Inductor's own rule for
randomness (`torch._inductor.config.fallback_random`):
  eager: `bernoulli_` exactly as ATen's dropout draws it, so masks equal eager PEFT's;
  fast:  16 random bits per element, a quarter of a full-range int64 `random_` draw, kept where
         below round((1-p) 2^16): Bernoulli(1-p') with |p' - p| <= 2^-17 (within 0.1% of p for
         p >= 0.0076; a smaller p takes 31 bits per element, p to 2^-31), ~5x the speed on
         this CPU, but not eager's masks, as Inductor's own dropout is not.
Under a scheduler free to reorder independent ops (Inductor runs q/k/v's ops in any order),
each dropout site takes the previous one's mask record as `after`, so masks are drawn in
program order, as eager draws them.

Rank-r GEMMs are laid out with r as the rows of the result: on this CPU's BLAS
`(B^T dY^T)^T` is 3x faster than `dY B`, and `(XA^T)^T dY` 4x faster than `dY^T (XA^T)`
(T=2048, i=o=512, r=8; docs/results.md).

Backward is one opaque op too: traced as separate ATen ops, its tangent-free parts (the
merged weight, X A^T, the replayed mask) would be hoisted into forward by the partitioner
and saved, which is exactly what the forms are chosen to avoid.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fxlora.ops._common import NO_TENSOR, base_weight
from fxlora.ops.inline import inline_check

FORWARD_FORMS = (1, 2, 3, 4)
MERGED_FORWARD = (2, 3)  # forwards that build W + s B A
KEEPS_XA = (3, 4)  # forwards that keep X A^T for backward beside X
# RunLoRA backward k -> (dA bracketing, dB bracketing, dX bracketing)
BACKWARD_FORMS = {
    1: ("z1", "xa", "split"),
    2: ("z1", "xtdy", "split"),
    3: ("xtdy", "xtdy", "split"),
    4: ("xtdy", "xtdy", "merged"),
    5: ("z1", "xa", "merged"),
    6: ("xtdy", "xa", "split"),
    7: ("xtdy", "xa", "merged"),
    8: ("z1", "xtdy", "merged"),
    9: ("z1", "xa", "merged_cat"),
    10: ("z1", "xa", "split_cat"),
}
MERGED_DX = ("merged", "merged_cat")  # dX bracketings that build W + s B A


def strided_rows(t: Tensor, lead: Sequence, width: int, extra: int) -> Tensor:
    """A (lead..., width) view of a new (T, width + extra) buffer: how forward 3's y and
    backward 9's dX come out of their concatenated GEMM (the fakes use it too)."""
    return t.new_empty((math.prod(lead), width + extra))[:, :width].view(*lead, width)


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _keep_threshold(p: float, bits: int = 31) -> int:
    return min(round((1 - p) * 2**bits), 2**bits - 1)


SIXTEEN_BITS_FROM = 2**-17 / 1e-3  # p from which 16 random bits per element put p' within 0.1% of p


def _seeded(seed: Tensor, device) -> torch.Generator:
    """A private generator from a seed the graph drew (a checkpointed region's recompute reads the
    same seed, so it draws the same mask; the caller's RNG is never touched)."""
    return torch.Generator(device=device).manual_seed(int(seed.reshape(-1).view(torch.int64)[0]))


def _draw_keep(shape, p: float, dtype: torch.dtype, device, fast: bool,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Which elements dropout keeps (bool), keep ~ Bernoulli(1 - p).

    eager (`fast=False`): drawn exactly as ATen's dropout draws it (`bernoulli_` on a tensor of
    x's dtype), so the mask equals eager's. fast: the seedless generator (DoRA's sparse-mask op,
    the timing's stand-in; a graph-drawn seed's masks are `hashed_keep`'s): 16 uniform bits per
    element (a quarter of a full-range int64 `random_`, read as int16), kept below
    round((1-p) 2^16); for p under SIXTEEN_BITS_FROM, 31 bits (half an int64 word)."""
    if not fast:
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p, generator=generator) != 0
    n = math.prod(shape)
    if p >= SIXTEEN_BITS_FROM:  # signed int16 b keeps where b + 2^15 < threshold
        words = torch.empty(((n + 3) // 4,), dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
        return torch.lt(words.view(torch.int16)[:n], _keep_threshold(p, 16) - 2**15).view(shape)
    words = torch.empty(((n + 1) // 2,), dtype=torch.int64, device=device).random_(generator=generator)
    bits = words.view(torch.int32)[:n].bitwise_and_(0x7FFFFFFF)
    return torch.lt(bits, _keep_threshold(p)).view(shape)


_LOW32 = 0xFFFFFFFF
_WEYL = 0x61C88647  # 2^32 - round(2^32 / golden ratio): odd and below 2^31 (index * _WEYL stays in int64)


def _mix32(h: Tensor) -> Tensor:
    """A bijection of 32-bit values held in int64 (the shift-multiply rounds of Wellons' hash-prospector
    integer hashes, with odd multipliers below 2^31 so no product leaves int64: no overflow on any backend)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _LOW32
    h = h ^ (h >> 15)
    h = (h * 0x31848BAB) & _LOW32
    return h ^ (h >> 16)


def hashed_keep(seed: Tensor, shape: Sequence, p: float) -> Tensor:
    """Dropout's keep mask as a counter-based hash of (seed, element index): keep where the low 31 bits
    of mix((index * w + seed_lo) mod 2^32 ^ seed_hi) fall below round((1 - p) 2^31), so p' is p to 2^-31
    (a Weyl step w = 2^32 / golden ratio, as splitmix's, spreads consecutive indices before the mix).

    A pure function of a 0-d int64 seed the graph drew: backward (or a checkpointed region's recompute)
    replays the mask from the seed's 8 bytes, no RNG state crosses to the host, Inductor fuses the hash
    into the kernel that reads x, and CPU and CUDA draw the same mask (integer arithmetic only). One mixing
    round after the Weyl step: each op is generated again wherever Inductor inlines the mask (two rounds
    doubled the first compile on this CPU). Masks of independent random seeds (the graph draws 62 random
    bits per site and step) are independent; nearby seeds (s, s + 1) are not, and the graph never draws
    them on purpose. The counter wraps at 2^32 elements per tensor."""
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=seed.device)
    s = seed.reshape(())
    h = _mix32(((index * _WEYL + (s & _LOW32)) & _LOW32) ^ ((s >> 32) & _LOW32))
    return ((h & 0x7FFFFFFF) < _keep_threshold(p)).view(shape)


def _seeded_keep(seed: Tensor, shape, p: float, dtype: torch.dtype, device, fast: bool) -> Tensor:
    """The mask a graph-drawn seed stands for: hashed from it (fast), or eager's drawn from a generator seeded with it."""
    return hashed_keep(seed, shape, p) if fast else _draw_keep(shape, p, dtype, device, False, _seeded(seed, device))


def _keep_scale(p: float, dtype: torch.dtype, device) -> Tensor:
    """1 / (1 - p) as ATen's dropout computes it (`noise.div_(1 - p)` on a kept 1.0)."""
    return torch.ones((), dtype=dtype, device=device).div_(1 - p)


_BYTE_TO_BIT = 0x0102040810204080  # (8 bytes of 0/1) * this >> 56 = the 8 bits, byte k at bit k


def _pack_mask(keep: Tensor) -> Tensor:
    """The mask as 1 bit per element (uint8, ceil(n / 8) bytes), in two passes over n/8 words."""
    flat = keep.reshape(-1).view(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(torch.int64).mul(_BYTE_TO_BIT).bitwise_right_shift_(56).to(torch.uint8)


def _unpacked_keep(bits: Tensor, shape: Sequence[int]) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    keep = bits.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_(1).view(-1)[:math.prod(shape)]
    return keep.view(torch.bool).view(shape)


def _masked(x: Tensor, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """x where dropout keeps it, 0 elsewhere: one pass. dropout's 1 / (1 - p) is folded into the
    adapter's scale s (a scalar on the r-wide factors, not a pass over T x i), so the op computes
    eager's s (x * noise) A^T B^T re-associated: equal within float rounding, for finite x."""
    return torch.where(keep, x, 0).to(dtype)


def _merged_weight(W: Tensor, A: Tensor, B: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """W + s B A in one GEMM that accumulates into a copy of W (scaling the small B): the
    (out, in) matrix is written once, not by separate mul and add passes."""
    return torch.addmm(W.to(dtype), s * B, A)


def _dy_b(dy: Tensor, sB: Tensor) -> Tensor:
    """dY (s B), (T, r), computed as ((sB)^T dY^T)^T: r rows, the fast layout (module doc)."""
    return (sB.t() @ dy.t()).t()


def _dyt_xa(dy: Tensor, xa: Tensor) -> Tensor:
    """dY^T (X A^T), (out, r), computed as ((X A^T)^T dY)^T: r rows (module doc)."""
    return (xa.t() @ dy).t().contiguous()


@torch.library.custom_op("fxlora::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    dropout_p: float,
    mask_dtype: torch.dtype,
    base_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    forward_form: int,
    backward_form: int,
    conv1d: bool,
    save_xa: bool,
    after: Optional[Tensor] = None,
    fast_rng: bool = False,
    packed_mask: bool = False,
    x_adapter: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`after`: ordering only (the previous dropout site's mask record), never read.
    `x_adapter`: what the adapter reads when it is not x: the traced graph's drop(x) (a site in a
    checkpointed region, whose recompute must see the forward's mask: AOTAutograd replays the
    graph's own RNG, not an op's). Then p is 0 here, forwards 1 and 4 only, and backward returns
    the base's dX for x and the adapter's for x_adapter (dropout's own backward masks it).
    `seed`: a 0-d int64 the graph drew. With `fast_rng` the mask is `hashed_keep(seed)`; with eager
    masks it comes from a generator seeded with it. Either way a backward or a checkpointed region's
    recompute (which reads the same seed) draws the same mask, and the record is the seed (int64 (1,)).
    (`fast_rng` without a seed draws from the seedless fast generator, recording the RNG state: the
    timing's stand-in, never inlined.)

    Returns (y, x A^T if save_xa else empty, the mask record if p > 0 else empty): the RNG
    state the mask was drawn from, or with `packed_mask` the mask itself, 1 bit per element."""
    W = base_weight(weight, conv1d).to(base_dtype)
    A, B = lora_A.to(adapter_dtype), lora_B.to(adapter_dtype)
    s = scale.to(adapter_dtype)
    record = x.new_empty(NO_TENSOR, dtype=torch.uint8)
    xa = x.new_empty(NO_TENSOR, dtype=adapter_dtype)
    if dropout_p > 0:
        if not packed_mask:
            record = _rng_state(x.device) if seed is None else seed.reshape(1).clone()
        keep = (_draw_keep(x.shape, dropout_p, mask_dtype, x.device, fast_rng) if seed is None
                else _seeded_keep(seed, x.shape, dropout_p, mask_dtype, x.device, fast_rng))
        if packed_mask:
            record = _pack_mask(keep)
        x_in = _masked(x, keep, adapter_dtype)
        s = s * _keep_scale(dropout_p, mask_dtype, x.device).to(adapter_dtype)
    elif x_adapter is not None:
        assert forward_form not in MERGED_FORWARD, "x_adapter: W x and B A x_adapter read different inputs"
        x_in = x_adapter.to(adapter_dtype)
    else:
        x_in = x.to(adapter_dtype)
    b = None if bias is None else bias.to(base_dtype)
    if forward_form == 3:  # x [W + s B A; A]^T: y and X A^T from one GEMM
        o, r = W.shape[0], A.shape[0]
        cat = torch.empty((o + r, W.shape[1]), dtype=adapter_dtype, device=W.device)
        torch.addmm(W.to(adapter_dtype), s * B, A, out=cat[:o])
        cat[o:].copy_(A)
        b_cat = None if b is None else torch.cat([b.to(adapter_dtype), b.new_zeros(r, dtype=adapter_dtype)])
        out = torch.nn.functional.linear(x_in.flatten(0, -2), cat, b_cat)
        y = out[:, :o].view(*x.shape[:-1], o)
        xa_full = out[:, o:].clone().view(*x.shape[:-1], r)
    elif forward_form == 2:  # x (W + s B A)^T: one big GEMM, the merged weight is transient
        merged = _merged_weight(W, A, B, s, adapter_dtype)
        y = torch.nn.functional.linear(x_in, merged.to(base_dtype), b)
        y = y.to(torch.promote_types(base_dtype, adapter_dtype))
        xa_full = torch.nn.functional.linear(x_in, A) if save_xa else None
    else:
        base = torch.nn.functional.linear(x.to(base_dtype), W, b)
        xa_full = torch.nn.functional.linear(x_in, A)
        if base_dtype == adapter_dtype:
            # Scale the (out, r) B, not the (T, out) product, and accumulate into the base
            # GEMM's output: no full-size elementwise pass.
            y = base.view(-1, base.shape[-1]).addmm_(xa_full.flatten(0, -2), (s * B).t()).view(base.shape)
        else:
            y = base + s * torch.nn.functional.linear(xa_full, B)
    if save_xa or forward_form in KEEPS_XA:
        xa = xa_full
    return y, xa, record


def _fake_record(x: Tensor, dropout_p: float, packed_mask: bool, seed: Optional[Tensor]) -> Tensor:
    """The mask record's fake: nothing, the packed bits (x's device), the seed, or an RNG state (host)."""
    if dropout_p == 0:
        return x.new_empty(NO_TENSOR, dtype=torch.uint8)
    if packed_mask:
        return x.new_empty(((math.prod(x.shape) + 7) // 8,), dtype=torch.uint8)
    if seed is not None:
        return seed.new_empty((1,))
    n = 16 if x.device.type == "cuda" else torch.get_rng_state().numel()
    return x.new_empty((n,), dtype=torch.uint8, device="cpu")


@lora_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, mask_dtype, base_dtype, adapter_dtype,
      forward_form, backward_form, conv1d, save_xa, after=None, fast_rng=False, packed_mask=False, x_adapter=None,
      seed=None):
    out_features = weight.shape[1] if conv1d else weight.shape[0]
    out_dtype = torch.promote_types(base_dtype, adapter_dtype)
    if forward_form == 3:
        y = strided_rows(x.new_empty(NO_TENSOR, dtype=out_dtype), x.shape[:-1], out_features, lora_A.shape[0])
    else:
        y = x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)
    keep_xa = save_xa or forward_form in KEEPS_XA
    xa = x.new_empty((*x.shape[:-1], lora_A.shape[0]) if keep_xa else NO_TENSOR, dtype=adapter_dtype)
    return y, xa, _fake_record(x, dropout_p, packed_mask, seed)


def _replayed_keep(rng_state: Tensor, shape: Sequence[int], p: float, mask_dtype: torch.dtype,
                   device: torch.device, fast: bool, seeded: bool = False) -> Tensor:
    """The forward's dropout mask, drawn again from the saved RNG state (or seed); the caller's RNG is untouched."""
    if seeded:
        return _seeded_keep(rng_state, shape, p, mask_dtype, device, fast)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng_state, device)
        else:
            torch.set_rng_state(rng_state)
        return _draw_keep(shape, p, mask_dtype, device, fast)


_X_ADAPTER = 17  # lora_linear's argument index of x_adapter (its gradient's place in backward's return)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_A, lora_B, scale, p, mask_dtype, base_dtype, adapter_dtype,
     fwd, bwd, conv1d, save_xa, *rest) = inputs
    fast_rng, packed_mask, x_adapter, seed = (*rest[1:], False, False, None, None)[:4]
    _y, xa, record = output
    ctx.conf = (p, mask_dtype, base_dtype, adapter_dtype, bwd, conv1d, save_xa, x.dtype)
    ctx.masks = (fast_rng, packed_mask, seed is not None)
    ctx.has_bias = bias is not None
    ctx.n_inputs = len(inputs)
    ctx.split_input = x_adapter is not None
    # What backward keeps alive: X (or X A^T when A is frozen), the mask record, and parameters
    # (which exist anyway). X A^T is kept alongside X only by forwards 3 and 4, which computed it anyway.
    # With x_adapter, the adapter's input is kept instead of X (dX of the base is dY W: no X).
    kept_x = x_adapter if ctx.split_input else x
    ctx.save_for_backward(None if save_xa else kept_x, weight, lora_A, lora_B, scale,
                          xa if save_xa or fwd in KEEPS_XA else None, record if p > 0 else None)


def _backward(ctx, dy, _dxa, _drecord):
    # One opaque op, so the partitioner cannot hoist the tangent-free parts of backward (the
    # merged weight W + sBA, X A^T, the replayed mask) into forward and save them for us.
    x, weight, lora_A, lora_B, scale, xa, record = ctx.saved_tensors
    need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    needs = [need_x, need_b and ctx.has_bias, need_A, need_B]
    if ctx.split_input:
        needs.append(ctx.needs_input_grad[-1])
    grads = lora_linear_backward(dy, x, weight, lora_A, lora_B, scale, xa, record, *ctx.conf, needs, *ctx.masks)
    dX, db, dA, dB, dXa = (g if need else None for g, need in zip(grads, [*needs, False][:5]))
    grads = [dX, None, db, dA, dB] + [None] * (ctx.n_inputs - 5)
    if ctx.split_input:
        grads[_X_ADAPTER] = dXa
    return tuple(grads)


@torch.library.custom_op("fxlora::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: Tensor,
    x: Optional[Tensor],
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Tensor,
    xa: Optional[Tensor],
    record: Optional[Tensor],
    dropout_p: float,
    mask_dtype: torch.dtype,
    base_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    backward_form: int,
    conv1d: bool,
    save_xa: bool,
    x_dtype: torch.dtype,
    needs: Sequence[bool],
    fast_rng: bool = False,
    packed_mask: bool = False,
    seeded: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dX, db, dA, dB, dX_adapter) in RunLoRA backward form `backward_form`; a gradient not in
    `needs` is empty. A fifth `needs` entry means the adapter read its own input (x_adapter, passed
    here as `x`): dX is then the base's dY W only and dX_adapter the adapter's s (dY B) A."""
    need_x, need_b, need_A, need_B, *split = needs
    split_input, need_xa = bool(split), bool(split) and split[0]
    dA_by, dB_by, dX_by = BACKWARD_FORMS[backward_form]
    A, B, s = lora_A.to(adapter_dtype), lora_B.to(adapter_dtype), scale.to(adapter_dtype)
    W = base_weight(weight, conv1d).to(base_dtype)
    x_shape = (*dy.shape[:-1], W.shape[1])
    dy_a = dy.to(adapter_dtype).flatten(0, -2)  # (T, out)
    keep = None
    if dropout_p > 0:
        keep = (_unpacked_keep(record, x_shape) if packed_mask
                else _replayed_keep(record, x_shape, dropout_p, mask_dtype, dy.device, fast_rng, seeded))
        s = s * _keep_scale(dropout_p, mask_dtype, dy.device).to(adapter_dtype)  # as forward folded it
    x_in = None
    if x is not None:
        x_in = (_masked(x, keep, adapter_dtype) if keep is not None else x.to(adapter_dtype)).flatten(0, -2)

    dX = None
    if need_x and dX_by in ("merged_cat", "split_cat"):  # dX (or dY W) and s Z1 from one GEMM over dY
        o, i, r = W.shape[0], W.shape[1], A.shape[0]
        cat = torch.empty((o, i + r), dtype=adapter_dtype, device=W.device)
        if dX_by == "merged_cat":
            cat[:, :i] = _merged_weight(W, A, B, s, adapter_dtype)
        else:
            cat[:, :i] = W
        cat[:, i:] = s * B
        out = dy_a @ cat
        dX, z1 = out[:, :i].view(x_shape), out[:, i:]
        if dX_by == "split_cat":
            adapter_dx = (z1 @ A).view(x_shape)
            dX = dX + (adapter_dx.mul_(keep) if keep is not None else adapter_dx)
    elif split_input:  # the base's dX reads no adapter term; the adapter's goes to x_adapter
        z1 = _dy_b(dy_a, s * B) if (need_A and dA_by == "z1") or need_xa else None
        if need_x:
            dX = (dy.to(base_dtype).flatten(0, -2) @ W).view(x_shape).to(x_dtype)
    else:
        z1 = _dy_b(dy_a, s * B) if (need_A and dA_by == "z1") or (need_x and dX_by == "split") else None  # s Z1: (T, r)
    z2 = dy_a.t() @ x_in if (need_A and dA_by == "xtdy") or (need_B and dB_by == "xtdy" and xa is None) else None

    db, dA, dB = (dy.new_empty(NO_TENSOR) for _ in range(3))
    if need_A:
        dA = (z1.t() @ x_in if dA_by == "z1" else s * (B.t() @ z2)).to(lora_A.dtype)
    if need_B:
        if xa is not None:  # kept by forwards 3 and 4, or instead of X when A is frozen
            dB = s * _dyt_xa(dy_a, xa.flatten(0, -2))
        elif dB_by == "xa":
            dB = s * _dyt_xa(dy_a, x_in @ A.t())
        else:
            dB = s * (z2 @ A.t())
        dB = dB.to(lora_B.dtype)
    if need_x and dX is not None:
        dX = dX.to(x_dtype)  # merged_cat in x's dtype stays the strided view its fake describes
    elif need_x:
        dy_b = dy.to(base_dtype)
        if dX_by == "merged":
            merged = _merged_weight(W, A, B, s, adapter_dtype)
            dX = dy_b @ merged.to(base_dtype)
        else:
            if keep is None and base_dtype == adapter_dtype:  # accumulate into the base GEMM's output
                dX = (dy_b.flatten(0, -2) @ W).addmm_(z1, A).view(x_shape)
            elif base_dtype == adapter_dtype:  # the masked adapter term, then the base GEMM accumulates into it
                dX = (z1 @ A).mul_(keep.flatten(0, -2)).addmm_(dy_b.flatten(0, -2), W).view(x_shape)
            else:
                adapter_dx = (z1 @ A).view(x_shape)
                if keep is not None:
                    adapter_dx = adapter_dx.mul_(keep)
                dX = dy_b @ W + adapter_dx
        dX = dX.to(x_dtype)
    if need_b:
        db = dy.flatten(0, -2).sum(0)
    if dX is None:
        dX = dy.new_empty(NO_TENSOR)
    dXa = (z1 @ A).view(x_shape).to(adapter_dtype if x is None else x.dtype) if need_xa else dy.new_empty(NO_TENSOR)
    return dX, db, dA, dB, dXa


def fake_grads(dy, weight, lora_A, lora_B, conv1d: bool, x_dtype, needs,
               strided_dx: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (dX, db, dA, dB) of a LoRA-linear backward op: shaped as the gradients in `needs`, empty otherwise."""
    need_x, need_b, need_A, need_B = needs
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    if need_x and strided_dx:
        dX = strided_rows(dy.new_empty(NO_TENSOR, dtype=x_dtype), dy.shape[:-1], in_features, lora_A.shape[0])
    else:
        dX = dy.new_empty((*dy.shape[:-1], in_features) if need_x else NO_TENSOR, dtype=x_dtype if need_x else dy.dtype)
    db = dy.new_empty((dy.shape[-1],) if need_b else NO_TENSOR)
    dA = lora_A.new_empty(lora_A.shape) if need_A else dy.new_empty(NO_TENSOR)
    dB = lora_B.new_empty(lora_B.shape) if need_B else dy.new_empty(NO_TENSOR)
    return dX, db, dA, dB


@lora_linear_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, scale, xa, record, dropout_p, mask_dtype, base_dtype, adapter_dtype,
      backward_form, conv1d, save_xa, x_dtype, needs, fast_rng=False, packed_mask=False, seeded=False):
    need_xa = len(needs) > 4 and needs[4]
    grads = fake_grads(dy, weight, lora_A, lora_B, conv1d, x_dtype, needs[:4],
                       strided_dx=BACKWARD_FORMS[backward_form][2] == "merged_cat" and x_dtype == adapter_dtype)
    in_features = weight.shape[0] if conv1d else weight.shape[1]
    dXa = (dy.new_empty((*dy.shape[:-1], in_features), dtype=adapter_dtype if x is None else x.dtype) if need_xa
           else dy.new_empty(NO_TENSOR))
    return (*grads, dXa)


lora_linear.register_autograd(_backward, setup_context=_setup_context)


def _inline_why_not(dropout_p: float, fast_rng: bool, packed_mask: bool, seeded: bool) -> Optional[str]:
    """Why a LoRA op's body cannot be traced for Inductor: masks that read state outside its inputs."""
    if dropout_p == 0:
        return None
    if not fast_rng:
        return "eager's dropout masks (fallback_random or an eager inner compiler) come from the global RNG"
    if packed_mask:
        return "a packed mask record"
    if not seeded:
        return "an RNG-state mask record"
    return None


@inline_check("fxlora::lora_linear")
def _(dropout_p, fast_rng=False, packed_mask=False, seed=None, **_):
    return _inline_why_not(dropout_p, fast_rng, packed_mask, seed is not None)


@inline_check("fxlora::lora_linear_backward")
def _(dropout_p, fast_rng=False, packed_mask=False, seeded=False, **_):
    return _inline_why_not(dropout_p, fast_rng, packed_mask, seeded)
