"""Model families: tiny random-init HF models with PEFT LoRA on all linears and on attention only.

Each: sites found, every site rewritten, loss and every adapter gradient equal to eager PEFT,
and `verify=True` (the rewrite checked against the untouched graph on the first call) passes.
"""

import pytest

import fxlora
from tests.helpers import assert_same_step
from tests.robustness.common import FP32, compiled, rejections, rewritten, step
from tests.robustness.families import ATTENTION_TARGETS, FAMILIES, family_batch, family_lora

# sites per 1-layer model: (all linears, attention only)
EXPECTED_SITES = {
    "llama": (7, 4),
    "qwen2": (7, 4),
    "mistral": (7, 4),
    "gpt2": (4, 1),  # c_attn, attn.c_proj, c_fc, mlp.c_proj (Conv1D, fan_in_fan_out)
    "bert": (7, 3),  # q, k, v, attention/intermediate/output dense, the MLM head's transform dense
    "roberta": (7, 3),
    "t5": (16, 12),  # encoder self-attn, decoder self- and cross-attn q/k/v/o, two FFNs wi/wo
    "vit": (6, 3),
}
FAST = {("llama", "all-linear"), ("gpt2", "attention"), ("t5", "attention")}


def _cases():
    for family in FAMILIES:
        for targets in ("all-linear", "attention"):
            marks = () if (family, targets) in FAST else (pytest.mark.slow,)
            yield pytest.param(family, targets, marks=marks, id=f"{family}-{targets}")


@pytest.mark.parametrize("family, targets", list(_cases()))
def test_family_sites_rewritten_and_step_equals_eager(family, targets):
    model = family_lora(family, targets)
    batch = family_batch(family)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(compiled(model, verify=True), batch)
    assert_same_step(ref, got, **FP32)
    expected = EXPECTED_SITES[family][0 if targets == "all-linear" else 1]
    report = fxlora.last_report()
    assert len(report.sites) == expected, str(report)
    assert len(rewritten(report)) == expected and not rejections(report)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5", "vit"])
def test_family_with_dropout_same_masks(family):
    model = family_lora(family, "all-linear", dropout=0.1)
    batch = family_batch(family)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(compiled(model), batch)
    assert_same_step(ref, got, **FP32)
    assert len(rewritten()) == EXPECTED_SITES[family][0]


def test_attention_targets_cover_every_family():
    assert set(ATTENTION_TARGETS) == set(FAMILIES)
