"""What every robustness test does: compile with fxlora (aot_eager), step, compare with eager PEFT."""

from __future__ import annotations

import torch

import fxlora
from tests.helpers import BF16, FP16, FP32, compiled, loss_and_grads, step  # noqa: F401  (what robustness tests import from here)

def decisions(report=None):
    report = report or fxlora.last_report()
    return [d for g in report.graphs for d in g.decisions]


def rewritten(report=None):
    return [d for d in decisions(report) if d.rewritten]


def rejections(report=None):
    report = report or fxlora.last_report()
    return report.rejections_of("lora")
