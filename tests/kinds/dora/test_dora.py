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


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow), "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_peft_dora_is_exact(family, dropout):
    """Llama (no bias), Qwen2 (q/k/v biases), GPT-2 (Conv1D, fan_in_fan_out), with and without dropout."""
    batch = token_batch(2, 8)
    ref = step(peft_dora(family, dropout), batch)
    counters.clear()
    torch._dynamo.reset()
    fxlora.clear_reports()
    got = step(compiled(peft_dora(family, dropout), objective="saved_bytes"), batch)  # no timing at toy sizes
    sites, rewritten = _counts()
    assert sites > 0 and rewritten == sites, (sites, rewritten)
    assert any("magnitude" in name for name in got[1])
    forms = {d.chosen.form.name for d in fxlora.last_report().decisions_of("dora")}
    assert (forms == {"sparse-mask"}) == bool(dropout), forms  # PEFT's dropout: its mask drawn by the op
    assert_same_step(ref, got, **FP32)


@pytest.mark.parametrize("dropout", [0.0, pytest.param(0.05, marks=pytest.mark.slow)])
def test_peft_dora_bf16(dropout):
    batch = token_batch(2, 8)
    ref = step(peft_dora("llama", dropout).to(torch.bfloat16), batch)
    counters.clear()
    torch._dynamo.reset()
    got = step(compiled(peft_dora("llama", dropout).to(torch.bfloat16)), batch)
    assert _counts()[1] == _counts()[0] > 0
    assert_same_step(ref, got, **BF16)


def test_lora_does_not_claim_half_a_dora_site():
    """B(A(x)) of a DoRA site is LoRA-shaped: the site is DoRA's, and LoRA names no look-alike in it."""
    report = fxlora.explain(peft_dora("llama"), **token_batch(2, 8), options={"inner": "aot_eager"})
    graph = report.graphs[0]
    assert graph.result("dora").match.sites and not graph.result("lora").match.sites
    assert not graph.rejections, str(report)
    assert "DoRA" in str(report) and "magnitude" in str(report)


def test_other_backends_trace_peft_dora_as_before():
    """fxlora's tracing changes (class names as constants, Parameter(frozen view)) are its compiles' only."""
    from peft import LoraConfig

    from fxlora.testing.peft_custom import custom_model

    model, x = custom_model("MLP", LoraConfig(target_modules=["lin0"], use_dora=True))
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x).graph_break_count > 0


# --- torchtune's DoRALinear and a hand-written spelling ---------------------------------------


class Stack(nn.Module):
    """Two adapted layers and a head, so x, the layer inputs and every parameter see gradients."""

    def __init__(self, make, dims=(16, 24, 12)):
        super().__init__()
        self.first, self.second = make(dims[0], dims[1]), make(dims[1], dims[2])

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _torchtune(in_dim, out_dim, dropout=0.0, bias=True):
    from torchtune.modules.peft import DoRALinear

    layer = DoRALinear(in_dim, out_dim, rank=4, alpha=8, dropout=dropout, use_bias=bias)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0, 0.1)
    layer.initialize_dora_magnitude()
    with torch.no_grad():
        layer.magnitude.mul_(1.1)
    layer.weight.requires_grad_(False)
    if bias:
        layer.bias.requires_grad_(False)
    return layer


class HandDoRA(nn.Module):
    """DoRA as someone writes it from the paper: `@`, `vector_norm`, `unsqueeze`, the scale inside."""

    def __init__(self, in_dim, out_dim, rank=4, s=2.0, detach=True, frozen=True):
        super().__init__()
        self.W = nn.Parameter(torch.randn(out_dim, in_dim) / in_dim**0.5, requires_grad=not frozen)
        self.A = nn.Parameter(torch.randn(rank, in_dim) * 0.1)
        self.B = nn.Parameter(torch.randn(out_dim, rank) * 0.1)
        self.m = nn.Parameter(self.W.detach().norm(dim=1) * 1.1)
        self.s, self.detach = s, detach

    def forward(self, x):
        delta = self.s * (self.B @ self.A)
        norm = torch.linalg.vector_norm(self.W + (delta.detach() if self.detach else delta), dim=1)
        c = (self.m / (norm.detach() if self.detach else norm)).unsqueeze(0)
        base = x @ self.W.T
        lora = (x @ self.A.T) @ self.B.T
        return base + ((c - 1) * base + c * (lora * self.s))


@pytest.mark.parametrize("spelling, dropout", [("torchtune", 0.0), ("torchtune", 0.1), ("torchtune-nobias", 0.0), ("hand", 0.0)])
def test_other_spellings_are_exact(spelling, dropout):
    def make(i, o):
        if spelling == "hand":
            return HandDoRA(i, o)
        return _torchtune(i, o, dropout, bias=spelling == "torchtune")

    torch.manual_seed(0)
    model = Stack(make)
    x = torch.randn(3, 5, 16, requires_grad=True)
    ref = step(model, x)
    counters.clear()
    torch._dynamo.reset()
    got = step(compiled(model), x)
    assert _counts() == (2, 2)
    assert_same_step(ref, got, **FP32)


@pytest.mark.parametrize("variant, why", [
    ("not detached", "not detached"),
    ("trainable W", "requires grad"),
    ("c read elsewhere", "read by"),
])
def test_left_alone_with_a_reason(variant, why):
    class Escapes(HandDoRA):
        def forward(self, x):
            y = super().forward(x)
            c = self.m / torch.linalg.vector_norm(self.W + self.s * (self.B @ self.A).detach(), dim=1).detach()
            return y, c

    torch.manual_seed(0)
    layer = {"not detached": lambda: HandDoRA(16, 24, detach=False),
             "trainable W": lambda: HandDoRA(16, 24, frozen=False)}.get(variant, lambda: None)()
    if variant == "c read elsewhere":  # one c, read by the site and returned
        layer = _SharedScale(16, 24)
    report = fxlora.explain(layer, torch.randn(2, 16), options={"inner": "aot_eager"})
    text = str(report)
    assert "0 DoRA sites" in text or "0 rewritten" in text, text
    assert why in text, text


class _SharedScale(HandDoRA):
    def forward(self, x):
        norm = torch.linalg.vector_norm(self.W + (self.s * (self.B @ self.A)).detach(), dim=1).detach()
        c = (self.m / norm).unsqueeze(0)
        base = x @ self.W.T
        lora = (x @ self.A.T) @ self.B.T
        return base + ((c - 1) * base + c * (lora * self.s)), c


def test_inside_checkpointed_layers():
    """HF gradient checkpointing (Trainer's default): DoRA sites in each region, dropout traced, exact."""
    def make():
        model = peft_dora("llama", 0.05)
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    batch = token_batch(2, 8)
    ref = step(make(), batch)
    counters.clear()
    torch._dynamo.reset()
    fxlora.clear_reports()
    got = step(compiled(make()), batch)
    assert _counts()[1] == _counts()[0] == 7
    assert "sparse-mask" not in {d.chosen.form.name for d in fxlora.last_report().decisions_of("dora")}
    assert_same_step(ref, got, **FP32)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_dora_on_two_ranks(tmp_path, parallel):
    """DDP (the graph split into buckets after the rewrite) and FSDP2 (no weight copy outlives forward), as for LoRA."""
    from tests.distributed.ranks import ddp_worker, fsdp_worker, run_ranks, single_process_step

    if parallel == "ddp":
        ranks = run_ranks(ddp_worker, tmp_path, bucket_mb=0.001, dora=True)
    else:
        ranks = run_ranks(fsdp_worker, tmp_path, probe_saved=True, dora=True)
    ref = single_process_step(dora=True)
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), **FP32)
        assert got["fallbacks"] == [] and got["sites"] == got["rewritten"] == 14, got["text"]


def test_only_a_frozen_weights_view_becomes_a_traced_parameter():
    """`nn.Parameter(W.T)` of a frozen W traces as the view under fxlora; a Parameter made of a new
    tensor in forward (a lazily created weight) still graph-breaks, as it does under any backend."""
    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 4), requires_grad=False)

        def forward(self, x):
            view = nn.Parameter(self.W.T)  # PEFT's transpose(weight, fan_in_fan_out)
            made = nn.Parameter(torch.ones(4))
            return x @ view * made

    counters.clear()
    torch._dynamo.reset()
    torch.compile(Lazy(), backend="fxlora", options={"inner": "aot_eager"})(torch.randn(2, 4))
    reasons = " ".join(str(k) for k in counters["graph_break"])
    assert "Parameter" in reasons and counters["stats"]["unique_graphs"] >= 1, dict(counters["graph_break"])


@pytest.mark.slow
def test_dora_over_a_4bit_base_is_exact_and_named():
    """QLoRA + DoRA (PEFT dequantises the 4-bit W in its own code for the norm): not rewritten yet;
    it trains exactly as traced and every layer's reason names DoRA's magnitude."""
    pytest.importorskip("bitsandbytes")
    from fxlora.testing.models import quantized_4bit

    def make():
        return with_lora(quantized_4bit(tiny_model("llama", hidden=64, layers=1), "nf4"), "llama", r=4,
                         use_dora=True).train()

    batch = token_batch(2, 8)
    ref = step(make(), batch)
    torch._dynamo.reset()
    assert_same_step(ref, step(compiled(make()), batch), **FP32)
    report = fxlora.explain(make(), **batch, options={"inner": "aot_eager"})
    assert report.accounting.layers and all("DoRA" in layer.reason for layer in report.accounting.layers)
