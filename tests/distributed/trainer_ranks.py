"""The Hugging Face Trainer on 2 CPU ranks over gloo, compiling with torch_compile_backend="fxlora".

`trainer_worker` runs under `run_ranks` (tests/distributed/ranks.py), which has already
initialised the gloo process group; accelerate's PartialState only needs the torchrun-style
environment variables to see that it is one rank of several, and then reuses that group.
`train` is also the single-process reference (world=1, no compile).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tests.distributed.ranks import lora_llama, report_summary

EXAMPLES, SEQ = 8, 16  # the whole dataset is one global batch, so every step sees every sequence
STEPS = 2
LR = 1e-2


class Tokens(torch.utils.data.Dataset):
    """EXAMPLES fixed sequences of length SEQ from one seeded generator; labels = input_ids."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 128, (EXAMPLES, SEQ), generator=gen)

    def __len__(self):
        return EXAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _chain(module) -> list[str]:
    """The wrappers around the model, outermost first: e.g. OptimizedModule, DistributedDataParallel, PeftModel..."""
    names = []
    while module is not None:
        names.append(type(module).__name__)
        inner = getattr(module, "_orig_mod", None)  # no `or`: a wrapper with __len__ could read as False
        module = inner if inner is not None else getattr(module, "module", None)
    return names


def train(output_dir: str, world: int = 1, compile_backend: str | None = None, **args) -> dict[str, Any]:
    """STEPS optimizer steps; each of `world` processes takes EXAMPLES // world sequences a step."""
    import transformers as tf

    model = lora_llama()
    targs = tf.TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=EXAMPLES // world,
        gradient_accumulation_steps=1, learning_rate=LR, use_cpu=True, ddp_backend="gloo" if world > 1 else None,
        report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        seed=0, data_seed=0, torch_compile=compile_backend is not None, torch_compile_backend=compile_backend,
        **args,
    )
    trainer = tf.Trainer(model=model, args=targs, train_dataset=Tokens())
    result = trainer.train()
    return {
        "loss": result.training_loss,
        "adapters": adapters(model),
        "world": trainer.accelerator.num_processes,
        "wrapped": _chain(trainer.model_wrapped),
    }


def trainer_worker(rank: int, world: int, output_dir: str, **args) -> dict[str, Any]:
    """One rank of the Trainer run; the gloo group is already up (run_ranks)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",  # not dialled: accelerate sees the group exists
        OMP_NUM_THREADS="1",  # else accelerate sets threads to cores / ranks and warns
        FXLORA_OPTIONS='{"inner": "aot_eager"}',  # the Trainer passes no backend options
    )
    import fxlora  # registers "fxlora" with accelerate's DynamoBackend

    fxlora.clear_reports()
    out = train(output_dir, world=world, compile_backend="fxlora", **args)
    return {**out, **report_summary(fxlora)}
