"""Hugging Face Trainer + PEFT LoRA under backend="fxlora": the script is unchanged but for `import fxlora`
and `torch_compile_backend="fxlora"`. Nothing is downloaded (random-init tiny Llama, synthetic data).

    python examples/hf_trainer.py                           # Inductor (minutes of compiling on a CPU)
    FXLORA_OPTIONS='{"inner": "aot_eager"}' FXLORA_LOG=info python examples/hf_trainer.py --checkpointing
"""

import argparse

import torch
import transformers as tf

import fxlora  # registers "fxlora" with accelerate, whose DynamoBackend list would otherwise refuse it
from fxlora.testing.models import tiny_model, with_lora


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count upward modulo the vocabulary: learnable in a few steps."""

    def __init__(self, n=64, seq=64, vocab=128):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = (i * 7 + torch.arange(self.seq)) % self.vocab
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="gradient_checkpointing=True (use_reentrant=False)")
    args = parser.parse_args()

    model = with_lora(tiny_model("llama", hidden=128, layers=2, vocab=128), "llama", r=8)
    training = tf.TrainingArguments(
        output_dir="trainer_out", max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        gradient_checkpointing=args.checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        torch_compile=True, torch_compile_backend="fxlora",  # <- the change
    )
    tf.Trainer(model=model, args=training, train_dataset=CountingTokens()).train()
    print(fxlora.last_report())


if __name__ == "__main__":
    main()
