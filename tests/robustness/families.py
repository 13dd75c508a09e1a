"""Tiny random-init models of the families the robustness matrix covers, with a batch each.

fxlora.testing.models has llama / qwen2 / gpt2 / bert; the rest (Mistral, RoBERTa, T5, ViT)
live here so the benchmark's list stays short. Built from configs, never downloaded.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxlora.testing.models import randomize_lora_B, tiny_model, token_batch

ALL_LINEAR_TARGETS = {
    "llama": "all-linear",
    "qwen2": "all-linear",
    "mistral": "all-linear",
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "vit": ["query", "key", "value", "dense"],
}
ATTENTION_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "t5": ["q", "k", "v", "o"],
    "vit": ["query", "key", "value"],
}
FAMILIES = tuple(ALL_LINEAR_TARGETS)


def family_model(family: str, hidden: int = 32, layers: int = 1, heads: int = 4) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family in ("llama", "qwen2", "gpt2", "bert"):
        return tiny_model(family, hidden=hidden, layers=layers, heads=heads, max_positions=128)
    if family == "mistral":
        cfg = tf.MistralConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads // 2, vocab_size=128, max_position_embeddings=128, attn_implementation="sdpa",
        )
        return tf.MistralForCausalLM(cfg)
    if family == "roberta":
        cfg = tf.RobertaConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
            vocab_size=128, max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        return tf.RobertaForMaskedLM(cfg)
    if family == "t5":
        cfg = tf.T5Config(
            d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden, num_layers=layers, num_decoder_layers=layers,
            num_heads=heads, vocab_size=128, dropout_rate=0.0, decoder_start_token_id=0,
        )
        return tf.T5ForConditionalGeneration(cfg)
    if family == "vit":
        cfg = tf.ViTConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
            image_size=16, patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return tf.ViTForImageClassification(cfg)
    raise ValueError(family)


def family_batch(family: str, batch: int = 2, seq: int = 8) -> dict:
    gen = torch.Generator().manual_seed(0)
    if family == "vit":
        return {
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen),
            "labels": torch.randint(0, 5, (batch,), generator=gen),
        }
    if family == "t5":
        ids = torch.randint(1, 128, (batch, seq), generator=gen)
        return {"input_ids": ids, "labels": torch.randint(1, 128, (batch, seq // 2), generator=gen)}
    if family == "roberta":  # position ids start after the padding index 1: keep ids off it
        ids = torch.randint(3, 128, (batch, seq), generator=gen)
        return {"input_ids": ids, "labels": ids.clone()}
    return token_batch(batch, seq)


def family_lora(family: str, targets: str = "all-linear", r: int = 4, dropout: float = 0.0, hidden: int = 32,
                **lora_kwargs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = family_model(family, hidden=hidden)
    names = ALL_LINEAR_TARGETS[family] if targets == "all-linear" else ATTENTION_TARGETS[family]
    if family == "gpt2":
        lora_kwargs.setdefault("fan_in_fan_out", True)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=names, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    randomize_lora_B(peft_model)
    return peft_model
