"""`make demo`: fine-tune a small random-init Llama with PEFT LoRA under backend="fxlora", then show the report.

Nothing is downloaded: the model is built from a config and trained on a synthetic
next-token task (a repeating pattern it can learn in a few steps).
"""

import argparse
import time

import torch
from tqdm import tqdm

import fxlora
from fxlora.testing.models import tiny_model, with_lora


def pattern_batch(batch: int, seq: int, vocab: int, step: int) -> dict[str, torch.Tensor]:
    """Sequences that count upward modulo vocab from a random start: learnable, never downloaded."""
    gen = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    ids = (start + torch.arange(seq)) % vocab
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = with_lora(tiny_model("llama", hidden=256, layers=2, heads=4, vocab=128), "llama", r=8, dropout=0.05)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    # The one line a user changes:
    compiled = torch.compile(model, backend="fxlora", options={"inner": args.inner})

    t0 = time.perf_counter()
    losses = []
    for step in (bar := tqdm(range(args.steps), desc="fine-tuning under backend='fxlora'")):
        loss = compiled(**pattern_batch(args.batch, args.seq, 128, step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            first_step = time.perf_counter() - t0  # compiles: Dynamo, fxlora's passes (and form timing), Inductor
        bar.set_postfix(loss=f"{loss.item():.3f}")
    total = time.perf_counter() - t0
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps ({total:.1f} s; the first step, "
          f"which compiles, {first_step:.1f} s)\n")
    print(fxlora.last_report())


if __name__ == "__main__":
    main()
