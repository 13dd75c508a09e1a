"""TRL's SFTTrainer with a LoRA `peft_config` under `torch_compile_backend="fxlora"`, SFTConfig's defaults otherwise
(gradient checkpointing on). No `import fxlora`: the package's start-up hook makes accelerate accept the name.
Offline: a random-init tiny Llama, a word-level tokenizer built here, an in-memory dataset of token ids.

    FXLORA_LOG=info python examples/trl_sft.py                          # Inductor
    FXLORA_OPTIONS='{"inner": "aot_eager"}' FXLORA_LOG=info python examples/trl_sft.py --steps 4
"""

import argparse
import tempfile
from typing import Optional

import torch
import transformers as tf
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

VOCAB = 128


def word_level_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A tokenizer with VOCAB tokens "t0".."t{VOCAB-3}", <pad> and <eos>, made here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<pad>": VOCAB - 2, "<eos>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def counting_dataset(n: int = 32, seq: int = 32) -> Dataset:
    """Token ids that count upward: pre-tokenized, so SFTTrainer only collates them."""
    return Dataset.from_dict({"input_ids": [[(i * 7 + t) % (VOCAB - 2) for t in range(seq)] for i in range(n)]})


def tiny_llama(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                            pad_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, bos_token_id=None)
    return tf.LlamaForCausalLM(config)


def quantized(model: tf.PreTrainedModel, quant: str) -> tf.PreTrainedModel:
    """QLoRA's base: `model` saved and reloaded 4-bit (`quant`: nf4 or fp4) as from a hub checkpoint."""
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        return type(model).from_pretrained(path, quantization_config=config, dtype=torch.float32)


def train(backend: str, steps: int = 2, output_dir: str = "sft_out", lora_dropout: float = 0.0,
          quant: Optional[str] = None, **config_overrides):
    """`steps` SGD steps of SFTTrainer; returns the trainer (losses in trainer.state.log_history).
    `quant` ("nf4"/"fp4"): a 4-bit base (QLoRA, bitsandbytes)."""
    args = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, optim="sgd",
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0, max_length=32,
        torch_compile=True, torch_compile_backend=backend,  # <- the change
        **config_overrides,
    )
    trainer = SFTTrainer(
        model=quantized(tiny_llama(), quant) if quant else tiny_llama(), args=args, train_dataset=counting_dataset(), processing_class=word_level_tokenizer(),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="fxlora")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--quant", choices=("nf4", "fp4"), help="QLoRA: a 4-bit base (needs bitsandbytes)")
    args = parser.parse_args()
    trainer = train(args.backend, args.steps, lora_dropout=args.lora_dropout, quant=args.quant)
    print("losses:", [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h])


if __name__ == "__main__":
    main()
