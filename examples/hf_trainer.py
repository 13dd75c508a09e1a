"""An unchanged Hugging Face Trainer + PEFT LoRA script: the only fxlora in it is `torch_compile_backend="fxlora"`.

There is no `import fxlora`: the start-up hook the package installs (fxlora_startup.pth)
makes accelerate accept the name, and torch.compile finds the backend by its entry point.
Nothing is downloaded (random-init tiny Llama, synthetic data).

    FXLORA_LOG=info python examples/hf_trainer.py                # Inductor (a minute of compiling on a CPU)
    FXLORA_OPTIONS='{"inner": "aot_eager"}' FXLORA_LOG=info python examples/hf_trainer.py --checkpointing
"""

import argparse

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count upward modulo the vocabulary: learnable in a few steps."""

    def __init__(self, n=64, seq=64, vocab=128):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = (i * 7 + torch.arange(self.seq)) % self.vocab
        return {"input_ids": ids, "labels": ids}


def tiny_llama_with_lora(seed: int = 0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, use_cache=False)
    model = tf.LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="gradient_checkpointing=True (HF's defaults)")
    parser.add_argument("--backend", default="fxlora")
    args = parser.parse_args()

    training = tf.TrainingArguments(
        output_dir="trainer_out", max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        gradient_checkpointing=args.checkpointing,
        torch_compile=True, torch_compile_backend=args.backend,  # <- the change
    )
    trainer = tf.Trainer(model=tiny_llama_with_lora(), args=training, train_dataset=CountingTokens())
    trainer.train()
    print("losses:", [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h])


if __name__ == "__main__":
    main()
