"""Fine-tune a small Llama with PEFT LoRA on several ranks, DDP or FSDP2, under backend="fxlora".

    torchrun --nproc-per-node 2 examples/distributed.py --engine ddp
    torchrun --nproc-per-node 2 examples/distributed.py --engine fsdp

gloo on CPUs, nccl on GPUs. Each rank trains on its own slice of a synthetic batch;
rank 0 prints the loss and fxlora's report (for DDP: the ops in each bucket's sub-graph).
docs/distributed.md says what fxlora changes under each engine.
"""

import argparse
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

import fxlora
from fxlora.testing.models import tiny_model, with_lora


def pattern_batch(batch: int, seq: int, vocab: int, step: int, rank: int) -> dict[str, torch.Tensor]:
    """Sequences counting upward modulo vocab from a random start (as examples/demo.py), per rank."""
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    ids = (start + torch.arange(seq)) % vocab
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"])
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. `torchrun --nproc-per-node 2 examples/distributed.py`")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = with_lora(tiny_model("llama", hidden=256, layers=2, heads=4, vocab=128), "llama", r=8).to(device)
    if args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        step_model = torch.compile(DistributedDataParallel(model), backend="fxlora", options={"inner": args.inner})
    else:
        from torch.distributed.fsdp import fully_shard

        model.config.use_cache = False  # one graph per sharded layer: no per-layer recompiles (docs/distributed.md)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        step_model = torch.compile(model, backend="fxlora", options={"inner": args.inner})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    losses = []
    for step in tqdm(range(args.steps), desc=f"{args.engine} x{dist.get_world_size()} under backend='fxlora'", disable=rank != 0):
        batch = {k: v.to(device) for k, v in pattern_batch(args.batch, args.seq, 128, step, rank).items()}
        loss = step_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)  # a sum: gloo has no average
        losses.append(total.item() / dist.get_world_size())
    if rank == 0:
        print(f"\nmean loss over ranks {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps\n")
        print(fxlora.last_report())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
