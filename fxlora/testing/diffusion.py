"""A tiny DiT (Peebles & Xie's class-conditional diffusion transformer, from `diffusers`) with PEFT LoRA.

Built from a config, never downloaded; shared by the DiT example, its test and `fxlora explain --family dit`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

DIT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
DIT_ALL_LINEAR = [*DIT_ATTENTION, "ff.net.0.proj", "ff.net.2"]
IN_CHANNELS = 4
CLASSES = 10


def tiny_dit(*, hidden: int = 64, layers: int = 2, heads: int = 4, sample_size: int = 8, patch_size: int = 2,
             seed: int = 0) -> nn.Module:
    """`diffusers.DiTTransformer2DModel`, random-init: latents (B, 4, sample, sample) -> noise and variance."""
    from diffusers import DiTTransformer2DModel

    if hidden % heads:
        raise ValueError(f"DiT hidden {hidden} must be a multiple of heads {heads}")
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=IN_CHANNELS,
        out_channels=2 * IN_CHANNELS, num_layers=layers, sample_size=sample_size, patch_size=patch_size,
        num_embeds_ada_norm=CLASSES, norm_num_groups=1,
    )


def with_dit_lora(
    model: nn.Module,
    *,
    targets: Union[str, Sequence[str]] = "all-linear",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    seed: int = 0,
    peft_config: Optional[dict] = None,
) -> nn.Module:
    """Freeze the DiT and inject PEFT LoRA in place (as diffusers' LoRA training scripts do); B randomised."""
    from peft import LoraConfig, inject_adapter_in_model

    from fxlora.testing.models import randomize_lora_B

    if peft_config is not None:
        cfg = LoraConfig(**{k: v for k, v in peft_config.items() if k not in ("peft_type", "task_type", "base_model_name_or_path")})
    else:
        targets = {"all-linear": DIT_ALL_LINEAR, "attention": DIT_ATTENTION}.get(targets, targets)
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    model.requires_grad_(False)
    model = inject_adapter_in_model(cfg, model)
    randomize_lora_B(model, seed)
    return model


def dit_sample_size(seq: int, patch_size: int = 2) -> int:
    """The latent side that gives about `seq` patch tokens."""
    return patch_size * max(1, round(seq**0.5))


def dit_batch(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """DiT inputs for `seq` tokens: latents of side 2*sqrt(seq) (patch 2), timesteps, class labels."""
    side = dit_sample_size(seq)
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, IN_CHANNELS, side, side, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "class_labels": torch.randint(0, CLASSES, (batch,), generator=gen),
    }


def diffusion_loss(model: nn.Module, batch: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """The epsilon-prediction MSE of DiT training (the learned-variance half of the output is ignored)."""
    out = model(**batch).sample
    return torch.nn.functional.mse_loss(out[:, :IN_CHANNELS], noise)
