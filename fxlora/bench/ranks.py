"""The benchmark on several ranks: the sweep run on each spawned rank, every contestant wrapped in DDP or FSDP2.

`python -m fxlora.bench --parallel ddp|fsdp [--world 2]` spawns the ranks (gloo on a CPU,
nccl on GPUs), runs the same interleaved sweep on each (collectives keep them in step) and
reports rank 0's figures, which are per rank: step time including the gradient
all-reduce / reduce-scatter, and the bytes that rank saves for backward. `--ddp-bucket-mb`
small enough makes Dynamo's DDPOptimizer cut each graph into bucket pieces (fxlora's
rewrite comes first, docs/distributed.md). The wrapping itself is contestants.parallelize.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fxlora.bench.results import BenchResult
from fxlora.bench.run import Progress, TqdmProgress, run_sweep
from fxlora.bench.spec import Case, Settings, steps_per_case


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
            bar.close()
        if rank == 0:
            result.machine["parallel"] = f"{settings.parallel} on {world} ranks ({dist.get_backend()})"
            torch.save(result, os.path.join(tmp, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def _progress_bar(cases: list, settings: Settings) -> Progress:
    return TqdmProgress(len(cases) * steps_per_case(settings), disable=False)


def _on_device(settings: Settings, device: str) -> Settings:
    return replace(settings, device=device)
