"""`python -m fxlora.bench.convergence`: loss curves of exact LoRA vs the opt-in forms, same seeds.

A small random-init Llama learns a synthetic task it can only learn through its adapters
(the base is frozen): next token = a fixed random permutation of the current token. Every
form starts from the same weights, sees the same batches and takes the same AdamW steps:

    exact            fxlora, exact rewrite (the reference; equal to eager PEFT)
    lora-fa          every A frozen (fxlora.freeze_lora_A): exact for what it trains, trains less
    velora           VeLoRA (compress option), default targets v_proj/down_proj, M = D/32
    lora-fa+velora   both (with A frozen VeLoRA has nothing left to compress: the curve equals lora-fa's)

Writes a PNG of the curves and a JSON with every loss (docs/img/convergence.{png,json} by default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch

FORMS = ("exact", "lora-fa", "velora", "lora-fa+velora")
VELORA = {"method": "velora", "sub_token": "D/32", "targets": ["v_proj", "down_proj"]}


def permutation_batches(steps: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """x[t+1] = perm[x[t]]: learnable, and not by the frozen random base alone."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=gen)
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq):
            ids[:, t] = perm[ids[:, t - 1]]
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def build(form: str, *, hidden: int, layers: int, vocab: int, rank: int, seed: int, first_batch, inner: str):
    from fxlora.testing.models import tiny_model
    import fxlora
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", hidden=hidden, layers=layers, heads=4, vocab=vocab, max_positions=512, seed=seed)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0))
    options: dict[str, Any] = {"inner": inner}
    if "velora" in form:
        fxlora.velora.prepare(model, first_batch, VELORA)
        options["compress"] = VELORA
    if "lora-fa" in form:
        fxlora.freeze_lora_A(model)
    return model, torch.compile(model, backend="fxlora", options=options)


def run(forms: Sequence[str] = FORMS, *, steps: int = 300, batch: int = 8, seq: int = 32, hidden: int = 64,
        layers: int = 2, vocab: int = 64, rank: int = 8, lr: float = 3e-3, seed: int = 0,
        inner: str = "aot_eager") -> dict[str, Any]:
    """Train each form on the same batches; returns {"losses": {form: [...]}, "settings": {...}}."""
    batches = permutation_batches(steps, batch, seq, vocab, seed)
    losses: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for form in forms:
        torch._dynamo.reset()
        model, compiled = build(form, hidden=hidden, layers=layers, vocab=vocab, rank=rank, seed=seed,
                                first_batch=batches[0], inner=inner)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        t0 = time.perf_counter()
        curve = []
        for b in batches:
            opt.zero_grad(set_to_none=True)
            loss = compiled(**b).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
        seconds[form] = time.perf_counter() - t0
        losses[form] = curve
    settings = dict(steps=steps, batch=batch, seq=seq, hidden=hidden, layers=layers, vocab=vocab, rank=rank, lr=lr,
                    seed=seed, inner=inner, velora=VELORA, torch=torch.__version__,
                    task="next token = fixed random permutation of the current token; base frozen, LoRA on all linears")
    return {"settings": settings, "losses": losses, "seconds": seconds}


def final_loss(curve: Sequence[float], window: int = 20) -> float:
    tail = list(curve[-window:])
    return sum(tail) / len(tail)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"exact": "-", "lora-fa": "--", "velora": "-.", "lora-fa+velora": ":"}
    for form, curve in result["losses"].items():
        ax.plot(range(1, len(curve) + 1), curve, styles.get(form, "-"), label=f"{form} (final {final_loss(curve):.3f})", lw=1.2)
    s = result["settings"]
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"Llama h{s['hidden']} x{s['layers']}, LoRA r{s['rank']}, batch {s['batch']}x{s['seq']}, seed {s['seed']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fxlora.bench.convergence", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--inner", default="aot_eager", choices=("aot_eager", "inductor"))
    p.add_argument("--out", default=os.path.join("docs", "img", "convergence"), help="path stem: writes .png and .json")
    args = p.parse_args(argv)
    result = run(tuple(f for f in args.forms.split(",") if f), steps=args.steps, seed=args.seed, inner=args.inner)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out + ".png")
    ref = final_loss(result["losses"].get("exact", [float("nan")]))
    for form, curve in result["losses"].items():
        print(f"{form:16s} first {curve[0]:.3f}  final(avg last 20) {final_loss(curve):.4f}  vs exact {final_loss(curve) - ref:+.4f}  "
              f"{result['seconds'][form]:.1f} s")
    print(f"wrote {args.out}.png, {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
