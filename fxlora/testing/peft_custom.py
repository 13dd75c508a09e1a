"""Small models of PEFT's tests/test_custom_models.py, rebuilt here (same layers and shapes), so the
tests and docs can check what fxlora says about each configuration PEFT tests on them.

    model, x = custom_model("Conv2d", LoraConfig(target_modules=["conv2d"]))
    fxlora.explain(model, x)

PEFT feeds every model `torch.arange(90).view(9, 10)` (token ids for EmbConv1D), as `custom_input` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class MLP(nn.Module):
    """PEFT's "MLP": lin0 10 -> 20, ReLU, the model's own Dropout(0.5), lin1 20 -> 2."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class EmbConv1D(nn.Module):
    """PEFT's "EmbConv1D": Embedding(100, 5), GPT-2's Conv1D 5 -> 1, a linear head."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class _Conv(nn.Module):
    """PEFT's "Conv1d" (1 -> 1, kernel 2), "Conv2d" and "Conv3d" (5 -> 10, kernel 3) models."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims
        conv = {1: lambda: nn.Conv1d(1, 1, 2), 2: lambda: nn.Conv2d(5, 10, 3), 3: lambda: nn.Conv3d(5, 10, 3)}[dims]()
        setattr(self, f"conv{dims}d", conv)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9 if dims == 1 else 10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        if self.dims == 1:
            X = X.reshape(-1, 1, 10)
        elif self.dims == 2:
            X = X.reshape(-1, 5, 3, 3)
        else:
            X = torch.stack([X] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)
        conv = getattr(self, f"conv{self.dims}d")
        return self.sm(self.lin0(self.flat(self.relu(conv(X)))))


MODELS = {
    "MLP": MLP,
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: _Conv(1),
    "Conv2d": lambda: _Conv(2),
    "Conv3d": lambda: _Conv(3),
}


def custom_input() -> torch.Tensor:
    return torch.arange(90).view(9, 10)


def custom_model(name: str, config: Any, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """PEFT's model `name` with `config` applied, in train mode, and PEFT's input. Adapter weights
    are moved off their identity init (PEFT's `init_lora_weights=False` / `init_weights=False`) so
    every gradient is generic."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(MODELS[name](), config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.1)
    return model.train(), custom_input()


__all__ = ["MLP", "MODELS", "EmbConv1D", "custom_input", "custom_model"]
