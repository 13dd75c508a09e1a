"""Where the ReFT weight form starts to pay: the cost model's saved bytes and FLOPs against tokens.

    python -m fxlora.bench.crossover            # docs/img/reft_crossover.png

Drawn from fxlora/kinds/reft/forms.py (sympy), not measured: the measured rows are
`python -m fxlora.bench --adapter reft`. One panel per site shape of the benchmark's
Llama (o_proj 512 -> 512, down_proj 1376 -> 512), LoReFT rank 4, fp32, x rebuilt or not.
"""

from __future__ import annotations

import argparse
import os

import sympy

from fxlora.cost.core import T, crossover, sizes
from fxlora.kinds.base import LayerShape
from fxlora.kinds.reft.forms import candidate_forms

SITES = {"o_proj (512 -> 512)": (512, 512), "down_proj (1376 -> 512)": (1376, 512)}
TOKENS = [2**k for k in range(6, 17)]


def shape_for(in_features: int, out_features: int, rank: int, x_rebuilt: bool) -> LayerShape:
    return LayerShape("loreft", T, sympy.Integer(in_features), sympy.Integer(out_features), sympy.Integer(rank),
                     x_bytes=4, compute_bytes=4, x_rebuilt=x_rebuilt)


def curves(shape: LayerShape, figure: str) -> dict[str, list[float]]:
    subs = {k: v for k, v in sizes(shape).items() if k is not T}
    out = {}
    for form in candidate_forms(shape):
        expr = sympy.sympify(getattr(form, figure)).subs(subs)
        out[form.name] = [float(expr.subs(T, t)) for t in TOKENS]
    return out


def plot(path: str, rank: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SITES), figsize=(11, 7), squeeze=False)
    for col, (label, (i, o)) in enumerate(SITES.items()):
        for row, (figure, unit, scale) in enumerate((("saved_bytes", "saved for backward (MiB)", 2**20), ("flops", "GFLOPs (fwd+bwd)", 1e9))):
            ax = axes[row][col]
            for x_rebuilt, style in ((False, "-"), (True, "--")):
                shape = shape_for(i, o, rank, x_rebuilt)
                for name, ys in curves(shape, figure).items():
                    if figure == "flops" and x_rebuilt:
                        continue  # FLOPs do not depend on what is saved
                    tag = "" if figure == "flops" else (" (x rebuilt)" if x_rebuilt else " (x saved)")
                    ax.plot(TOKENS, [y / scale for y in ys], style, label=f"{name}{tag}", color="C0" if name == "act" else "C3")
                cross = crossover(candidate_forms(shape), shape, "act", "weight", figure)
                if cross is not None and (figure == "saved_bytes" or not x_rebuilt):
                    ax.axvline(float(cross), color="grey", linestyle=style, alpha=0.6)
                    ax.annotate(f"T={float(cross):.0f}", (float(cross), ax.get_ylim()[1] * 0.9), fontsize=8, rotation=90)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"LoReFT r{rank} on {label}", fontsize=10)
            ax.set_ylabel(unit)
            ax.grid(True, alpha=0.3)
            if row == 1:
                ax.set_xlabel("tokens T (batch x seq)")
            ax.legend(fontsize=7)
    fig.suptitle("ReFT act vs weight form (fxlora/kinds/reft/forms.py, fp32): grey lines = crossovers", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fxlora.bench.crossover", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("docs", "img", "reft_crossover.png"))
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args(argv)
    plot(args.out, args.rank)
    for label, (i, o) in SITES.items():
        for x_rebuilt in (False, True):
            shape = shape_for(i, o, args.rank, x_rebuilt)
            print(f"{label}, x {'rebuilt' if x_rebuilt else 'saved'}: saved-bytes crossover T = {crossover(candidate_forms(shape), shape, 'act', 'weight', 'saved_bytes')}, "
                  f"FLOPs crossover T = {crossover(candidate_forms(shape), shape, 'act', 'weight', 'flops')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
