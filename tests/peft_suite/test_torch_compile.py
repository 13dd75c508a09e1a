"""PEFT's own torch.compile suite (PEFT's tests/test_torch_compile.py, "a document of how well torch.compile is
supported by PEFT"), re-created offline: a tiny random-init OPT instead of the hub's tiny-random-OPTForCausalLM,
token ids instead of the quotes data set.

Every setting trains 5 AdamW steps in a plain loop under each backend, then `save_pretrained` /
`PeftModel.from_pretrained` without compile must give the same logits and `generate` tokens; fxlora's losses must
equal the reference backend's. Multi-adapter add/set/delete and `disable_adapter` run compiled in eval.
Run by `make test-peft` (slow). The reference is aot_eager and fxlora runs with inner="aot_eager" (AOTAutograd
without codegen: a CPU-sized run); FXLORA_PEFT_SUITE_INNER=inductor compiles both with Inductor.
docs/peft-suite.md has the table.
"""

import json
import os

import pytest
import torch

import fxlora

peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")
from peft import (  # noqa: E402
    AdaLoraConfig, BOFTConfig, IA3Config, LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftModel,
    TaskType, VeraConfig, get_peft_model,
)

pytestmark = pytest.mark.slow

INNER = os.environ.get("FXLORA_PEFT_SUITE_INNER", "aot_eager")
REFERENCE = "inductor" if INNER == "inductor" else "aot_eager"
BACKENDS = {REFERENCE: {"backend": REFERENCE}, "fxlora": {"backend": "fxlora", "options": {"inner": INNER}}}
RESULTS = os.environ.get("FXLORA_PEFT_SUITE_RESULTS")  # a JSON-lines file the docs table is made from
CAUSAL = TaskType.CAUSAL_LM

# PEFT's SETTINGS, same configs (PEFT's defaults pick OPT's modules); AdaLoRA gets its total_step.
SETTINGS = {
    "adalora": lambda: AdaLoraConfig(task_type=CAUSAL, total_step=5),
    "boft": lambda: BOFTConfig(task_type=CAUSAL),
    "dora": lambda: LoraConfig(task_type=CAUSAL, use_dora=True),
    "ia3": lambda: IA3Config(task_type=CAUSAL),
    "ln_tuning": lambda: LNTuningConfig(task_type=CAUSAL, target_modules=["final_layer_norm"]),
    "loha": lambda: LoHaConfig(task_type=CAUSAL, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: LoKrConfig(task_type=CAUSAL, target_modules=["q_proj", "v_proj"]),
    "lora": lambda: LoraConfig(task_type=CAUSAL),
    "lora-target-embeddings": lambda: LoraConfig(task_type=CAUSAL, target_modules=["embed_tokens"]),
    "lora-with-modules-to-save": lambda: LoraConfig(task_type=CAUSAL, modules_to_save=["embed_tokens"]),
    "oft": lambda: OFTConfig(task_type=CAUSAL, target_modules=["q_proj", "v_proj"]),
    "vera": lambda: VeraConfig(task_type=CAUSAL),
}
VOCAB, SEQ, BATCH, STEPS = 256, 16, 4, 5
ATOL = RTOL = 1e-4  # PEFT's


def tiny_opt(seed: int = 0):
    """A random-init OPT shaped like hf-internal-testing/tiny-random-OPTForCausalLM (built here, nothing downloaded)."""
    torch.manual_seed(seed)
    config = tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=4 * 16, num_attention_heads=4,
                          word_embed_proj_dim=16, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                          pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return tf.OPTForCausalLM(config)


def batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def _report_kinds() -> dict:
    report = fxlora.last_report()
    lora = report.decisions_of("lora")
    scaling = [d for d in report.decisions if d.kind != "lora"]
    other_kinds = sorted({r.kind.name for g in report.graphs for r in g.kinds if r.kind.name != "lora" and r.match.sites})
    others = [s for k in other_kinds for s in report.sites_of(k)]
    kinds = {getattr(s, "kind", None) or k for k in other_kinds for s in report.sites_of(k)}
    return {"lora_sites": len(report.sites_of("lora")), "lora_rewritten": sum(d.rewritten for d in lora),
            "other_sites": len(others), "other_rewritten": sum(d.rewritten for d in scaling),
            "other_kinds": sorted(kinds),
            "kept": sorted({d.reason for d in [*lora, *scaling] if not d.rewritten})[:3],
            "rejected": sorted({r.reason for r in report.rejections})[:3],
            "fallback": sorted({g.fallback for g in report.graphs if g.fallback})[:2]}


def _record(**row) -> None:
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")


def _train_loop(setting, backend, tmp_path):
    torch._dynamo.reset()
    fxlora.clear_reports()
    model = get_peft_model(tiny_opt(), SETTINGS[setting]())
    compiled = torch.compile(model, **BACKENDS[backend])
    sample = batches()[0][:1]
    model.eval()
    with torch.inference_mode():
        before = compiled(sample).logits
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # PEFT: 1e-3 on its hub model; tiny random init needs more to move
    losses = []
    for step, ids in enumerate(batches()):
        optimizer.zero_grad()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if setting == "adalora":
            model.base_model.update_and_allocate(step)
    kinds = _report_kinds() if backend == "fxlora" else {}
    model.eval()
    with torch.inference_mode():
        after = compiled(sample).logits
        tokens = model.generate(sample, max_new_tokens=5, do_sample=False)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after, atol=ATOL, rtol=RTOL), "training changed nothing"
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_opt(), tmp_path)
    loaded.eval()
    with torch.inference_mode():
        loaded_logits = loaded(sample).logits
        loaded_tokens = loaded.generate(sample, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(loaded_logits, after, atol=ATOL, rtol=RTOL)
    assert loaded_tokens.tolist() == tokens.tolist()
    return losses, kinds


_REFERENCE_LOSSES: dict = {}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_loop_compile(setting, backend, tmp_path):
    """PEFT's test_causal_lm_training_pytorch_compile; fxlora also trains as the reference backend does."""
    try:
        losses, kinds = _train_loop(setting, backend, tmp_path)
    except Exception as err:
        _record(setting=setting, backend=backend, test="loop", passed=False, error=f"{type(err).__name__}: {err}"[:300])
        raise
    _record(setting=setting, backend=backend, test="loop", passed=True, losses=losses, **kinds)
    if backend == REFERENCE:
        _REFERENCE_LOSSES[setting] = losses
    elif setting in _REFERENCE_LOSSES:
        torch.testing.assert_close(losses, _REFERENCE_LOSSES[setting], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_multiple_lora_adapters_compile(backend):
    """PEFT's test_causal_lm_multiple_lora_adapter_compile (fp32 here): add, set and delete adapters."""
    model = get_peft_model(tiny_opt(), LoraConfig(task_type=CAUSAL, init_lora_weights=False)).eval()
    sample = batches()[0][:1]
    with torch.inference_mode():
        with model.disable_adapter():
            base = model(sample).logits
    compiled = torch.compile(model, **BACKENDS[backend])
    model.add_adapter("other", LoraConfig(task_type=CAUSAL, init_lora_weights=False))
    with torch.inference_mode():
        default = compiled(sample).logits
        model.set_adapter("other")
        other = compiled(sample).logits
        model.delete_adapter("other")
        model.set_adapter("default")
        after_delete = compiled(sample).logits
    assert not torch.allclose(base, default, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(base, other, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(default, other, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(after_delete, default, atol=ATOL, rtol=RTOL)
    _record(setting="lora-multi-adapter", backend=backend, test="multi", passed=True)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_disable_lora_adapter_compile(backend):
    """PEFT's test_causal_lm_disable_lora_adapter_compile (fp32 here)."""
    base_model = tiny_opt().eval()
    sample = batches()[0][:1]
    with torch.inference_mode():
        base = base_model(sample).logits
    model = get_peft_model(base_model, LoraConfig(task_type=CAUSAL, init_lora_weights=False)).eval()
    compiled = torch.compile(model, **BACKENDS[backend])
    with torch.inference_mode():
        adapted = compiled(sample).logits
        with model.disable_adapter():
            disabled = compiled(sample).logits
    assert not torch.allclose(base, adapted, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(disabled, base, atol=ATOL, rtol=RTOL)
    _record(setting="lora-disable-adapter", backend=backend, test="disable", passed=True)
