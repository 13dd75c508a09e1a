"""ATen calls per training step (forward + backward), as issue 31 counts them: torch.profiler, CPU
activity, one step after two warm-up steps, every `aten::` event (nested included), and those that
are more than a view or an allocation. Llama h256, 2 layers, batch 2, seq 256; LoRA r8 all-linear at
dropout 0 and 0.05, DoRA at dropout 0, IA3 (PEFT defaults); peft-inductor against fxlora and
fxlora with every op body eager (`inline_ops=False`).

    python benchmarks/aten_calls.py [--diff]      # --diff: per-op counts where the contestants differ
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from fxlora.bench.profile import VIEWS_AND_ALLOCATIONS
from fxlora.testing.models import tiny_model, token_batch, with_ia3, with_lora

CASES = {
    "lora p=0": lambda m: with_lora(m, r=8, dropout=0.0),
    "lora p=0.05": lambda m: with_lora(m, r=8, dropout=0.05),
    "dora p=0": lambda m: with_lora(m, r=8, dropout=0.0, use_dora=True),
    "ia3": lambda m: with_ia3(m),
}
CONTESTANTS = {
    "peft-inductor": lambda m: torch.compile(m),
    "fxlora": lambda m: torch.compile(m, backend="fxlora"),
    "fxlora-opaque": lambda m: torch.compile(m, backend="fxlora", options={"inline_ops": False}),
}


def step(model, batch) -> None:
    model(**batch).loss.backward()
    for p in model.parameters():
        p.grad = None


def count(model, batch) -> collections.Counter:
    for _ in range(2):
        step(model, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, batch)
    return collections.Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diff", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    batch = token_batch(2, 256, vocab=2048)
    batch["labels"] = batch["input_ids"]
    print(f"torch {torch.__version__}; Llama h256 i688 L2 vocab 2048, batch 2 x 256, fp32, CPU; forward + backward\n")
    print("| case | contestant | ATen calls | more than a view/allocation |\n|---|---|---|---|")
    for case in args.cases.split(","):
        found = {}
        for name, compile_ in CONTESTANTS.items():
            model = CASES[case](tiny_model("llama", hidden=256, intermediate=688, layers=2, vocab=2048))
            found[name] = count(compile_(model.train()), batch)
            torch._dynamo.reset()
            c = found[name]
            work = sum(v for k, v in c.items() if k not in VIEWS_AND_ALLOCATIONS)
            print(f"| {case} | {name} | {sum(c.values())} | {work} |", flush=True)
        if args.diff:
            a, b = found["peft-inductor"], found["fxlora"]
            print("   " + ", ".join(f"{k} {a[k]}->{b[k]}" for k in sorted(set(a) | set(b), key=lambda k: a[k] - b[k]) if a[k] != b[k]))


if __name__ == "__main__":
    main()
