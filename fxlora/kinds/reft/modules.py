"""ReFT interventions in plain PyTorch, mirroring pyreft (docs/reft.md), and `attach_reft`.

    LoReFT  Phi(h) = h + R^T (W_L h + b_L - R h)      R: (r, d), orthonormal rows
    DiReFT  Phi(h) = h + R^T (W_1 h + b_1)            R: (r, d), orthonormal rows
    NodiReFT (DiReFT with orthogonal=False): R is a plain trainable (r, d) weight W_2

pyreft's `LoreftIntervention` computes `base + (learned_source(base) - rotate_layer(base)) @
rotate_layer.weight.T` with `rotate_layer.weight` (d, r) under `orthogonal`; here the
rotation is an `nn.Linear(d, r, bias=False)` whose weight R (r, d) is the transpose of
pyreft's, so `F.linear(h, R) = R h` and `(.) @ R = R^T (.)`. pyreft's `DireftIntervention`
computes `base + learned_source(base) @ rotate_layer.weight.T` (the same orthogonal rotation);
its `NodireftIntervention` uses `proj_layer = Linear(d, r)` instead: `... @ proj_layer.weight`,
W_2 = proj_layer.weight (r, d), our `orthogonal=False`. pyreft's optional dropout and
activation (identity by default) are left out.

pyreft intervenes on the residual stream (a block's output) at chosen token positions;
`attach_reft` intervenes on the full output of chosen nn.Linear layers (o_proj, down_proj:
the two writes into the residual stream of a Llama block), optionally on the first
`positions` tokens only (pyreft's "f<k>" positions), which fxlora matches but leaves as traced.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import orthogonal


class LoReftIntervention(nn.Module):
    def __init__(self, d: int, r: int):
        super().__init__()
        self.rotate = orthogonal(nn.Linear(d, r, bias=False))  # R = rotate.weight, rows orthonormal
        self.learned_source = nn.Linear(d, r)  # W_L, b_L

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.rotate.weight
        return h + torch.matmul(self.learned_source(h) - F.linear(h, R), R)


class DiReftIntervention(nn.Module):
    def __init__(self, d: int, r: int, orthogonal_rows: bool = True):
        super().__init__()
        proj = nn.Linear(d, r, bias=False)  # R (or NodiReFT's W_2) = proj.weight (r, d)
        self.proj = orthogonal(proj) if orthogonal_rows else proj
        self.learned_source = nn.Linear(d, r)  # W_1, b_1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.matmul(self.learned_source(h), self.proj.weight)


INTERVENTIONS = {
    "loreft": LoReftIntervention,
    "direft": DiReftIntervention,
    "nodireft": lambda d, r: DiReftIntervention(d, r, orthogonal_rows=False),
}


class ReftLinear(nn.Module):
    """A frozen nn.Linear followed by an intervention on its output (all of it, or the first
    `positions` tokens of dim 1)."""

    def __init__(self, base: nn.Linear, intervention: nn.Module, positions: Optional[int] = None):
        super().__init__()
        self.base, self.intervention, self.positions = base, intervention, positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.positions is None:
            return self.intervention(h)
        k = self.positions
        return torch.cat([self.intervention(h[:, :k]), h[:, k:]], dim=1)


def attach_reft(
    model: nn.Module,
    layers: Union[Iterable[str], Callable[[str, nn.Module], bool]] = ("o_proj", "down_proj"),
    kind: str = "loreft",
    r: int = 4,
    positions: Optional[int] = None,
    seed: int = 0,
) -> nn.Module:
    """Wrap each chosen nn.Linear (name ending in one of `layers`, or `layers(name, module)`
    true) in a ReftLinear; freeze every other parameter. Returns the model (changed in place)."""
    if callable(layers):
        pick = layers
    else:
        suffixes = tuple(layers)
        pick = lambda name, m: name.split(".")[-1] in suffixes  # noqa: E731
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and pick(n, m)]
    if not targets:
        raise ValueError("attach_reft: no nn.Linear matched")
    torch.manual_seed(seed)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        iv = INTERVENTIONS[kind](linear.out_features, r).to(linear.weight.device, linear.weight.dtype)
        setattr(parent, child, ReftLinear(linear, iv, positions))
    return model


__all__ = ["DiReftIntervention", "LoReftIntervention", "ReftLinear", "attach_reft"]
