"""Third-party adapters as shipped (issue 16): pyreft's interventions, torchtune's LoRALinear, and
LitGPT-/minLoRA-style modules; found, rewritten, loss and every trainable gradient equal eager.

pyreft 0.1.0 / pyvene 0.1.8 are installed `--no-deps` by `make install` (pyreft pins transformers
4.45); torchtune 0.6.1 with torchao 0.17 (pyproject's dev extra). A package that does not import
skips its tests with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxlora
from tests.helpers import assert_same_step, loss_and_grads
from tests.normalize.spellings import D_IN, D_OUT, R, lora_spelling, minlora_model

FP32 = dict(rtol=1e-4, atol=1e-5)


def _import(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return __import__(name, fromlist=["_"])
        except Exception as err:  # noqa: BLE001 -- any import failure is a skip with its reason
            pytest.skip(f"{name} does not import here ({type(err).__name__}: {err})")


def _step(model, x, inner="aot_eager", **options):
    torch._dynamo.reset()
    fxlora.clear_reports()
    compiled = torch.compile(model, backend="fxlora", options={"inner": inner, **options})
    return loss_and_grads(compiled, x)


class _OnLinear(nn.Module):
    """A frozen nn.Linear with an intervention on its whole output (pyreft's `mlp_output` on down_proj)."""

    def __init__(self, intervention, d_in=D_IN, d=D_OUT):
        super().__init__()
        self.base = nn.Linear(d_in, d)
        self.base.requires_grad_(False)
        self.intervention = intervention

    def forward(self, x):
        return self.intervention(self.base(torch.relu(x)))


def _pyreft(kind: str) -> nn.Module:
    pyreft = _import("pyreft")
    cls = {"loreft": pyreft.LoreftIntervention, "direft": pyreft.DireftIntervention}[kind]
    torch.manual_seed(0)
    return _OnLinear(cls(embed_dim=D_OUT, low_rank_dimension=R, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_pyreft_intervention_on_a_linear(kind):
    model, x = _pyreft(kind), torch.randn(2, 5, D_IN)
    report = fxlora.explain(model, x)
    (site,) = report.sites_of("reft")
    assert (site.kind, site.rank) == (kind, R) and not report.near_misses
    assert_same_step(loss_and_grads(model, x), _step(model, x, scaling_form="weight"), **FP32)
    (d,) = fxlora.last_report().decisions_of("reft")
    assert d.rewritten and d.chosen.form.name == "weight"


def _torchtune_llama(quantize_base=False):
    llama2 = _import("torchtune.models.llama2")
    peft = _import("torchtune.modules.peft")
    torch.manual_seed(0)
    # NF4 quantises in blocks of 64 with scalers in blocks of 256: every base weight a multiple of 16384
    dims = (dict(vocab_size=128, num_heads=4, num_kv_heads=2, embed_dim=64) if not quantize_base
            else dict(vocab_size=256, num_heads=4, num_kv_heads=4, embed_dim=128))
    model = llama2.lora_llama2(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        apply_lora_to_output=not quantize_base, num_layers=2, max_seq_len=64, lora_rank=4, lora_alpha=8,
        quantize_base=quantize_base, **dims,
    )
    peft.set_trainable_params(model, peft.get_adapter_params(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:  # B starts at zero: randomise it so A's gradient is not zero
                p.normal_(std=0.02)
    return model


class _TokensToLoss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(tokens).float().pow(2).mean()


def test_torchtune_lora_llama2_keeps_every_site():
    """torchtune's LoRALinear was found before issue 16: 15/15 sites, rewritten, exact, no rejection."""
    model = _TokensToLoss(_torchtune_llama())
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    report = fxlora.explain(model, tokens)
    assert len(report.sites) == 15 and not report.rejections and not report.near_misses
    assert_same_step(loss_and_grads(model, tokens), _step(model, tokens), **FP32)
    assert sum(d.rewritten for d in fxlora.last_report().graphs[0].decisions) == 15


def test_torchtune_qlora_llama2_keeps_every_site():
    """torchtune's QLoRA (`quantize_base=True`: torchao NF4Tensor bases read through `linear_nf4`):
    the `linear_4bit` rule spells each base `linear(x, W.to(float32))`; all 14 sites rewritten, exact."""
    model = _TokensToLoss(_torchtune_llama(quantize_base=True))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    report = fxlora.explain(model, tokens)
    assert len(report.sites) == 14 and not report.rejections, str(report)
    assert_same_step(loss_and_grads(model, tokens), _step(model, tokens), **FP32)
    assert sum(d.rewritten for d in fxlora.last_report().graphs[0].decisions) == 14


class _Zoo(nn.Module):
    """One model with every kind of third-party spelling: LitGPT's LoRA, a minLoRA parametrization,
    pyreft's LoReFT and torchtune's LoRALinear, for one end-to-end Inductor compile."""

    def __init__(self):
        super().__init__()
        self.litgpt = lora_spelling("litgpt")  # 16 -> 12
        self.minlora = minlora_model(D_OUT, D_OUT, layers=1)  # 12 -> 12
        self.reft = _pyreft("loreft")  # 16 -> 12 (D_IN -> D_OUT)
        self.proj = nn.Linear(D_OUT, D_IN)
        self.proj.requires_grad_(False)
        tt = _import("torchtune.modules.peft")
        self.tune = tt.LoRALinear(D_OUT, D_OUT, rank=R, alpha=8.0)
        self.tune.weight.requires_grad_(False)
        self.tune.bias.requires_grad_(False) if self.tune.bias is not None else None
        nn.init.normal_(self.tune.lora_b.weight, std=0.1)

    def forward(self, x):
        h = self.minlora(torch.relu(self.litgpt(x)))
        h = self.reft(self.proj(torch.relu(h)))
        return self.tune(torch.relu(h))


@pytest.mark.inductor
def test_every_spelling_end_to_end_under_inductor():
    torch.manual_seed(0)
    model, x = _Zoo(), torch.randn(2, 5, D_IN)
    ref = loss_and_grads(model, x)
    got = _step(model, x, inner="inductor", scaling_form="weight")
    assert_same_step(ref, got, rtol=1e-4, atol=1e-5)
    g = fxlora.last_report().graphs[0]
    assert sum(d.rewritten for d in g.result("lora").decisions) == 3  # litgpt, minlora, torchtune
    assert [d.rewritten for d in g.result("reft").decisions] == [True]  # pyreft's LoReFT


class _Pyvene(nn.Module):
    """pyreft through pyvene on a tiny HF Llama: `reft_model(base, unit_locations=...)` to a loss."""

    def __init__(self, component: str, positions):
        super().__init__()
        pyreft = _import("pyreft")
        from fxlora.testing.models import tiny_model

        torch.manual_seed(0)
        model = tiny_model("llama", layers=1, hidden=64)
        model.requires_grad_(False)
        intervention = pyreft.LoreftIntervention(embed_dim=64, low_rank_dimension=R, dtype=torch.float32)
        cfg = pyreft.ReftConfig(representations={"layer": 0, "component": component, "low_rank_dimension": R,
                                                 "intervention": intervention})
        self.reft = pyreft.get_reft_model(model, cfg, set_device=False)
        self.positions = positions

    def forward(self, ids):
        locations = [[self.positions] * ids.shape[0]]
        _, out = self.reft({"input_ids": ids}, unit_locations={"sources->base": (None, locations)})
        return out.logits.float().pow(2).mean()


@pytest.mark.slow  # ten graphs through pyvene's hooks: minutes on a shared CPU (`make test-all`)
@pytest.mark.parametrize("component, positions", [("mlp_output", list(range(8))), ("block_output", [0, 7])])
def test_pyreft_through_pyvene_is_exact_and_says_why(component, positions):
    """LoReFT on down_proj's output at every position, and pyreft's usual block_output at f1+l1: pyvene's
    hooks break the graph between the layer and the intervention, so nothing folds; explain says so."""
    model, ids = _Pyvene(component, positions), torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    report = fxlora.explain(model, ids)
    reasons = [r.reason for r in report.rejections if r not in report.rejections_of("lora")]
    assert any("not a linear layer's output in this graph" in r for r in reasons), reasons
    assert_same_step(loss_and_grads(model, ids), _step(model, ids), **FP32)


@pytest.mark.parametrize("method, why", [
    ("adalora", "computed in the graph (mul)"),  # A * E: the singular values scale A
    ("boft", "its weight is computed in the graph"),  # the butterfly rotation of W
    ("oft", "an input rotation"),  # R written in place (`R.add_`), applied to x by einsum
])
def test_peft_methods_no_kind_rewrites_are_near_misses(method, why):
    """PEFT's AdaLoRA, BOFT and OFT were silent (0 sites, 0 rejections); now each adapted layer says why."""
    peft = _import("peft")
    from fxlora.testing.models import tiny_model, token_batch

    cfg = {"adalora": lambda: peft.AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10),
           "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]),
           "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj"])}[method]()
    model = peft.get_peft_model(tiny_model("llama", layers=1), cfg)
    report = fxlora.explain(model, **token_batch(2, 8))
    assert not report.sites
    misses = report.near_misses
    assert len(misses) >= 2, misses  # q_proj and v_proj each
    assert any(why in m.reason for m in misses), [m.reason for m in misses]
