"""What every robustness test does: compile with fxlora (aot_eager), step, compare with eager PEFT."""

from __future__ import annotations

import torch

import fxlora
from tests.helpers import BF16, FP16, FP32, compiled, loss_and_grads  # noqa: F401  (what robustness tests import from here)

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
