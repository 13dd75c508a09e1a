"""Train a LoReFT intervention (fxlora.reft) on a small random-init Llama under backend="fxlora".

Nothing is downloaded. The base is frozen; a rank-4 LoReFT sits on every o_proj and
down_proj output (the two writes into each block's residual stream) and learns a
synthetic next-token task. The report shows each ReFT site, its act/weight costs and the
form chosen for this sequence length (docs/reft.md; crossovers in docs/img/reft_crossover.png).

    python examples/reft.py --steps 20 --seq 256
"""

import argparse
import time

import torch
from tqdm import tqdm

import fxlora
from fxlora.testing.models import tiny_model
from fxlora.reft import attach_reft


def pattern_batch(batch: int, seq: int, vocab: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    ids = (torch.randint(0, vocab, (batch, 1), generator=gen) + torch.arange(seq)) % vocab
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--kind", default="loreft", choices=["loreft", "direft", "nodireft"])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()

    model = attach_reft(tiny_model("llama", hidden=256, layers=2, heads=4, vocab=128), ("o_proj", "down_proj"), kind=args.kind, r=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    compiled = torch.compile(model, backend="fxlora", options={"inner": args.inner})

    t0, losses = time.perf_counter(), []
    for step in (bar := tqdm(range(args.steps), desc=f"{args.kind} under backend='fxlora'")):
        loss = compiled(**pattern_batch(args.batch, args.seq, 128, step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps ({time.perf_counter() - t0:.1f} s incl. compile)\n")
    print(fxlora.last_report())


if __name__ == "__main__":
    main()
