"""`python -m fxlora.bench` (`make bench`): sweep the LoRA step, write JSON/CSV/Markdown and a plot.

    python -m fxlora.bench                               # the full sweep: fp32, seq 256..2048, r 8/64, p 0/0.05
    python -m fxlora.bench --quick                       # a tiny sanity sweep, Inductor end to end
    python -m fxlora.bench --seqs 1024 --ranks 8 --dropouts 0 --long --dtype bf16
    python -m fxlora.bench --fxlora-options '{"dump_graphs": "dumps"}'
    python -m fxlora.bench --from-json benchmarks/lora_<tag>.json   # redraw table and plot, measure nothing
    make bench BENCH_ARGS="--seqs 256,1024 --contestants peft-inductor,fxlora"

Outputs (tag = a timestamp unless --tag): <out-dir>/lora_<tag>.json (everything, with
per-step times), .csv (one row per contestant x config), .md (the table, also printed);
a full run also writes <out-dir>/latest.md and the plot docs/img/bench_lora.png. A
--quick run leaves those two alone: its plot goes to <out-dir>/lora_quick.png.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

from fxlora.bench.frontier import BUDGETS, Point, child_argv, frontier_points, frontier_table, measure_point, plot_frontier, run_frontier
from fxlora.bench.plot import plot_result
from fxlora.bench.ranks import run_sweep_on_ranks
from fxlora.bench.results import BenchResult, Measurement, describe_model, measurement_columns
from fxlora.bench.run import TqdmProgress, machine_info, measure_case, run_sweep
from fxlora.bench.spec import (
    ADAPTERS,
    ALL_CONTESTANTS,
    LORA_REFERENCE,
    CONTESTANTS,
    DTYPES,
    INNERS,
    MIB,
    NOISY_SPREAD,
    PARALLEL,
    VARIANTS,
    ModelShape,
    Settings,
    contestants_for,
    steps_per_case,
    sweep_cases,
)
from fxlora.config import json_object

DEFAULT_SEQS = (256, 1024, 2048)
LONG_SEQ = 4096
DEFAULT_RANKS = (8, 64)
DEFAULT_DROPOUTS = (0.0, 0.05)
DEFAULT_PLOT = os.path.join("docs", "img", "bench_lora.png")

# --quick: a 2-layer model small enough that Inductor's compiles, not the steps, set the pace.
QUICK_SHAPE = ModelShape(hidden=128, intermediate=344, layers=2, heads=4, vocab=256)
QUICK_SEQS = (64, 256)
QUICK_RANKS = (8,)
QUICK_DROPOUTS = (0.0, 0.05)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fxlora.bench",
        description="Side-by-side LoRA training step: floor, peft-eager, peft-inductor, fxlora (see measuring.md).",
    )
    sweep = p.add_argument_group("sweep (defaults: the full sweep, or the tiny one with --quick)")
    sweep.add_argument("--adapter", choices=ADAPTERS, default="lora",
                       help="adapter kind: lora, ia3 (PEFT default targets, --ranks ignored), vera, reft (LoReFT on o_proj/down_proj), "
                            f"dora (PEFT use_dora=True; adds {LORA_REFERENCE}, fxlora with plain LoRA, as the reference) [lora]")
    sweep.add_argument("--quick", action="store_true", help="tiny sanity sweep: 2-layer hidden-128 model, seq 64/256, rank 8")
    sweep.add_argument("--seqs", type=_ints, help=f"comma-separated sequence lengths [{_csv(DEFAULT_SEQS)}]")
    sweep.add_argument("--long", action="store_true", help=f"add seq {LONG_SEQ} to the sweep")
    sweep.add_argument("--ranks", type=_ints, help=f"comma-separated LoRA ranks [{_csv(DEFAULT_RANKS)}]")
    sweep.add_argument("--dropouts", type=_floats, help=f"comma-separated LoRA dropouts [{_csv(DEFAULT_DROPOUTS)}]")
    sweep.add_argument("--contestants", type=_names, default=CONTESTANTS, help=f"comma-separated subset of [{_csv(CONTESTANTS)}]")
    sweep.add_argument("--variants", type=_variants, default=("exact",),
                       help=f"fxlora forms to run, comma-separated from [{_csv(VARIANTS)}] (docs/lossy.md); "
                            "a lora-fa variant adds peft-fa-eager/peft-fa-inductor (PEFT with every A frozen) [exact]")

    step = p.add_argument_group("step")
    step.add_argument("--steps", type=int, default=5, help="timed steps per contestant, median reported; measuring.md wants >= 5 [%(default)s]")
    step.add_argument("--warmup", type=int, default=2, help="warm-up steps, the first of which compiles [%(default)s]")
    step.add_argument("--dtype", choices=DTYPES, default="fp32", help="fp32, or bf16 autocast over fp32 weights [%(default)s]")
    step.add_argument("--device", default="cpu", help="torch device [%(default)s]")
    step.add_argument("--parallel", choices=PARALLEL, default="none",
                      help="wrap every contestant in DDP or FSDP2 (fully_shard per decoder layer) on --world ranks [%(default)s]")
    step.add_argument("--world", type=int, default=2, help="ranks for --parallel (gloo on a CPU, nccl on GPUs) [%(default)s]")
    step.add_argument("--ddp-bucket-mb", type=float, default=25.0,
                      help="DDP bucket_cap_mb; small values split each graph into DDPOptimizer pieces [%(default)s]")
    step.add_argument("--checkpointing", action="store_true",
                      help="HF gradient checkpointing (use_reentrant=False) on every contestant, floor included")
    step.add_argument("--quant", choices=("nf4", "fp4"), default=None,
                      help="QLoRA: every contestant's base (floor included) saved and reloaded 4-bit with bitsandbytes' "
                           "BitsAndBytesConfig (double quantisation, fp32 compute); needs the quant extra")
    step.add_argument("--seed", type=int, default=0, help="seeds weights, batch and dropout [%(default)s]")
    step.add_argument("--inner", choices=INNERS, default="inductor",
                      help="aot_eager: compile floor, peft-inductor and fxlora (option inner) without codegen; for smoke tests [%(default)s]")
    step.add_argument("--fxlora-options", type=_json_object, default={}, metavar="JSON",
                      help="options dict for torch.compile(backend='fxlora', options=...) [{}]")
    step.add_argument("--no-compile-cache", action="store_true",
                      help="no graph caches and an empty kernel cache dir, so compile times are cold")

    model = p.add_argument_group("model (a small random-init Llama, or a diffusers DiT with --family dit)")
    model.add_argument("--family", choices=("llama", "dit"), help="[llama]; dit: LoRA on the DiT's attention and feed-forward linears, seq = patch tokens")
    defaults = ModelShape()
    for name in ("hidden", "intermediate", "layers", "heads", "vocab", "batch"):
        model.add_argument(f"--{name}", type=int, help=f"[{getattr(defaults, name)}; quick: {getattr(QUICK_SHAPE, name)}]")

    out = p.add_argument_group("output")
    out.add_argument("--out-dir", default="benchmarks", help="where JSON, CSV and Markdown go [%(default)s]")
    out.add_argument("--tag", help="file name tag [a timestamp; 'quick' with --quick]")
    out.add_argument("--plot", help=f"PNG path [{DEFAULT_PLOT}; <out-dir>/lora_quick.png with --quick]")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG (and matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--profile", action="store_true",
                     help="after the timed rounds, one profiled step per contestant: top ops by self time with shapes, "
                          "rank-r GEMMs and full-size copies, in <out-dir>/profile_<tag>/")
    out.add_argument("--memory-frontier", action="store_true",
                     help="saved bytes against step time: peft-inductor under activation_memory_budget, fxlora under "
                          "memory_budget (--budgets), PEFT with HF checkpointing; each point its own process with empty "
                          "Inductor caches; one case (the first of --seqs/--ranks/--dropouts); plot docs/img/memory_frontier.png")
    out.add_argument("--budgets", type=_budgets, default=tuple(b for b in BUDGETS if b is not None),
                     help="--memory-frontier's budgets: fractions of each contestant's unbudgeted step, or bytes such as "
                          "74MiB (fxlora only: a peer point's bytes); none is always run [0.7,0.5,0.3,0.1]")
    out.add_argument("--rounds", type=int, default=1,
                     help="--memory-frontier: run every point this many times (odd rounds in reverse order); "
                          "each point's step is the median of its rounds [%(default)s]")
    out.add_argument("--frontier-point", help=argparse.SUPPRESS)  # a child of --memory-frontier: measure one point
    out.add_argument("--frontier-out", help=argparse.SUPPRESS)
    out.add_argument("--from-json", metavar="PATH", help="measure nothing: redraw table and plot from a saved lora_<tag>.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.tag = _run_tag(args)  # once: profiles are written before the table, under the same tag
    return args


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _budgets(text: str) -> tuple:
    """Fractions as floats, sizes ("74MiB") as given."""
    out = []
    for x in (x.strip() for x in text.split(",") if x.strip()):
        try:
            out.append(float(x))
        except ValueError:
            out.append(x)
    return tuple(out)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in ALL_CONTESTANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown contestants {unknown}; choose from {_csv(ALL_CONTESTANTS)}")
    return names


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose from {_csv(VARIANTS)}")
    return names


def _json_object(text: str) -> dict:
    try:
        return json_object(text, "the option")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


# ----------------------------------------------------------------------------- from flags to a sweep


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK_SHAPE if args.quick else ModelShape()
    overrides = {k: getattr(args, k) for k in ("family", "hidden", "intermediate", "layers", "heads", "vocab", "batch") if getattr(args, k)}
    return Settings(
        shape=ModelShape(**{**_shape_dict(base), **overrides}),
        adapter=args.adapter,
        dtype=args.dtype,
        steps=args.steps,
        warmup=args.warmup,
        contestants=contestants_for(args.contestants, args.variants)
        + ((LORA_REFERENCE,) if args.adapter == "dora" and "fxlora" in args.contestants else ()),
        inner=args.inner,
        fxlora_options=args.fxlora_options,
        seed=args.seed,
        device=args.device,
        parallel=args.parallel,
        ddp_bucket_mb=args.ddp_bucket_mb,
        profile_dir=os.path.join(args.out_dir, f"profile_{args.tag}") if args.profile else None,
        checkpointing=args.checkpointing,
        quant=args.quant,
    )


def _shape_dict(shape: ModelShape) -> dict[str, Any]:
    return {k: getattr(shape, k) for k in shape.__dataclass_fields__}


def cases_from(args: argparse.Namespace):
    seqs = args.seqs or (QUICK_SEQS if args.quick else DEFAULT_SEQS)
    if args.long and LONG_SEQ not in seqs:
        seqs = (*seqs, LONG_SEQ)
    ranks = args.ranks or (QUICK_RANKS if args.quick else DEFAULT_RANKS)
    dropouts = args.dropouts if args.dropouts is not None else (QUICK_DROPOUTS if args.quick else DEFAULT_DROPOUTS)
    if args.adapter == "ia3":  # no rank, no dropout
        ranks, dropouts = (0,), (0.0,)
    return sweep_cases(seqs, ranks, dropouts)


# ----------------------------------------------------------------------------- outputs


def markdown_table(result: BenchResult) -> str:
    """The table for README: a caption naming machine, torch, dtype and shapes, then one row per measurement."""
    header = ["seq", "rank", "dropout", "contestant", "step ms", "spread", "saved MiB", "time vs best peer",
              "vs best peer", "saved vs best peer", "time tax", "saved tax", "compile s"]
    lines = [caption(result), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in result.measurements:
        lines.append("| " + " | ".join(_row_cells(m)) + " |")
    return "\n".join(lines + _host_work(result)) + "\n"


def _host_work(result: BenchResult) -> list[str]:
    """With --profile: ATen calls per step outside Inductor's kernels (a launch each on a GPU), per contestant."""
    profiled = [m for m in result.measurements if m.profile]
    if not profiled:
        return []
    lines = ["", "Host work, one profiled step: ATen calls (nested included) and those more than a view or an "
             "allocation; calls fused into Inductor's kernels are not ATen calls.", "",
             "| seq | rank | dropout | contestant | ATen calls | more than a view/allocation | rank-r GEMMs | full-size copies |",
             "|---|---|---|---|---|---|---|---|"]
    for m in profiled:
        p = m.profile
        lines.append(f"| {m.seq} | {m.rank} | {m.dropout:g} | {m.contestant} | {p.get('aten_calls', '?')} | "
                     f"{p.get('aten_work_calls', '?')} | {p.get('rank_gemms', '?')} | {p.get('full_copies', '?')} |")
    return lines


def caption(result: BenchResult) -> str:
    s, m = result.settings, result.machine
    shape = s["shape"]
    return (
        f"{_ADAPTER_NAMES[s.get('adapter', 'lora')]} training step (forward + backward + AdamW) on {m['processor']}, {m['cpu_count']} CPUs "
        f"({m['torch_threads']} torch threads), {m['device']}; torch {m['torch']}, transformers {m.get('transformers', '?')}, "
        f"peft {m.get('peft', '?')}, fxlora {m.get('fxlora_commit') or '?'}. "
        + (f"{m['parallel']}{_buckets(s)}, figures per rank (rank 0). " if m.get("parallel") else "")
        + f"{s['dtype']}; random-init {describe_model(shape)}; {_adapter_targets(s)}. "
        + ("HF gradient checkpointing (use_reentrant=False) on every contestant, floor included; Dynamo's "
           "skip_fwd_side_effects_in_bwd_under_checkpoint on for all, so every compiled contestant traces its layers. "
           if s.get("checkpointing") else "")
        + (f"Base weights 4-bit ({s['quant']}, double quantisation, bitsandbytes, fp32 compute) for every contestant, floor included. "
           if s.get("quant") else "")
        + f"Median of {s['steps']} steps after {s['warmup']} warm-up, contestants interleaved; inner compiler {s['inner']}; "
        f"fxlora options {json.dumps(s['fxlora_options_used'])}. Best peer = better of peft-eager and peft-inductor per figure; "
        f"tax = (x - floor) / (best peer - floor). Saved = bytes saved for backward, parameters excluded. "
        f"Spread = (2nd largest - 2nd smallest step) / median; \"vs best peer\" says faster or slower only beyond the "
        f"larger of the two spreads. * = spread over {NOISY_SPREAD:.0%} of the median (busy machine?); load average "
        f"{_load(m.get('loadavg_before'))} before, {_load(m.get('loadavg_after'))} after."
    )


_ADAPTER_NAMES = {"lora": "LoRA", "ia3": "IA3", "vera": "VeRA", "reft": "LoReFT", "dora": "DoRA"}


def _adapter_targets(s: dict) -> str:
    adapter = s.get("adapter", "lora")
    if adapter == "ia3":
        return "PEFT IA3 on its default targets (k, v, down_proj; down_proj input-scaled)"
    if adapter == "vera":
        return "PEFT VeRA on q_proj and v_proj"
    if adapter == "reft":
        return "fxlora.reft LoReFT on o_proj and down_proj outputs, every position (peft-* = the same model uncompiled / under Inductor)"
    if adapter == "dora":
        return (f"PEFT DoRA (use_dora=True) on all linears, alpha {s['lora_alpha']}; "
                f"{LORA_REFERENCE} = fxlora on the same model with plain LoRA")
    return f"LoRA on all linears, alpha {s['lora_alpha']}"


def _buckets(s: dict) -> str:
    return f" with {s['ddp_bucket_mb']:g} MB DDP buckets" if s.get("parallel") == "ddp" else ""


def _load(load) -> str:
    return "?" if not load else "/".join(f"{x:.1f}" for x in load)


def _row_cells(m: Measurement) -> list[str]:
    lead = [str(m.seq), str(m.rank), f"{m.dropout:g}", m.contestant]
    if m.error:
        return lead + [f"error: {m.error[:80]}"] + [""] * 8
    return lead + [
        f"{m.step_ms:.1f}" + ("*" if m.noisy else ""), f"{m.step_spread:.0%}", f"{m.saved_bytes / MIB:.1f}",
        _ratio(m.time_ratio), m.verdict or "–", _ratio(m.saved_ratio),
        _num(m.time_tax), _num(m.saved_tax), f"{m.compile_s:.1f}".replace("-0.0", "0.0"),
    ]


def _ratio(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _num(x: Optional[float]) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}"


def write_json(result: BenchResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result.to_dict(), f, indent=1, default=str)
        f.write("\n")


def write_csv(result: BenchResult, path: str) -> None:
    columns = measurement_columns()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "saved_mib", "dtype", "torch"])
        for m in result.measurements:
            row = [getattr(m, c) for c in columns]
            writer.writerow([*("" if v is None else v for v in row), m.saved_mib, result.settings["dtype"], result.machine["torch"]])


def _run_tag(args: argparse.Namespace) -> str:
    """The file-name tag of a run: --tag, or 'quick', or a timestamp (prefixed by the parallel mode)."""
    tag = args.tag or ("quick" if args.quick else time.strftime("%Y%m%d-%H%M%S"))
    return f"{args.parallel}{args.world}_{tag}" if args.parallel != "none" and not args.tag else tag


def write_outputs(result: BenchResult, args: argparse.Namespace) -> list[str]:
    """Write every file the run promises; return their paths for the closing message."""
    tag = args.tag
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"{args.adapter}_{tag}")
    table = markdown_table(result)
    paths = [stem + ".json", stem + ".csv", stem + ".md"]
    write_json(result, paths[0])
    write_csv(result, paths[1])
    _write_text(paths[2], table)
    if not args.quick:
        paths.append(os.path.join(args.out_dir, "latest.md"))
        _write_text(paths[-1], table)
    if not args.no_plot:
        default_plot = DEFAULT_PLOT.replace("lora", args.adapter)
        plot_path = args.plot or (os.path.join(args.out_dir, f"{args.adapter}_quick.png") if args.quick else default_plot)
        plot_result(result, plot_path)
        paths.append(plot_path)
    return paths


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.no_compile_cache:
            _cold_compile_caches(stack.enter_context(tempfile.TemporaryDirectory(prefix="fxlora-bench-inductor-")))
        return run(args)


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        return redraw(args)
    if args.frontier_point:
        return frontier_point(args)
    if args.memory_frontier:
        return memory_frontier(args)
    settings = settings_from(args)
    cases = cases_from(args)
    if settings.steps < 5 or settings.warmup < 2:
        print(f"note: {settings.steps} timed / {settings.warmup} warm-up steps is below measuring.md's 5 / 2", file=sys.stderr)
    if settings.parallel != "none":
        result = run_sweep_on_ranks(cases, settings, args.world, progress=not args.no_progress)
    else:
        progress = TqdmProgress(len(cases) * steps_per_case(settings), disable=args.no_progress)
        try:
            result = run_sweep(cases, settings, progress)
        finally:
            progress.close()
    paths = write_outputs(result, args)
    print(markdown_table(result))
    print(f"{len(result.measurements)} measurements in {result.duration_s:.0f} s; wrote {', '.join(paths)}")
    for m in result.errors:
        print(f"error: {m.contestant} at {m.case.label()}: {m.error}", file=sys.stderr)
    for m in result.measurements:
        if m.contestant.startswith("fxlora") and m.fxlora_sites == 0:
            print(f"warning: {m.contestant} at {m.case.label()} rewrote no site: its row measures the untouched "
                  "model (a recompile limit? run with TORCH_LOGS=recompiles)", file=sys.stderr)
    return 1 if result.errors else 0


DEFAULT_FRONTIER_PLOT = os.path.join("docs", "img", "memory_frontier.png")


def memory_frontier(args: argparse.Namespace) -> int:
    """Every point in a child process of this command (see fxlora/bench/frontier.py); table, JSON and plot here."""
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    settings, cases = settings_from(args), cases_from(args)
    start = time.time()
    rows = run_frontier(frontier_points((None, *args.budgets)), child_argv(args.argv), rounds=args.rounds,
                        progress=not args.no_progress)
    case, shape = cases[0], settings.shape
    title = (f"{describe_model(_shape_dict(shape))}, {case.label()}, {settings.dtype}, "
             f"{settings.device}; {settings.steps} steps per point" + (f", median of {args.rounds} rounds" if args.rounds > 1 else ""))
    table = frontier_table(rows)
    print(title + "\n\n" + table)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"frontier_{args.tag}")
    record = {"title": title, "machine": machine_info(settings), "duration_s": time.time() - start,
              "points": [{"point": dataclasses.asdict(p), "measurement": dataclasses.asdict(m)} for p, m in rows]}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    _write_text(stem + ".md", title + "\n\n" + table + "\n")
    if not args.no_plot:
        plot_frontier(rows, args.plot or DEFAULT_FRONTIER_PLOT, title)
    return 1 if any(m.error for _, m in rows) else 0


def frontier_point(args: argparse.Namespace) -> int:
    """A child of --memory-frontier: measure one point, write its Measurement as JSON."""
    point = Point(**json.loads(args.frontier_point))
    m = measure_point(point, cases_from(args)[0], settings_from(args), measure_case)
    with open(args.frontier_out, "w") as f:
        json.dump(dataclasses.asdict(m), f)
    return 0 if not m.error else 1


def redraw(args: argparse.Namespace) -> int:
    """Table to stdout (and --out-dir's latest.md unless --quick), plot to --plot or the default; no measuring."""
    with open(args.from_json) as f:
        result = BenchResult.from_dict(json.load(f))
    table = markdown_table(result)
    print(table)
    if not args.quick:
        os.makedirs(args.out_dir, exist_ok=True)
        _write_text(os.path.join(args.out_dir, "latest.md"), table)
    if not args.no_plot:
        plot_result(result, args.plot or DEFAULT_PLOT)
    return 0


def _cold_compile_caches(cache_dir: str) -> None:
    """No graph caches and an empty kernel cache directory: every compile of the run starts cold."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    # --parallel's ranks are fresh interpreters: they read the caches' switches from the environment
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"


if __name__ == "__main__":
    sys.exit(main())
