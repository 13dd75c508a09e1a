"""DoRA sites (fxlora/kinds/dora): found in PEFT's, torchtune's and a hand-written spelling,
rewritten exactly (loss and the gradients of A, B and the magnitude), and left alone where
the rewrite would not be legal."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_lora
from tests.helpers import BF16, FP32, assert_same_step, compiled, step


def peft_dora(family="llama", dropout=0.0, seed=0, **kwargs):
    model = with_lora(tiny_model(family, hidden=32, layers=1, seed=seed), family, r=4, dropout=dropout,
                      use_dora=True, seed=seed, **kwargs)
    _jitter_magnitudes(model, seed)
    return model.train()


def _jitter_magnitudes(model, seed):
    """PEFT starts m at ||W||: move it off so c - 1 is not ~0 and every term of dm is generic."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def _counts():
    return counters["fxlora"]["dora_sites"], counters["fxlora"]["dora_rewritten"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_peft_dora_is_exact(family, dropout):
    """Llama (no bias), Qwen2 (q/k/v biases), GPT-2 (Conv1D, fan_in_fan_out), with and without dropout."""
    batch = token_batch(2, 8)
    ref = step(peft_dora(family, dropout), batch)
    counters.clear()
    torch._dynamo.reset()
    got = step(compiled(peft_dora(family, dropout)), batch)
    sites, rewritten = _counts()
    assert sites > 0 and rewritten == sites, (sites, rewritten)
    assert any("magnitude" in name for name in got[1])
    assert_same_step(ref, got, **FP32)
