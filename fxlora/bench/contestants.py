"""The contestants: the same seeded model for each, its adapters, its compiler, its DDP/FSDP wrapping.

An adapter kind reaches the bench through one entry of ATTACH (and its name in
spec.ADAPTERS), not through a branch of the model builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

import fxlora
from fxlora.bench.results import Measurement
from fxlora.bench.spec import EXACT_VARIANTS, FA_PEERS, FLOOR, NOISE, PEERS, VELORA_BENCH, Case, Settings
from fxlora.reft import attach_reft
from fxlora.testing.models import quantized_4bit, tiny_model, token_batch, with_ia3, with_lora, with_vera


@dataclass
class Contestant:
    """A model ready to train, its optimizer, and what its steps have measured so far."""

    name: str
    model: nn.Module  # what is called: compiled or not
    optimizer: torch.optim.Optimizer
    param_storages: frozenset[int]  # data_ptrs of parameter/buffer storages, not counted as saved activations
    result: Measurement


# ----------------------------------------------------------------------------- the model


def _add_lora(model: nn.Module, case: Case, settings: Settings) -> nn.Module:
    return with_lora(model, settings.shape.family, r=case.rank, alpha=settings.lora_alpha, dropout=case.dropout, seed=settings.seed)


def _add_ia3(model: nn.Module, case: Case, settings: Settings) -> nn.Module:
    """PEFT's default IA3 targets; rank and dropout do not apply."""
    return with_ia3(model, settings.shape.family, seed=settings.seed)


def _add_vera(model: nn.Module, case: Case, settings: Settings) -> nn.Module:
    return with_vera(model, settings.shape.family, r=case.rank, dropout=case.dropout, seed=settings.seed)


def _add_loreft(model: nn.Module, case: Case, settings: Settings) -> nn.Module:
    """LoReFT on every write into the residual stream (o_proj, down_proj)."""
    return attach_reft(model, ("o_proj", "down_proj"), kind="loreft", r=case.rank, seed=settings.seed)


def _add_dora(model: nn.Module, case: Case, settings: Settings) -> nn.Module:
    """PEFT's DoRA (`LoraConfig(use_dora=True)`) on every linear."""
    return with_lora(model, settings.shape.family, r=case.rank, alpha=settings.lora_alpha, dropout=case.dropout,
                     seed=settings.seed, use_dora=True)


ATTACH: dict[str, Callable[[nn.Module, Case, Settings], nn.Module]] = {
    "lora": _add_lora,
    "ia3": _add_ia3,
    "vera": _add_vera,
    "reft": _add_loreft,
    "dora": _add_dora,
}


def build_model(name: str, case: Case, settings: Settings) -> nn.Module:
    """The same random weights for every contestant: tiny_model and the adapter builders seed themselves."""
    s = settings.shape
    if s.family == "dit":
        return _build_dit(name, case, settings)
    model = tiny_model(
        s.family, hidden=s.hidden, intermediate=s.intermediate, layers=s.layers, heads=s.heads,
        vocab=s.vocab, max_positions=max(4096, case.seq), seed=settings.seed,
    )
    if settings.quant:
        model = quantized_4bit(model, settings.quant)
    if name == FLOOR:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # something must need grad for backward to run
    elif name in FA_PEERS or (name.startswith("fxlora-") and name not in EXACT_VARIANTS):  # the opt-in forms are LoRA's, whatever the adapter
        model = _add_lora(model, case, settings)
        if "velora" in name:  # v from the batch every step sees (deterministic from the seed)
            fxlora.velora.prepare(model, token_batch(s.batch, case.seq, s.vocab, settings.seed), VELORA_BENCH)
        if "lora-fa" in name or name in FA_PEERS:
            fxlora.freeze_lora_A(model)
    else:
        model = ATTACH[settings.adapter](model, case, settings)
    if settings.checkpointing:  # as Trainer/TRL do by default; the floor is checkpointed too
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(settings.device).train()


def _build_dit(name: str, case: Case, settings: Settings) -> nn.Module:
    """A diffusers DiT seeing `case.seq` patch tokens ("Activations are not cheap in LoRA, weights are" measured DiT); LoRA on its linears."""
    from fxlora.testing.diffusion import dit_sample_size, tiny_dit, with_dit_lora  # diffusers: only DiT rows need it

    if settings.adapter != "lora" or name != FLOOR and name not in PEERS and name != "fxlora":
        raise ValueError("the DiT rows measure exact LoRA only (floor, peft-eager, peft-inductor, fxlora)")
    s = settings.shape
    model = tiny_dit(hidden=s.hidden, layers=s.layers, heads=s.heads, sample_size=dit_sample_size(case.seq), seed=settings.seed)
    if name == FLOOR:
        model.requires_grad_(False)
        model.pos_embed.proj.weight.requires_grad_(True)  # the patch embedding: backward runs through every block
    else:
        model = with_dit_lora(model, r=case.rank, alpha=settings.lora_alpha, dropout=case.dropout, seed=settings.seed)
    return model.to(settings.device).train()


# ----------------------------------------------------------------------------- the batch and the loss


def make_batch(case: Case, settings: Settings) -> dict[str, torch.Tensor]:
    """Token ids and labels for a language model; latents, timesteps, labels and the noise target for a DiT."""
    s = settings.shape
    if s.family == "dit":
        from fxlora.testing.diffusion import IN_CHANNELS, dit_batch

        batch = dit_batch(s.batch, case.seq, settings.seed)
        gen = torch.Generator().manual_seed(settings.seed + 1)
        batch[NOISE] = torch.randn(batch["hidden_states"].shape[0], IN_CHANNELS, *batch["hidden_states"].shape[2:], generator=gen)
    else:
        batch = token_batch(s.batch, case.seq, s.vocab, settings.seed)
    return {k: v.to(settings.device) for k, v in batch.items()}


def step_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if NOISE in batch:  # DiT: epsilon-prediction MSE
        from fxlora.testing.diffusion import diffusion_loss

        return diffusion_loss(model, {k: v for k, v in batch.items() if k != NOISE}, batch[NOISE])
    return model(**batch).loss


# ----------------------------------------------------------------------------- compiled, wrapped, ready


def compile_for(name: str, model: nn.Module, settings: Settings) -> nn.Module:
    """torch.compile once per contestant per case; with inner="aot_eager" every compiler skips codegen."""
    if name in ("peft-eager", "peft-fa-eager"):
        return model
    if name == "fxlora" or name.startswith("fxlora-"):
        options = fxlora_options(settings)
        if "velora" in name:
            options["compress"] = VELORA_BENCH
        options.update(EXACT_VARIANTS.get(name, {}))
        return torch.compile(model, backend="fxlora", options=options)
    if settings.inner == "aot_eager":
        return torch.compile(model, backend="aot_eager")
    return torch.compile(model)


def fxlora_options(settings: Settings) -> dict[str, Any]:
    """The user's options, with the inner compiler forced when the whole run falls back from Inductor."""
    options = dict(settings.fxlora_options)
    if settings.inner != "inductor":
        options["inner"] = settings.inner
    return options


def build_contestant(name: str, case: Case, settings: Settings) -> Contestant:
    model = build_model(name, case, settings)
    if settings.parallel != "none":
        model = parallelize(model, settings.parallel, bucket_mb=settings.ddp_bucket_mb)
    trainable = [p for p in model.parameters() if p.requires_grad]
    storages = param_storages(model)
    return Contestant(
        name=name,
        model=compile_for(name, model, settings),
        optimizer=torch.optim.AdamW(trainable, lr=settings.lr),
        param_storages=storages,
        result=Measurement(name, case.seq, case.rank, case.dropout),
    )


def param_storages(model: nn.Module) -> frozenset[int]:
    """data_ptrs of the storages a model's parameters and buffers hold now (an FSDP shard: its local tensor)."""
    return frozenset(
        getattr(t, "_local_tensor", t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
    )


# ----------------------------------------------------------------------------- on several ranks


def parallelize(model: nn.Module, how: str, bucket_mb: float = 25.0) -> nn.Module:
    """DDP around the model, or FSDP2's fully_shard on each decoder layer and at the root."""
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        allow_small_buckets(bucket_mb)
        return DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each sharded layer is its own graph. A KV cache makes Dynamo guard on the layer
        # index, one recompile per layer, and past recompile_limit (8) layers run uncompiled;
        # training needs no cache (gradient checkpointing turns it off for the same reason).
        if getattr(getattr(model, "config", None), "use_cache", False):
            model.config.use_cache = False
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        if not layers:
            raise ValueError(f"--parallel fsdp shards decoder layers; {type(model).__name__} has none (a Llama-family model)")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {how!r}")


def allow_small_buckets(bucket_mb: float) -> None:
    """Let Dynamo's DDPOptimizer take buckets under 1 MiB, the size of DDP's first bucket.

    DDPOptimizer asserts that its first bucket (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES)
    is no larger than the rest; small buckets are what split a small model's graph, so the
    first one shrinks with them. Process-wide: call it in a rank, not in a parent process.
    """
    dist._DEFAULT_FIRST_BUCKET_BYTES = min(dist._DEFAULT_FIRST_BUCKET_BYTES, int(bucket_mb * 2**20))
