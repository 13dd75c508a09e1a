"""Every adapter layer accounted for (fxlora/accounting.py, fxlora/breaks.py): how many the model has,
how many fxlora saw and rewrote, and for the others why, down to the Dynamo graph break that cut
them out and what to do about it."""

import json

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora.accounting import account, adapter_layers
from fxlora.testing.models import HandLoRALinear, tiny_model, token_batch, with_lora
from tests.helpers import compiled

FAST = {"objective": "flops"}  # no form timing: these tests are about the report


def _train_step(model, batch):
    out = model(**batch)
    out.loss.backward()


def _zero_site_graphs_say_why(report):
    """No graph summary may stand at a bare "0 adapter sites"."""
    for g in report.graphs:
        line = g.format().splitlines()[0]
        if "0 adapter sites" in line:
            assert "0 adapter sites: " in line and len(line.split("0 adapter sites: ")[1]) > 10, line


def test_lora_llama_every_layer_seen_and_rewritten():
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    fxlora.clear_reports()
    run = compiled(model, **FAST)
    _train_step(run, token_batch(2, 8))
    text = str(fxlora.account(run))
    assert text.splitlines()[0] == "adapter layers: 7 in the model, 7 seen by fxlora, 7 rewritten", text
    # the same layers, whichever module is given: the compiled wrapper, the PeftModel, the HF model inside
    for given, prefix in ((run, "base_model.model."), (model, "base_model.model."), (model.base_model.model, "")):
        a = account(given)
        assert len(a.rewritten) == 7
        assert {x.path for x in a.layers} == {prefix + p for p, _ in adapter_layers(model.base_model.model)}


def test_explain_ends_with_the_accounting():
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4, targets="attention")
    report = fxlora.explain(model, **token_batch(2, 8), options=FAST)
    assert report.accounting is not None and len(report.accounting.rewritten) == 4
    assert str(report).splitlines()[-1] == "adapter layers: 4 in the model, 4 seen by fxlora, 4 rewritten"


def _checkpointed(layers=2):
    """As tests/integrations/test_checkpoint.py: HF gradient checkpointing on a LoRA Llama (transformers 5.25:
    every decoder layer's attention sets the kernels package's CompileableContextVar)."""
    model = with_lora(tiny_model("llama", layers=layers), "llama", r=4)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@pytest.mark.parametrize("how", ["options", "env"])
def test_checkpointed_layers_cut_out_by_a_graph_break_are_named(how, monkeypatch):
    """skip_checkpoint_side_effects off: Dynamo refuses the side effect inside each checkpointed layer and runs
    the layer uncompiled; fxlora sees none of its adapters. The accounting names the break, the layers, the fix."""
    model = _checkpointed()
    options = {"inner": "aot_eager", "skip_checkpoint_side_effects": False, **FAST}
    if how == "env":  # as the Trainer/TRL path gets them: no options in code
        monkeypatch.setenv("FXLORA_OPTIONS", json.dumps(options))
    fxlora.clear_reports()
    run = torch.compile(model, backend="fxlora", options=None if how == "env" else options)
    _train_step(run, token_batch(2, 16))
    report = fxlora.last_report()
    a = fxlora.account(run)
    assert (len(a.layers), len(a.seen), len(a.rewritten)) == (14, 0, 0)
    assert all(x.breaks and x.breaks[0].gb_type == "HOP: Unsafe side effect" for x in a.unseen)
    text = str(a)
    assert text.splitlines()[0] == "adapter layers: 14 in the model, 0 seen by fxlora, 0 rewritten"
    for needed in ("never in a graph fxlora compiled (14)", "HOP: Unsafe side effect",
                   "Attempted to mutate UserDefinedObjectVariable(CompileableContextVar)", "LlamaDecoderLayer",
                   "base_model.model.model.layers.0.self_attn: q_proj, k_proj, v_proj, o_proj",
                   "base_model.model.model.layers.1.mlp: gate_proj, up_proj, down_proj",
                   "set skip_checkpoint_side_effects=True (fxlora's default", "docs/checkpointing.md"):
        assert needed in text, (needed, text)
    assert "HOP: Unsafe side effect" in str(report)  # the graph-break section of last_report()
    _zero_site_graphs_say_why(report)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_lokr_split_by_their_random_branch_are_explained(method):
    """PEFT's LoHa/LoKr draw torch.rand(1) for module_dropout in every training forward (even at 0): Dynamo breaks
    the graph in every adapted layer. No kind claims them; the accounting says so and names the break."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    config = {"loha": LoHaConfig, "lokr": LoKrConfig}[method](r=4, target_modules=["q_proj", "v_proj"],
                                                              module_dropout=0.1)
    model = get_peft_model(tiny_model("llama", layers=1), config).train()
    fxlora.clear_reports()
    run = compiled(model, **FAST)
    _train_step(run, token_batch(2, 8))
    report = fxlora.last_report()
    a = fxlora.account(run)
    assert (len(a.layers), len(a.seen), len(a.rewritten)) == (2, 2, 0)
    assert {x.status for x in a.layers} == {"unclaimed"}
    text = str(a)
    for needed in (f"no kind claims them, so fxlora does not rewrite them (2): peft.tuners.{method}.layer.Linear "
                   f"({method.upper()})", "Data-dependent branching", "torch.rand(1) > module_dropout",
                   "whatever module_dropout is, even 0"):
        assert needed in text, (needed, text)
    assert len(report.graphs) > 3  # each adapted layer split into pieces
    _zero_site_graphs_say_why(report)
    assert any("no kind claims its trainable parameters" in g.format() for g in report.graphs)


def test_a_layer_that_never_ran_compiled_says_so():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = HandLoRALinear(8, 8, r=2), HandLoRALinear(8, 8, r=2)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    assert [p for p, _ in adapter_layers(model)] == ["used", "unused"]  # no PEFT: modules owning adapters
    report = fxlora.explain(model, torch.randn(3, 8), options=FAST)
    layers = {x.path: x for x in report.accounting.layers}
    assert layers["used"].status == "rewritten"
    assert layers["unused"].status == "unseen" and "did not run under torch.compile" in layers["unused"].reason


def test_graph_breaks_of_other_backends_are_not_recorded():
    def fn(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    fxlora.clear_reports()
    torch.compile(fn, backend="aot_eager")(torch.randn(3))
    assert not fxlora.last_report().breaks
    torch._dynamo.reset()
    torch.compile(fn, backend="fxlora", options={"inner": "eager"})(torch.randn(3))
    breaks = fxlora.last_report().breaks
    assert breaks and "graph_break" in breaks[0].where
    graphs = fxlora.last_report().graphs
    assert "Dynamo ended this graph at a graph break" in graphs[0].format()
    assert all("0 adapter sites: no adapter layer in this graph: it reads no parameter" in g.format() for g in graphs)


class _BreaksInside(HandLoRALinear):
    """A LoRA layer whose forward graph-breaks after the adapter: Dynamo traces its frame on its own."""

    def forward(self, x):
        y = super().forward(x)
        torch._dynamo.graph_break()
        return y


def test_a_graph_reused_for_same_shaped_layers_accounts_for_each():
    """Dynamo compiles the broken frame once, for `first`, and runs that graph for `second` too (its guards check
    the module's type and shapes, not which instance): both layers are seen and rewritten."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = _BreaksInside(8, 8, r=2), _BreaksInside(8, 8, r=2)

        def forward(self, x):
            return self.second(self.first(x))

    model = Two()
    fxlora.clear_reports()
    run = compiled(model, **FAST)
    run(torch.randn(3, 8, requires_grad=True)).sum().backward()  # both layers see an input that needs grad
    roots = {g.frame_module() for g in fxlora.last_report().graphs if g.sites}
    assert roots == {model.first}  # one graph with the site, compiled for the first layer only
    layers = {x.path: x for x in fxlora.account(run).layers}
    assert layers["first"].status == layers["second"].status == "rewritten"
    assert "compiled for first and reuses here" in layers["second"].reason


def test_layers_of_a_graph_left_untouched_say_why(monkeypatch):
    def boom(gm, config):
        raise RuntimeError("no passes today")

    monkeypatch.setattr(fxlora.backend, "run_pipeline", boom)
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4, targets="attention")
    fxlora.clear_reports()
    run = compiled(model, **FAST)
    _train_step(run, token_batch(2, 8))
    a = fxlora.account(run)
    assert len(a.seen) == 4 and not a.rewritten
    assert all(x.status == "kept" and "left untouched: passes failed (RuntimeError: no passes today)" in x.reason
               for x in a.layers)
