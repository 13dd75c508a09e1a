"""QLoRA: LoRA over a bitsandbytes 4-bit base (fxlora/normalize.py's bnb_4bit_* rules).

bitsandbytes runs 4-bit on this CPU. Its base layer reaches the Dynamo graph in two spellings:
`MatMul4Bit` as an autograd-function op when x needs a gradient, the fused `gemm_4bit` when it
does not (the first layer's q/k/v without input gradients); both become `linear(x, W', b)`."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora.normalize import normalize
from fxlora.graph.edit import copy_graph_module
from tests.helpers import FP32, assert_same_step, compiled, dynamo_graph, step
from fxlora.testing.models import quantized_4bit
from tests.kinds.saved import saved_bytes

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HOP = torch.ops.higher_order.autograd_function_apply


def qlora(quant_type="nf4", double_quant=True, dropout=0.0):
    """A random-init one-layer Llama loaded 4-bit as from a hub checkpoint, PEFT LoRA on all linears."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=128)
    model = quantized_4bit(LlamaForCausalLM(cfg), quant_type, double_quant)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: a zero adapter would hide a wrong dA
            nn.init.normal_(p, std=0.1)
    return model.train()


def batch():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("quant_type, double_quant, dropout", [
    ("nf4", True, 0.0), ("fp4", False, 0.0), ("nf4", False, 0.1),
])
def test_qlora_sites_rewritten_and_exact(quant_type, double_quant, dropout):
    model = qlora(quant_type, double_quant, dropout)
    ref = step(model, batch())
    fxlora.clear_reports()
    got = step(compiled(model), batch())
    assert_same_step(ref, got, **FP32)  # the same dequantised W: float rounding only
    decisions = fxlora.last_report().decisions_of("lora")
    assert len(decisions) == 7 and all(d.rewritten for d in decisions), [d.why for d in decisions]


def test_bf16_adapters_over_fp32_compute():
    """TRL casts QLoRA's adapters to bf16 (the QLoRA paper's recipe): PEFT then computes B(A(x)) in
    bf16 and casts `s * B(A(x))` back to the base's fp32 before adding; the cast is part of the site."""
    model = qlora()
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    ref = step(model, batch())
    fxlora.clear_reports()
    got = step(compiled(model), batch())
    assert_same_step(ref, got, **FP32)  # the same bf16 products and casts, in PEFT's order
    decisions = fxlora.last_report().decisions_of("lora")
    assert len(decisions) == 7 and all(d.rewritten for d in decisions), [d.why for d in decisions]


def _linear4bit(bias: bool):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.1, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer.weight = layer.weight._quantize("cpu")
    if bias:
        layer.bias.requires_grad_(False)
    return layer.train()


@pytest.mark.parametrize("x_grad, rule", [(True, "linear_4bit"), (False, "bnb_4bit_gemm")])
@pytest.mark.parametrize("bias", [False, True])
def test_bnb_rules_spell_the_base_as_a_linear_and_keep_values(x_grad, rule, bias):
    layer = _linear4bit(bias)
    x = torch.randn(2, 5, 64, requires_grad=x_grad)
    gm, inputs = dynamo_graph(layer, x)
    normed = copy_graph_module(gm)
    fired = normalize(normed)
    assert fired.get(rule) == 1, fired
    targets = [n.target for n in normed.graph.nodes if n.op == "call_function"]
    assert HOP not in targets and torch.ops.bitsandbytes.gemm_4bit.default not in targets
    assert torch._C._nn.linear in targets
    torch.testing.assert_close(normed(*inputs), gm(*inputs), **FP32)


def test_clone_read_elsewhere_is_kept():
    """PEFT's `result.clone()` is dropped only when nothing else reads the cloned value."""

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(8, 8).requires_grad_(False)

        def forward(self, x):
            y = self.base(x)
            return y.clone() + y

    gm, _ = dynamo_graph(TwoReaders(), torch.randn(2, 8))
    normed = copy_graph_module(gm)
    normalize(normed)
    assert any(n.target == "clone" for n in normed.graph.nodes)


@pytest.mark.inductor
def test_qlora_under_inductor_keeps_no_full_precision_weight():
    """The dequantised W is recomputed in backward (as bitsandbytes does), never saved: what fxlora
    keeps is at most what PEFT keeps under Inductor."""
    from peft import LoraConfig, get_peft_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = _linear4bit(False), _linear4bit(False)
            self.down.weight = bnb.nn.Params4bit(torch.randn(64, 32) * 0.1, requires_grad=False, quant_type="nf4")
            self.down.weight = self.down.weight._quantize("cpu")
            self.down.in_features, self.down.out_features = 32, 64

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, target_modules=["up", "down"])).train()
    x = torch.randn(4, 64, 64, requires_grad=True)
    params = [*model.parameters(), *model.buffers()]
    weights = [t for m in model.modules() if isinstance(getattr(m, "weight", None), bnb.nn.Params4bit)
               for t in (m.weight.quant_state.absmax, m.weight.quant_state.code, getattr(m.weight.quant_state, "offset", None),
                         *(getattr(m.weight.quant_state.state2, k) for k in ("absmax", "code")))]

    def run(m):
        torch._dynamo.reset()
        m(x).pow(2).mean().backward()  # compiles (and times forms) outside the count
        shapes = []

        def step():
            with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
                m(x).pow(2).mean().backward()

        step()
        return saved_bytes(lambda: m(x).pow(2).mean().backward(), params + weights), shapes

    peft_inductor, _ = run(torch.compile(model))
    ours, shapes = run(torch.compile(model, backend="fxlora"))
    assert ours <= peft_inductor, (ours, peft_inductor)
    assert not {(32, 64), (64, 32)} & set(shapes), shapes  # no W' of either layer
    assert shapes
    assert fxlora.last_report().graphs[0].decisions and all(d.rewritten for d in fxlora.last_report().decisions_of("lora"))


def test_packed_cpu_weight_is_named():
    """A model run once in eval mode without gradients has its 4-bit weights repacked for CPU
    inference (bitsandbytes' `gemv_4bit` layout): not read, and explain says what to do."""
    model = qlora().eval()
    with torch.no_grad():
        model(**batch())
    model.train()
    report = fxlora.explain(model, **batch())
    assert not any(d.rewritten for d in report.decisions_of("lora"))
    assert "model.train() before the first forward" in str(report)
