"""The LoRA site finder on tiny random-init HF models and hand-written modules."""

import pytest
import torch
import torch.nn as nn

import fxlora
from peft.tuners.lora import LoraLayer
from fxlora.testing.models import HandLoRALinear, tiny_model, token_batch, with_lora

LAYERS = 2
# Linears a layer: llama/qwen2 q,k,v,o,gate,up,down; gpt2 c_attn,c_proj,c_fc,c_proj; bert q,k,v,o,inter,out
# (+1 for BERT's MLM head transform, which "all-linear" adapts too).
ALL_LINEAR = {"llama": 7 * LAYERS, "qwen2": 7 * LAYERS, "gpt2": 4 * LAYERS, "bert": 6 * LAYERS + 1}
ATTENTION = {"llama": 4 * LAYERS, "qwen2": 4 * LAYERS, "gpt2": 1 * LAYERS, "bert": 3 * LAYERS}


def _explain(model, family="llama", seq=8):
    batch = token_batch(2, seq)
    if family == "bert":
        batch = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    return fxlora.explain(model, **batch)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("targets", ["all-linear", "attention"])
def test_site_count_per_family(family, targets):
    model = with_lora(tiny_model(family, layers=LAYERS), family, targets=targets, r=4)
    report = _explain(model, family)
    expected = (ALL_LINEAR if targets == "all-linear" else ATTENTION)[family]
    assert expected == sum(isinstance(m, LoraLayer) for m in model.modules())
    assert len(report.sites) == expected, str(report)
    assert not report.rejections, str(report)
    for site in report.sites:
        assert site.rank == 4 and site.a_trainable and site.b_trainable
        assert site.scaling == "4.0"  # lora_alpha 16 / r 4
        assert tuple(site.tokens) == (2, 8)


def test_llama_site_details_and_shared_inputs():
    model = with_lora(tiny_model("llama", hidden=64, intermediate=96, layers=1), "llama", r=8, dropout=0.1)
    report = _explain(model)
    by_module = {s.module.rsplit(".", 1)[-1]: s for s in report.sites}
    q, k, v = by_module["q_proj"], by_module["k_proj"], by_module["v_proj"]
    assert (q.in_features, q.out_features, k.out_features) == (64, 64, 32)  # 2 kv heads of 16
    assert by_module["down_proj"].in_features == 96
    assert q.input_group == k.input_group == v.input_group != by_module["o_proj"].input_group
    assert by_module["gate_proj"].input_group == by_module["up_proj"].input_group
    assert all(s.dropout_p == 0.1 and s.adapter == "default" for s in report.sites)
    assert all(s.base_kind == "linear" and not s.has_bias for s in report.sites)
    assert q.module.endswith("layers.0.self_attn.q_proj")
    text = str(report)
    assert "7 LoRA sites" in text and "2 shared-input groups" in text


def test_qwen2_attention_bias_and_gpt2_conv1d():
    qwen = _explain(with_lora(tiny_model("qwen2"), "qwen2", targets="attention"), "qwen2")
    biased = {s.module.rsplit(".", 1)[-1]: s.has_bias for s in qwen.sites}
    assert biased == {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False}

    gpt2 = _explain(with_lora(tiny_model("gpt2", hidden=64), "gpt2"), "gpt2")
    c_attn = next(s for s in gpt2.sites if s.module.endswith("c_attn"))
    assert c_attn.base_kind == "conv1d" and c_attn.has_bias
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)


def test_rslora_scaling_and_multi_adapter():
    from peft import LoraConfig

    model = with_lora(tiny_model("llama"), "llama", targets=["q_proj"], r=4, use_rslora=True)
    report = _explain(model)
    assert [s.scaling for s in report.sites] == ["8.0"]  # alpha 16 / sqrt(4)

    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["second"].weight)
    report = _explain(model)
    sites = sorted(report.sites, key=lambda s: s.stacked)
    assert [(s.adapter, s.rank, s.stacked) for s in sites] == [("default", 4, 0), ("second", 2, 1)]
    assert sites[1].nodes.base is sites[0].nodes.add
    assert sites[0].nodes.weight is sites[1].nodes.weight


def test_hand_written_lora_with_tensor_scale():
    model = nn.Sequential(HandLoRALinear(32, 48, r=4, bias=True), nn.GELU(), HandLoRALinear(48, 16, r=2, bias=False))
    report = fxlora.explain(model, torch.randn(3, 5, 32))
    assert [(s.in_features, s.out_features, s.rank, s.has_bias) for s in report.sites] == [
        (32, 48, 4, True),
        (48, 16, 2, False),
    ]
    assert all("Tensor" in s.scaling for s in report.sites)
    assert [s.module for s in report.sites] == ["0", "2"]


def test_dynamic_shapes_are_symbolic():
    model = nn.Sequential(HandLoRALinear(32, 48))
    captured = []
    from fxlora.backend import compile_graph
    from fxlora.config import Config

    compiled = torch.compile(
        model, dynamic=True, backend=lambda gm, ex: compile_graph(gm, ex, Config(inner="eager"), on_report=captured.append)
    )
    compiled(torch.randn(3, 5, 32))
    (site,) = captured[0].sites
    assert all(isinstance(d, torch.SymInt) for d in site.tokens)
    assert "s" in str(captured[0])  # sizes print as sympy symbols


# --- where it must not fire -----------------------------------------------------------


class _Escaping(HandLoRALinear):
    """The adapter's A(x) is also used elsewhere: rewriting the site would lose that use."""

    def forward(self, x):
        xa = self.down(x)
        return self.base(x) + self.scale * self.up(xa), xa.sum()


class _TrainableBase(HandLoRALinear):
    def __init__(self):
        super().__init__(16, 16)
        self.base.requires_grad_(True)


class _OtherInput(HandLoRALinear):
    def forward(self, x):
        # not `x * 2`: a scale on x is one more scale of the same site (fxlora.normalize)
        return self.base(x) + self.scale * self.up(self.down(torch.tanh(x)))


class _SharedDropout(HandLoRALinear):
    """Dropout on the shared input (the base reads it too): x is dropout(x), the adapter has none of its own."""

    def forward(self, x):
        h = self.drop(x)
        return self.base(h) + self.scale * self.up(self.down(h))


@pytest.mark.parametrize(
    "module, reason",
    [
        (_Escaping(16, 16), "A(x)"),
        (_TrainableBase(), "requires grad"),
        (_OtherInput(16, 16), "not the same input"),
    ],
)
def test_rejections_carry_reasons(module, reason):
    report = fxlora.explain(module, torch.randn(2, 16))
    assert not report.sites
    (rejection,) = report.rejections
    assert reason in rejection.reason
    assert reason in str(report)


def test_dropout_on_shared_input_is_part_of_x():
    module = _SharedDropout(16, 16, dropout=0.5).train()
    (site,) = fxlora.explain(module, torch.randn(2, 16)).sites
    assert site.dropout_p == 0.0 and site.nodes.dropout is None


def test_dora_is_not_lora_and_plain_linear_is_no_site():
    """A DoRA site's B(A(x)) is the DoRA kind's (tests/kinds/dora), never a LoRA site or look-alike."""
    model = with_lora(tiny_model("llama"), "llama", targets=["q_proj"], use_dora=True)
    report = _explain(model)
    assert [s.nodes.lora_A is not None for s in report.sites] == [True] and not report.rejections
    assert report.graphs[0].result("lora").match.sites == []

    plain = nn.Sequential(nn.Linear(16, 4, bias=False), nn.Linear(4, 16, bias=False))  # low rank, no base
    report = fxlora.explain(plain, torch.randn(2, 16))
    (rejection,) = report.rejections
    assert not report.sites and "the graph's output instead of" in rejection.reason
