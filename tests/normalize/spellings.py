"""Small hand-written adapters in many spellings (LitGPT, minLoRA, pyreft-style, einsum...): one
frozen nn.Linear W (d_in -> d_out) plus trainable A (r, d_in), B (d_out, r), scale s."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

D_IN, D_OUT, R, S = 16, 12, 4, 0.5


class LoraSpelling(nn.Module):
    """`forward` = W(x) + spelling(x): the branch written by `branch(self, x)`."""

    def __init__(self, branch, d_in=D_IN, d_out=D_OUT, r=R, bias=True, base=None):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=bias)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.B = nn.Parameter(torch.randn(d_out, r) / r**0.5)
        self.branch, self.base_fn = branch, base

    def forward(self, x):
        base = self.base(x) if self.base_fn is None else self.base_fn(self, x)
        return self.branch(self, x, base)


def _plus(f):
    return lambda m, x, base: base + f(m, x)


# name -> (branch(m, x, base) -> out): every one is base(x) + S * B A x
LORA_SPELLINGS = {
    "peft": _plus(lambda m, x: F.linear(F.linear(x, m.A), m.B) * S),
    "litgpt": _plus(lambda m, x: (x @ m.A.transpose(0, 1) @ m.B.transpose(0, 1)) * S),
    "matmul_t": _plus(lambda m, x: torch.matmul(torch.matmul(x, m.A.t()), m.B.t()) * S),
    "dot_T": _plus(lambda m, x: S * (x @ m.A.T @ m.B.T)),
    "mT_permute": _plus(lambda m, x: (x @ m.A.mT) @ m.B.permute(1, 0) * S),
    "einsum": _plus(lambda m, x: torch.einsum("btr,or->bto", torch.einsum("bti,ri->btr", x, m.A), m.B) * S),
    "einsum_ellipsis": _plus(lambda m, x: torch.einsum("...r,ro->...o", torch.einsum("...i,ri->...r", x, m.A), m.B.t()) * S),
    "scale_between": _plus(lambda m, x: F.linear(S * F.linear(x, m.A), m.B)),
    "scale_on_x": _plus(lambda m, x: F.linear(F.linear(x * S, m.A), m.B)),
    "div": _plus(lambda m, x: F.linear(F.linear(x, m.A), m.B) / (1 / S)),
    "two_scales": _plus(lambda m, x: F.linear(F.linear(x, m.A) * 2.0, m.B) * (S / 2.0)),
    "add_alpha": lambda m, x, base: torch.add(base, F.linear(F.linear(x, m.A), m.B), alpha=S),
    "branch_first": lambda m, x, base: F.linear(F.linear(x, m.A), m.B) * S + base,
    "noop_casts": _plus(lambda m, x: F.linear(F.dropout(F.linear(x.to(torch.float32).contiguous(), m.A), 0.0), m.B) * S),
    "base_matmul_bias": lambda m, x, base: base + F.linear(F.linear(x, m.A), m.B) * S,
}
# the base as `x @ W.mT + b` with a no-op cast (bias_into_linear, noop)
BASE_SPELLINGS = {
    "base_matmul_bias": lambda m, x: x.to(torch.float32) @ m.base.weight.mT + m.base.bias,
}


def lora_spelling(name: str, **kw) -> LoraSpelling:
    return LoraSpelling(LORA_SPELLINGS[name], base=BASE_SPELLINGS.get(name), **kw)


class MinLoraParametrization(nn.Module):
    """minLoRA's `LoRAParametrization`: the weight W becomes W + s * B @ A (weight-side LoRA)."""

    def __init__(self, d_in, d_out, r=R, alpha=2.0):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.lora_B = nn.Parameter(torch.randn(d_out, r) / r**0.5)
        self.scaling = alpha / r
        self.dropout_fn = lambda x: x

    def forward(self, X):
        return X + torch.matmul(self.lora_B, self.dropout_fn(self.lora_A)).view(X.shape) * self.scaling


def minlora_model(d_in=D_IN, d_out=D_OUT, layers=2) -> nn.Module:
    """A tiny MLP whose linears carry minLoRA parametrizations (`register_parametrization`)."""
    dims = [d_in] + [d_out] * layers
    layers = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
    for layer in layers:
        layer.requires_grad_(False)
        parametrize.register_parametrization(layer, "weight", MinLoraParametrization(layer.in_features, layer.out_features))
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.GELU())][:-1])


class WeightSide(nn.Module):
    """`F.linear(x, W + s * B @ A, b)` written directly, with the scale at `where`."""

    def __init__(self, where="product", d_in=D_IN, d_out=D_OUT, r=R):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.B = nn.Parameter(torch.randn(d_out, r) / r**0.5)
        self.where = where

    def forward(self, x):
        W, A, B = self.base.weight, self.A, self.B
        delta = {"product": lambda: S * (B @ A), "A": lambda: B @ (A * S), "B": lambda: (S * B) @ A,
                 "mm": lambda: torch.mm(B, A) * S}[self.where]()
        return F.linear(x, W + delta, self.base.bias)


class LowRankRotateLayer(nn.Module):
    """pyreft's rotation (pyreft/interventions.py): weight (d, r), applied as `x @ weight`."""

    def __init__(self, n, m):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, m), requires_grad=True)
        nn.init.orthogonal_(self.weight)

    def forward(self, x):
        return torch.matmul(x.to(self.weight.dtype), self.weight)


class PyreftStyleLoreft(nn.Module):
    """pyreft's `LoreftIntervention.forward`, spelled as pyreft spells it, on a frozen linear's output."""

    def __init__(self, d_in=D_IN, d=D_OUT, r=R):
        super().__init__()
        self.base = nn.Linear(d_in, d)
        self.base.requires_grad_(False)
        self.rotate_layer = orthogonal(LowRankRotateLayer(d, r))
        self.learned_source = nn.Linear(d, r)

    def forward(self, x):
        base = self.base(x)
        rotated_base = self.rotate_layer(base)
        output = base + torch.matmul(self.learned_source(base) - rotated_base, self.rotate_layer.weight.T)
        return F.dropout(output.to(base.dtype), 0.0, self.training)


class HandLoreft(nn.Module):
    """A hand-written LoReFT `h + (W_L(h) - h @ R.T) @ R`, R (r, d) a trainable orthonormal matrix."""

    def __init__(self, d_in=D_IN, d=D_OUT, r=R):
        super().__init__()
        self.base = nn.Linear(d_in, d)
        self.base.requires_grad_(False)
        self.R = nn.Parameter(torch.linalg.qr(torch.randn(d, r))[0].T.contiguous())
        self.W_L = nn.Linear(d, r)

    def forward(self, x):
        h = self.base(x)
        return h + (self.W_L(h) - h @ self.R.T) @ self.R
