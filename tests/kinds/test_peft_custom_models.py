"""PEFT's custom-model configurations (its tests/test_custom_models.py) that no kind rewrites: each
adapted layer gets a true reason (a rejection or a near miss), never silence, never another
configuration's reason (fxlora/near_misses.py, fxlora/kinds/lora/match.py)."""

import pytest

import fxlora
from fxlora.testing.peft_custom import custom_model


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(**kw)


def _ia3(**kw):
    from peft import IA3Config

    return IA3Config(**kw)


# (PEFT model, config, {layer path: (status, words its reason must hold)})
CASES = {
    "Conv1d LoRA": ("Conv1d", lambda: _lora(target_modules=["conv1d"]), {
        "conv1d": ("near miss", ["chain of two conv1d of rank 8 (not low for in 1 x 2 = 2, out=1",
                                 "no kind rewrites adapters on Conv1d layers"])}),
    "Conv2d LoRA": ("Conv2d", lambda: _lora(target_modules=["conv2d"]), {  # r=8 < in 5 x 3 x 3 = 45: low rank
        "conv2d": ("rejected", ["a low-rank conv chain (LoRA on a Conv layer)"])}),
    "Conv3d LoRA": ("Conv3d", lambda: _lora(target_modules=["conv3d"]), {
        "conv3d": ("rejected", ["a low-rank conv chain (LoRA on a Conv layer)"])}),
    "Embedding LoRA, r >= dim": ("EmbConv1D", lambda: _lora(target_modules=["emb"]), {
        "emb": ("near miss", ["embedding(ids, A^T) @ B^T", "no kind rewrites adapters on Embedding layers"])}),
    "GPT-2 Conv1D 5->1 LoRA": ("EmbConv1D", lambda: _lora(target_modules=["conv1d"]), {
        "conv1d": ("near miss", ["chain of two linears of rank 8, not low for in=5, out=1"])}),
    "Conv1D LoRA beside trainable tokens": (
        "EmbConv1D", lambda: _lora(target_modules=["conv1d"], trainable_token_indices={"emb": [0, 10]}), {
            "conv1d": ("near miss", ["chain of two linears of rank 8, not low for in=5, out=1"]),
            "emb.token_adapter": ("near miss", ["its weight is computed in the graph (index_copy)",
                                                "trainable_tokens_delta"])}),
    "Conv2d IA3": ("Conv2d", lambda: _ia3(target_modules=["conv2d"], feedforward_modules=[]), {
        "conv2d": ("near miss", ["trainable scale", "(1, 10, 1, 1), one entry per channel (IA3-style)",
                                 "no kind rewrites adapters on Conv2d layers"])}),
    "Conv2d IA3 feedforward": ("Conv2d", lambda: _ia3(target_modules=["conv2d"], feedforward_modules=["conv2d"]), {
        "conv2d": ("near miss", ["its input is", "(1, 5, 1, 1), one entry per channel (IA3-style)"])}),
    "Conv3d IA3": ("Conv3d", lambda: _ia3(target_modules=["conv3d"], feedforward_modules=[]), {
        "conv3d": ("near miss", ["(1, 10, 1, 1, 1), one entry per channel", "Conv3d layers"])}),
    "Conv3d IA3 feedforward": ("Conv3d", lambda: _ia3(target_modules=["conv3d"], feedforward_modules=["conv3d"]), {
        "conv3d": ("near miss", ["its input is", "(1, 5, 1, 1, 1), one entry per channel"])}),
    "MLP DoRA": ("MLP", lambda: _lora(target_modules=["lin0"], use_dora=True), {
        "lin0": ("rewritten", [])}),
    "Conv2d DoRA": ("Conv2d", lambda: _lora(target_modules=["conv2d"], use_dora=True), {
        "conv2d": ("rejected", ["DoRA on a Conv layer"])}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_adapted_layer_gets_its_true_reason(case):
    name, config, expected = CASES[case]
    model, x = custom_model(name, config())
    report = fxlora.explain(model, x, options={"inner": "aot_eager", "objective": "flops"})
    layers = {layer.path.removeprefix("base_model.model."): layer for layer in report.accounting.layers}
    assert set(layers) == set(expected), layers
    for path, (status, words) in expected.items():
        layer = layers[path]
        assert layer.status == status, (path, layer)
        for w in words:
            assert w in layer.reason, (path, w, layer.reason)
    assert "LoRA on an Embedding" not in str(report) or case.startswith("Embedding")
