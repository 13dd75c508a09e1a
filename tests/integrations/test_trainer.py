"""Hugging Face Trainer and gradient checkpointing under backend="fxlora": same training as eager PEFT."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_lora



class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {k: v[0] for k, v in token_batch(1, 16, seed=i).items()}


def _train(compile_backend, *, checkpointing=False):
    """Two optimizer steps of two micro-batches each; returns the losses logged and the adapter weights."""
    import transformers as tf

    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    args = tf.TrainingArguments(
        output_dir="unused", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0,
        gradient_checkpointing=checkpointing, torch_compile_backend=compile_backend,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return losses, adapters, trainer.model


def _assert_same_training(ref, got):
    assert len(got[0]) == len(ref[0]) == 2
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == ref[1].keys() and ref[1]
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_trainer_torch_compile_backend_fxlora(clean_environ, monkeypatch, checkpointing):
    """The real path: TrainingArguments(torch_compile_backend="fxlora") -> accelerate -> torch.compile."""
    monkeypatch.setenv("FXLORA_OPTIONS", '{"inner": "aot_eager"}')  # Trainer passes no options; skip codegen
    ref = _train(None)
    torch._dynamo.reset()
    fxlora.clear_reports()
    got = _train("fxlora", checkpointing=checkpointing)
    _assert_same_training(ref, got)
    graphs = fxlora.last_report().graphs
    assert graphs, "Trainer never reached the fxlora backend"
    if checkpointing:
        # The layer runs inside Dynamo's checkpoint op: its sites are found and rewritten in the body.
        assert sum(len(r.sites) for g in graphs for r in g.regions) == 7
        assert all(d.rewritten for g in graphs for r in g.regions for d in r.decisions)
    else:
        assert sum(len(g.sites) for g in graphs) == 7
        assert all(d.rewritten for g in graphs for d in g.decisions)
    # every adapter layer accounted for, from the model the Trainer holds (accelerate compiled it)
    assert str(fxlora.account(got[2])).splitlines()[0] == "adapter layers: 7 in the model, 7 seen by fxlora, 7 rewritten"


def test_import_fxlora_registers_with_accelerate_before_and_after():
    from accelerate.utils.dataclasses import DynamoBackend, TorchDynamoPlugin

    assert DynamoBackend("FXLORA").value.lower() == "fxlora"  # accelerate already loaded: patched on import
    plugin = TorchDynamoPlugin(backend="fxlora")
    assert plugin.to_kwargs()["backend"] == "fxlora"
    script = textwrap.dedent(
        """
        import fxlora, sys
        assert "accelerate.utils.dataclasses" not in sys.modules
        from accelerate.utils.dataclasses import DynamoBackend
        print(DynamoBackend("FXLORA").value)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "FXLORA"


def test_options_from_environment(monkeypatch):
    monkeypatch.setenv("FXLORA_OPTIONS", '{"objective": "flops"}')
    assert fxlora.Config.from_options(None).objective == "flops"
    assert fxlora.Config.from_options({}).objective == "time"  # explicit options win
    monkeypatch.setenv("FXLORA_OPTIONS", '{"objectiv": "flops"}')
    with pytest.raises(ValueError, match="unknown fxlora option 'objectiv'"):
        fxlora.Config.from_options(None)
    monkeypatch.setenv("FXLORA_OPTIONS", "flops")
    with pytest.raises(ValueError, match="FXLORA_OPTIONS must be a JSON object"):
        fxlora.Config.from_options(None)
