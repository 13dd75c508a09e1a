"""Run a worker on 2 CPU ranks over gloo and bring back what each rank returned.

Workers live here, at module level, because torch.multiprocessing's spawn imports them by
name in each child. Each one builds the same seeded tiny Llama with PEFT LoRA, takes its
own half of a batch, steps once and returns loss, adapter gradients (gathered whole) and
fxlora's report.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
BATCH_PER_RANK, SEQ = 2, 16


def run_ranks(worker: Callable, tmp_path, world: int = WORLD, **kwargs) -> list[dict[str, Any]]:
    """`worker(rank, world, **kwargs)` on `world` processes; returns each rank's dict, rank order."""
    mp.spawn(_entry, args=(world, worker, str(tmp_path), kwargs), nprocs=world, join=True)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _entry(rank: int, world: int, worker: Callable, tmp: str, kwargs: dict) -> None:
    torch.set_num_threads(1)  # two ranks on a two-core machine
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        out = worker(rank, world, **kwargs)
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def lora_llama(dropout: float = 0.0, dora: bool = False):
    from fxlora.testing.models import tiny_model, with_lora

    return with_lora(tiny_model("llama", hidden=32, layers=2, heads=4), r=4, dropout=dropout, use_dora=dora)


def full_batch(world: int = WORLD) -> dict[str, torch.Tensor]:
    from fxlora.testing.models import token_batch

    return token_batch(BATCH_PER_RANK * world, SEQ, seed=1)


def rank_batch(rank: int, world: int) -> dict[str, torch.Tensor]:
    return {k: v.chunk(world)[rank] for k, v in full_batch(world).items()}


def single_process_step(dora: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference: eager PEFT on the concatenated batch, in this process."""
    from tests.helpers import loss_and_grads

    return loss_and_grads(lora_llama(dora=dora), full_batch())


def report_summary(fxlora) -> dict[str, Any]:
    report = fxlora.last_report()
    return {
        "text": str(report),
        "sites": len(report.sites),
        "rewritten": sum(d.rewritten for g in report.graphs for d in g.decisions),
        "pieces": [p for g in report.graphs for p in g.pieces],
        "fallbacks": [g.fallback for g in report.graphs if g.fallback],
        "notes": [n for g in report.graphs for n in g.notes],
    }


def _step(model, batch) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _name(n: str) -> str:
    """A parameter's name in the bare PEFT model (without DDP's `module.` and compile's `_orig_mod.`)."""
    return n.replace("_orig_mod.", "").removeprefix("module.")


def ddp_worker(rank: int, world: int, order: str = "ddp-then-compile", bucket_mb: float = 25.0,
               options: dict | None = None, hook: bool = True, explain: bool = False, dora: bool = False) -> dict[str, Any]:
    """One DDP step; `bucket_mb` small enough splits the graph into several DDPOptimizer pieces.

    hook=False puts Dynamo's stock DDPOptimizer back, as on a torch fxlora cannot hook."""
    import fxlora
    from fxlora.bench.contestants import allow_small_buckets
    from torch._dynamo.backends import distributed as dynamo_ddp
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not hook:
        dynamo_ddp.DDPOptimizer = dynamo_ddp.DDPOptimizer.stock_class

    allow_small_buckets(bucket_mb)
    options = {"inner": "aot_eager", **(options or {})}
    model = lora_llama(dora=dora)
    if order == "python-reducer":  # no graph split: compiled autograd traces DDP's all-reduces instead
        torch._dynamo.config.optimize_ddp = "python_reducer"
        torch._dynamo.config.compiled_autograd = True
    if order == "no-optimization":  # no graph split, DDP's C++ reducer after backward
        torch._dynamo.config.optimize_ddp = False
    if order == "compile-then-ddp":  # DDP around the compiled module
        step_model = DDP(torch.compile(model, backend="fxlora", options=options), bucket_cap_mb=bucket_mb)
    else:
        step_model = torch.compile(DDP(model, bucket_cap_mb=bucket_mb), backend="fxlora", options=options)
    loss, params = _step(step_model, rank_batch(rank, world))
    dist.all_reduce(loss)
    grads = {_name(n): p.grad.detach().clone() for n, p in params}
    out = {"loss": loss / world, "grads": grads, **report_summary(fxlora)}
    if explain:  # fxlora.explain on the DDP model: the same whole-graph rewrite, run eagerly
        out["explain"] = str(fxlora.explain(DDP(model, bucket_cap_mb=bucket_mb), **rank_batch(rank, world)))
    return out


def fsdp_worker(rank: int, world: int, options: dict | None = None, probe_saved: bool = False,
                dora: bool = False) -> dict[str, Any]:
    """One FSDP2 step: fully_shard per decoder layer and at the root, base weights frozen and sharded."""
    import fxlora
    from fxlora.bench.contestants import parallelize

    model = parallelize(lora_llama(dora=dora), "fsdp")  # as the benchmark shards it
    compiled = torch.compile(model, backend="fxlora", options={"inner": "aot_eager", **(options or {})})
    batch = rank_batch(rank, world)
    out: dict[str, Any] = {}
    if probe_saved:
        out["alive_saved"] = alive_saved_shapes(compiled, batch)
    loss, params = _step(compiled, batch)
    dist.all_reduce(loss)
    grads = {_name(n): p.grad.full_tensor().detach().clone() for n, p in params}
    return {"loss": loss / world, "grads": grads, **out, **report_summary(fxlora)}


def alive_saved_shapes(model, batch) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes still allocated) of each tensor saved for backward, read when forward has ended.

    FSDP frees an unsharded weight by resizing its storage to 0 after forward, so a saved
    reference to W itself reads 0 bytes here; a copy (a merged W + sBA) would not."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    shapes = [(tuple(t.shape), t.untyped_storage().nbytes()) for t in saved]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return shapes


def tensor_parallel_worker(rank: int, world: int) -> dict[str, Any]:
    """A hand-written LoRA whose base linear is column-parallel (DTensor): fxlora must leave it alone."""
    import fxlora
    from fxlora.testing.models import HandLoRALinear
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = HandLoRALinear(32, 32, r=4)
    parallelize_module(model, init_device_mesh("cpu", (world,)), {"base": ColwiseParallel(output_layouts=Replicate())})
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    eager = _plain_step(model, x)
    compiled = _plain_step(torch.compile(model, backend="fxlora", options={"inner": "aot_eager"}), x)
    return {"eager": eager, "compiled": compiled, **report_summary(fxlora)}


def _plain_step(model, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss.detach(), {_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
