"""Dtypes: fp32, bf16 autocast, bf16 weights with fp32 adapters (PEFT's default
autocast_adapter_dtype), all-bf16, and fp16 (the CPU runs fp16 GEMMs) as weights and autocast.

Tolerances per dtype are in tests/robustness/common.py and docs/robustness.md.
"""

import contextlib

import pytest
import torch

import fxlora
from tests.helpers import assert_same_step
from tests.robustness.common import BF16, FP16, FP32, compiled, rewritten, step
from tests.robustness.families import family_batch, family_lora

SETUPS = {
    # name: (weight dtype, autocast dtype, PEFT autocast_adapter_dtype, tolerance)
    "fp32": (None, None, True, FP32),
    "bf16-autocast": (None, torch.bfloat16, True, BF16),
    "bf16-weights-fp32-adapters": (torch.bfloat16, None, True, BF16),
    "bf16-all": (torch.bfloat16, None, False, BF16),
    "fp16-weights-fp32-adapters": (torch.float16, None, True, FP16),
    "fp16-autocast": (None, torch.float16, True, FP16),
}
FAST = {("llama", "bf16-weights-fp32-adapters"), ("gpt2", "bf16-autocast"), ("llama", "fp16-weights-fp32-adapters")}


def _model(family, weight_dtype, adapter_autocast, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    from fxlora.testing.models import randomize_lora_B
    from tests.robustness.families import ALL_LINEAR_TARGETS, family_model

    model = family_model(family)
    if weight_dtype is not None:
        model = model.to(weight_dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ALL_LINEAR_TARGETS[family],
                     fan_in_fan_out=family == "gpt2")
    model = get_peft_model(model, cfg, autocast_adapter_dtype=adapter_autocast)
    randomize_lora_B(model)
    return model


def _cases():
    for family in ("llama", "gpt2", "t5"):
        for name in SETUPS:
            if (family, name) == ("t5", "bf16-autocast"):
                # Not run: T5's ReLU FFN is chaotic under bf16 autocast. PEFT's own bf16 gradient
                # of wi's adapter is 30% off its fp32 gradient (ReLU gates flip with rounding), so
                # any other rounding order (fxlora's fused base + s*BA) lands elsewhere too.
                continue
            marks = () if (family, name) in FAST else (pytest.mark.slow,)
            yield pytest.param(family, name, marks=marks, id=f"{family}-{name}")


@pytest.mark.parametrize("family, setup", list(_cases()))
def test_dtype_step_equals_eager(family, setup):
    weight_dtype, autocast_dtype, adapter_autocast, tol = SETUPS[setup]
    model = _model(family, weight_dtype, adapter_autocast)
    if weight_dtype is not None:
        adapters = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert adapters == {torch.float32 if adapter_autocast else weight_dtype}
    batch = family_batch(family)
    ctx = (lambda: torch.autocast("cpu", dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    with ctx():
        ref = step(model, batch)
        fxlora.clear_reports()
        got = step(compiled(model), batch)
    assert_same_step(ref, got, **tol)
    report = fxlora.last_report()
    assert report.sites and len(rewritten(report)) == len(report.sites)
    if autocast_dtype is not None:
        assert all(s.autocast == f"cpu:{str(autocast_dtype).removeprefix('torch.')}" for s in report.sites)


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["bf16-autocast", "bf16-weights-fp32-adapters"])
def test_bf16_with_dropout(setup):
    weight_dtype, autocast_dtype, adapter_autocast, tol = SETUPS[setup]
    model = _model("llama", weight_dtype, adapter_autocast, dropout=0.1)
    batch = family_batch("llama")
    ctx = (lambda: torch.autocast("cpu", dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    with ctx():
        ref = step(model, batch)
        fxlora.clear_reports()
        got = step(compiled(model), batch)
    assert_same_step(ref, got, **tol)
    assert len(rewritten()) == 7
