"""Fine-tune a tiny diffusers DiT (class-conditional diffusion transformer) with PEFT LoRA under backend="fxlora".

Built from a config, trained on random latents to predict the noise (the DiT objective); nothing is downloaded.

    python examples/dit_lora.py --inner aot_eager --steps 10
"""

import argparse
import time

import torch

import fxlora
from fxlora.testing.diffusion import diffusion_loss, dit_batch, tiny_dit, with_dit_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()

    model = with_dit_lora(tiny_dit(hidden=128, layers=2, heads=4, sample_size=16), r=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    compiled = torch.compile(model, backend="fxlora", options={"inner": args.inner})  # the one line

    scheduler_alphas = torch.linspace(0.999, 0.01, 1000)  # a toy noise schedule: sqrt(a) x0 + sqrt(1-a) eps
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = dit_batch(4, 64, seed=step)
        noise = torch.randn_like(batch["hidden_states"])
        a = scheduler_alphas[batch["timestep"]].view(-1, 1, 1, 1)
        batch["hidden_states"] = a.sqrt() * batch["hidden_states"] + (1 - a).sqrt() * noise
        loss = diffusion_loss(compiled, batch, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s incl. compile\n")
    print(fxlora.last_report())


if __name__ == "__main__":
    main()
