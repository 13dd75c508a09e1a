"""Tiny random-init models built from configs (never downloaded), with PEFT adapters on top.

Shared by the demo, the tests and the benchmark so they all talk about the same shapes.
"""

from __future__ import annotations

import tempfile
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

FAMILIES = ("llama", "qwen2", "gpt2", "bert")
ATTENTION_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "key", "value"],
}


def tiny_model(
    family: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 1,
    heads: int = 4,
    intermediate: Optional[int] = None,
    vocab: int = 128,
    max_positions: int = 4096,
    seed: int = 0,
) -> nn.Module:
    """A small random-init HF model of `family` (eval-free: dropout follows the config)."""
    import transformers as tf

    torch.manual_seed(seed)
    intermediate = intermediate or 2 * hidden
    if family in ("llama", "qwen2"):
        cls_cfg, cls_model = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[family]
        cfg = cls_cfg(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=vocab,
            max_position_embeddings=max_positions, attn_implementation="sdpa",
        )
        return cls_model(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate, vocab_size=vocab,
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return tf.GPT2LMHeadModel(cfg)
    if family == "bert":
        cfg = tf.BertConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=max_positions,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        return tf.BertForMaskedLM(cfg)
    raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def with_lora(
    model: nn.Module,
    family: str = "llama",
    *,
    targets: Union[str, Sequence[str]] = "all-linear",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    seed: int = 0,
    **lora_kwargs,
) -> nn.Module:
    """PEFT LoRA on `targets` ("all-linear", "attention", or module names), B randomised so gradients flow in A too."""
    from peft import LoraConfig, get_peft_model

    if targets == "attention":
        targets = ATTENTION_TARGETS[family]
    if family == "gpt2":
        lora_kwargs.setdefault("fan_in_fan_out", True)
        if targets == "all-linear":
            targets = ["c_attn", "c_proj", "c_fc"]
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    randomize_lora_B(peft_model, seed)
    return peft_model


def randomize_lora_B(model: nn.Module, seed: int = 0) -> None:
    """PEFT starts B at zero, which makes dA zero; tests and benchmarks want every gradient alive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)


IA3_TARGETS = {  # PEFT's defaults for these families: attention k/v (c_attn) scaled on the output, the MLP down-projection on its input
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}
VERA_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def with_ia3(model: nn.Module, family: str = "llama", *, seed: int = 0, **ia3_kwargs) -> nn.Module:
    """PEFT IA3 with PEFT's default targets for `family`; vectors moved off 1 so every gradient is generic."""
    from peft import IA3Config, get_peft_model

    targets, feedforward = IA3_TARGETS[family]
    if family == "gpt2":
        ia3_kwargs.setdefault("fan_in_fan_out", True)
    peft_model = get_peft_model(model, IA3Config(target_modules=targets, feedforward_modules=feedforward, **ia3_kwargs))
    _jitter_trainable(peft_model, "ia3_l", seed)
    return peft_model


def with_vera(model: nn.Module, family: str = "llama", *, r: int = 8, dropout: float = 0.0, seed: int = 0,
              **vera_kwargs) -> nn.Module:
    """PEFT VeRA (shared frozen A/B) on q/v (c_attn); lambda_b moved off 0 so lambda_d gets a gradient."""
    from peft import VeraConfig, get_peft_model

    if family == "gpt2":
        vera_kwargs.setdefault("fan_in_fan_out", True)
    cfg = VeraConfig(r=r, target_modules=VERA_TARGETS[family], vera_dropout=dropout, **vera_kwargs)
    peft_model = get_peft_model(model, cfg)
    _jitter_trainable(peft_model, "vera_lambda", seed)
    return peft_model


def _jitter_trainable(model: nn.Module, key: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


class HandLoRALinear(nn.Module):
    """LoRA written by hand with plain nn.Linear layers and a tensor scale, as people do without PEFT."""

    def __init__(self, d_in: int, d_out: int, r: int = 4, scale: float = 2.0, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)
        self.down = nn.Linear(d_in, r, bias=False)
        self.up = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.up.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(self.drop(x)))


def quantized_4bit(model: nn.Module, quant: str = "nf4", double_quant: bool = True) -> nn.Module:
    """A Hugging Face `model` saved and reloaded 4-bit with bitsandbytes' BitsAndBytesConfig (fp32
    compute), as a QLoRA user loads a hub checkpoint: random init, nothing downloaded. In train mode:
    `from_pretrained` returns eval mode, where bitsandbytes repacks 4-bit weights for CPU inference."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        return type(model).from_pretrained(path, quantization_config=config, dtype=torch.float32).train()


def token_batch(batch: int, seq: int, vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}
