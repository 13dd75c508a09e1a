"""The benchmark on several ranks: every contestant wrapped in DDP or FSDP2, the sweep run on each rank.

`python -m fxlora.bench --parallel ddp|fsdp [--world 2]` spawns the ranks (gloo on a CPU,
nccl on GPUs), runs the same interleaved sweep on each (collectives keep them in step) and
reports rank 0's figures, which are per rank: step time including the gradient
all-reduce / reduce-scatter, and the bytes that rank saves for backward. `--ddp-bucket-mb`
small enough makes Dynamo's DDPOptimizer cut each graph into bucket pieces (fxlora's
rewrite comes first, docs/distributed.md).
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fxlora.bench.harness import BenchResult, Case, Progress, Settings, run_sweep, steps_per_case


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


def run_sweep_on_ranks(cases: Sequence[Case], settings: Settings, world: int, progress: bool = True) -> BenchResult:
    """Rank 0's BenchResult of `run_sweep(cases, settings)` run on `world` spawned ranks."""
    with tempfile.TemporaryDirectory(prefix="fxlora-bench-ranks-") as tmp:
        mp.spawn(_rank_main, args=(world, tmp, list(cases), settings, progress), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "rank0.pt"), weights_only=False)


def _rank_main(rank: int, world: int, tmp: str, cases: list, settings: Settings, progress: bool) -> None:
    cuda = torch.device(settings.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        settings = _on_device(settings, f"cuda:{rank}")
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        bar = _progress_bar(cases, settings) if rank == 0 and progress else Progress()  # one bar: rank 0's
        try:
            result = run_sweep(cases, settings, bar)
        finally:
            getattr(bar, "close", lambda: None)()
        if rank == 0:
            result.machine["parallel"] = f"{settings.parallel} on {world} ranks ({dist.get_backend()})"
            torch.save(result, os.path.join(tmp, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def _progress_bar(cases: list, settings: Settings) -> Progress:
    from fxlora.bench.__main__ import TqdmProgress

    return TqdmProgress(len(cases) * steps_per_case(settings), disable=False)


def _on_device(settings: Settings, device: str) -> Settings:
    from dataclasses import replace

    return replace(settings, device=device)
