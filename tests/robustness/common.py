"""What every robustness test does: compile with fxlora (aot_eager), step, compare with eager PEFT."""

from __future__ import annotations

import torch

import fxlora
from tests.helpers import loss_and_grads

# Tolerances per dtype (loss and every gradient; docs/robustness.md explains them).
FP32 = dict(rtol=1e-4, atol=1e-5)
# bf16: both sides round GEMM inputs/outputs to bf16, in different orders (the op fuses
# base + s*BA, PEFT adds after a cast); a few bf16 ulps on gradients of a 1-layer model.
BF16 = dict(rtol=5e-2, atol=5e-3)
# fp16 has 3 more mantissa bits than bf16 but a narrow range; the tiny models stay in range.
FP16 = dict(rtol=1e-2, atol=2e-3)


def compiled(model, **options):
    return torch.compile(model, backend="fxlora", options={"inner": "aot_eager", **options})


def step(model, batch, seed=1):
    """One forward/backward from a fixed RNG state, so dropout draws the same masks on both sides."""
    torch.manual_seed(seed)
    return loss_and_grads(model, batch)


def decisions(report=None):
    report = report or fxlora.last_report()
    return [d for g in report.graphs for d in g.decisions]


def rewritten(report=None):
    return [d for d in decisions(report) if d.rewritten]


def rejections(report=None):
    report = report or fxlora.last_report()
    return report.rejections_of("lora")
