"""Failures users of fused LoRA kernels hit, which fxlora must not repeat, and things fxlora
does not support: left untouched, the reason in explain, and still exact."""

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora.testing.models import HandLoRALinear, randomize_lora_B, tiny_model, token_batch, with_lora
from tests.helpers import assert_same_step
from tests.robustness.common import FP32, compiled, rejections, rewritten, step

FORMS = ["f1/b1", "f1/b3", "f2/b4", "f1/b5", "f1/b8", "f3/b9", "f2/b10", "f4/b1"]
# With dropout the adapter's dX carries the mask, so merged-weight forms (forward 2, dX "merged")
# are illegal; these are the legal ones.
DROPOUT_FORMS = ["f1/b1", "f1/b2", "f1/b3", "f1/b6", "f1/b10", "f1/b1+bits", "f1/b10+bits", "f4/b1+bits", "f4/b10"]


# --- failures of fused kernels -------------------------------------------------------


@pytest.mark.parametrize("tie", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["untied", "tied"])
def test_lora_on_lm_head_gets_its_gradient(tie):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    model = with_lora(tf.LlamaForCausalLM(cfg), "llama", r=4, targets=["q_proj", "lm_head"])
    batch = token_batch(2, 8)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(compiled(model), batch)
    assert_same_step(ref, got, **FP32)
    assert {"base_model.model.lm_head.lora_A.default.weight", "base_model.model.lm_head.lora_B.default.weight"} <= set(got[1])
    assert all(g.abs().sum() > 0 for g in got[1].values())
    assert any(s.module.endswith("lm_head") for s in fxlora.last_report().sites)
    assert len(rewritten()) == 2


class _VersionCheck:
    """saved_tensors_hooks that fail if a tensor saved for backward was written in place before use."""

    def __init__(self):
        self.saved = 0

    def pack(self, t):
        self.saved += 1
        return t, t._version

    @staticmethod
    def unpack(packed):
        t, version = packed
        assert t._version == version, "a tensor saved for backward was modified in place"
        return t


@pytest.mark.parametrize("form, p", [(f, 0.0) for f in FORMS] + [(f, 0.2) for f in DROPOUT_FORMS[1:]])
def test_no_in_place_write_into_a_tensor_saved_for_backward(form, p):
    model = HandLoRALinear(24, 20, r=4, dropout=p)
    fxlora.clear_reports()
    x = torch.randn(3, 5, 24, requires_grad=True)
    check = _VersionCheck()
    run = compiled(model, force_form=form)
    with torch.autograd.graph.saved_tensors_hooks(check.pack, check.unpack):
        torch.manual_seed(0)
        run(x).pow(2).sum().backward()
    assert check.saved > 0
    assert [d.chosen.form.name for d in rewritten()] == [form]


@pytest.mark.parametrize("form", DROPOUT_FORMS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_applied_in_dX(form, p):
    """dX of the adapter path must carry the forward's mask: (dY B A) * mask / (1-p) + dY W."""
    model = HandLoRALinear(24, 20, r=4, dropout=p)
    fxlora.clear_reports()
    x0 = torch.randn(6, 24)
    grads = []
    for run in (model, compiled(model, force_form=form)):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        run(x).pow(2).sum().backward()
        grads.append((x.grad, model.down.weight.grad.clone(), model.up.weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, **FP32)
    assert rewritten() and rewritten()[-1].chosen.form.name == form


# --- unsupported: left alone with a reason, still exact ---------------------------------


def _unsupported_case(name):
    from peft import LoraConfig, get_peft_model

    if name == "lora_bias":
        model = with_lora(tiny_model("llama", hidden=32), "llama", r=4, targets="attention", lora_bias=True)
        return model, token_batch(2, 8), "lora_B has a bias"
    if name == "embedding":
        model = get_peft_model(tiny_model("llama", hidden=32), LoraConfig(r=4, target_modules=["embed_tokens"]))
        randomize_lora_B(model)
        return model, token_batch(2, 8), "LoRA on an Embedding"
    if name == "conv2d":
        from tests.robustness.families import family_batch, family_model

        model = get_peft_model(family_model("vit"), LoraConfig(r=2, target_modules=["projection"]))
        randomize_lora_B(model)
        return model, family_batch("vit"), "LoRA on a Conv layer"
    raise ValueError(name)


@pytest.mark.parametrize(
    "name", ["embedding", "conv2d", pytest.param("lora_bias", marks=pytest.mark.slow)]
)
def test_unsupported_peft_variants_are_exact_and_explained(name):
    model, batch, reason = _unsupported_case(name)
    ref = step(model, batch)
    fxlora.clear_reports()
    got = step(compiled(model), batch)
    assert_same_step(ref, got, **FP32)
    assert not rewritten()
    why = [r.reason for r in rejections()]
    assert why and any(reason in r for r in why), why
    assert reason in str(fxlora.last_report())


class _QuantizedBase(HandLoRALinear):
    """A quantized base as bitsandbytes/torchao-style layers look in the graph: int8 weight, dequantized."""

    def __init__(self):
        super().__init__(16, 12, r=2)
        w = self.base.weight.detach()
        self.qscale = w.abs().max() / 127
        self.register_buffer("qweight", torch.round(w / self.qscale).to(torch.int8))

    def forward(self, x):
        weight = self.qweight.to(torch.float32) * self.qscale
        return nn.functional.linear(x, weight) + self.scale * self.up(self.down(x))


class _OpInsideBranch(HandLoRALinear):
    def __init__(self):
        super().__init__(16, 12, r=2)

    def forward(self, x):
        return self.base(x) + self.scale * torch.tanh(self.up(self.down(x)))


class _OpOnAdapterInput(HandLoRALinear):
    def __init__(self):
        super().__init__(16, 12, r=2)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(self.norm(x)))


@pytest.mark.parametrize(
    "model, reason",
    [
        (_QuantizedBase(), "not to a linear layer's output"),
        (_OpInsideBranch(), "flows into"),
        (_OpOnAdapterInput(), "not the same input"),
    ],
    ids=["quantized-base", "op-inside-branch", "op-on-adapter-input"],
)
def test_hand_written_look_alikes_are_left_alone(model, reason):
    x0 = torch.randn(4, 16)
    grads = []
    fxlora.clear_reports()
    for run in (model, compiled(model)):
        x = x0.clone().requires_grad_(True)
        out = run(x)
        out.pow(2).sum().backward()
        grads.append((out.detach(), x.grad, model.down.weight.grad.clone(), model.up.weight.grad.clone()))
        model.zero_grad(set_to_none=True)
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, **FP32)
    assert not rewritten()
    assert any(reason in r.reason for r in rejections()), rejections()


# --- options and models fxlora has nothing to do with --------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inner": "inductr"}, "'inner' must be one of"),
        ({"verfy": True}, "unknown fxlora option 'verfy'"),
        ({"verify": "yes"}, "'verify' must be True or False"),
        ({"flop_budget": -1}, "'flop_budget' must be a number >= 0"),
        ({"force_form": "f5/b1"}, "'force_form' must look like"),
        ({"inductor": {"no_such_key": 1}}, "unknown Inductor config keys"),
        (["inner", "eager"], "options must be a dict or fxlora.Config"),
    ],
)
def test_bad_options_fail_at_compile_time_with_the_key_named(options, message):
    run = torch.compile(nn.Linear(4, 4), backend="fxlora", options=options)
    with pytest.raises(Exception) as caught:
        run(torch.randn(2, 4))
    assert message in str(caught.value)


def test_bad_mode_names_it():
    run = torch.compile(nn.Linear(4, 4), backend="fxlora", mode="max-autotun")
    with pytest.raises(Exception, match="'mode' must be one of"):
        run(torch.randn(2, 4))


def test_model_without_adapters_is_a_logged_no_op():
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    model = tiny_model("llama", hidden=32)
    batch = token_batch(2, 8)
    ref = step(model, batch)
    fxlora.clear_reports()
    logger, handler = logging.getLogger("fxlora"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        got = step(compiled(model), batch)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert_same_step(ref, got, **FP32)
    report = fxlora.last_report()
    assert not report.sites and not rejections(report)
    # A fully trainable model's norm weights look like IA3 input scaling on a trainable W: they
    # are named as rejected look-alikes (never rewritten); the summary line says nothing was.
    summary = [m for m in handler.messages if m.startswith("fxlora: graph 0/0: ")]
    assert summary and " sites, 0 rewritten" in summary[0] and "LoRA" not in summary[0], handler.messages


def test_plain_conv_stacks_and_embedding_projections_are_not_reported_as_adapters():
    """Must not fire: the Conv/Embedding look-alike notes need a rank below both sides and, for
    conv, a pointwise up-projection; an ordinary CNN or a tied-embedding projection is no adapter."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
            self.emb, self.proj = nn.Embedding(32, 16), nn.Parameter(torch.randn(16, 24))

        def forward(self, img, ids):
            return self.c2(self.c1(img)).sum() + (self.emb(ids) @ self.proj).sum()

    model = Plain()
    report = fxlora.explain(model, torch.randn(1, 3, 8, 8), torch.randint(0, 32, (2, 5)))
    assert not report.rejections and not report.sites
