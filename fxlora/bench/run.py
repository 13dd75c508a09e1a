"""Running a sweep: contestants interleaved step by step, what autograd saves, and the machine it ran on.

A claim of fxlora is a ratio taken in one run against the strongest peer on the same
work (/work/shared/notes/measuring.md), so every contestant of a case is built from the
same seed (same weights, same batch, same dtype, same AdamW step) and they take their
steps in turn:

    floor          base model, no adapters, only the input embeddings train (Inductor):
                   the physical limit of this step, which no exact rewrite can beat
    peft-eager     PEFT LoRA, no compile
    peft-inductor  PEFT LoRA, torch.compile(model)
    fxlora         PEFT LoRA, torch.compile(model, backend="fxlora", options=...)

Per contestant and case: the median step time, the compile time (first step minus the
median, reported apart), the bytes saved for backward; results.derive adds the figures
against the best peer and the floor.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

import fxlora
from fxlora.bench.contestants import Contestant, build_contestant, fxlora_options, make_batch, param_storages, step_loss
from fxlora.bench.profile import profile_step
from fxlora.bench.results import BenchResult, Measurement, derive
from fxlora.bench.spec import VELORA_BENCH, Case, Settings
from fxlora.kinds.lora.group import group_reads


# ----------------------------------------------------------------------------- progress


class Progress:
    """What a sweep tells a progress display (TqdmProgress); the default says nothing."""

    def start(self, label: str) -> None:
        pass

    def done(self) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress(Progress):
    """One bar over every step of the sweep; the postfix names the case and contestant running."""

    def __init__(self, total: int, disable: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="bench", disable=disable, dynamic_ncols=True)

    def start(self, label: str) -> None:
        self.bar.set_postfix_str(label, refresh=True)

    def done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- one step


def train_step(c: Contestant, batch: Mapping[str, torch.Tensor], settings: Settings, seed: int,
               forward_context: Any = None) -> float:
    """Forward, backward, AdamW step; the seed first so every contestant draws the same dropout stream.

    (Compiled dropout uses Inductor's RNG, so masks still differ between eager and
    compiled contestants; they are equally random, which is what fairness needs here.)
    `forward_context` wraps the forward only, where autograd saves tensors.
    """
    c.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with forward_context or contextlib.nullcontext(), autocast(settings):
        loss = step_loss(c.model, batch)
    loss.backward()
    c.optimizer.step()
    return loss.item()


def autocast(settings: Settings):
    if settings.dtype == "bf16":
        return torch.autocast(device_type=torch.device(settings.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed_step(c: Contestant, batch, settings: Settings, seed: int) -> tuple[float, float]:
    """(milliseconds, loss) of one step; synchronises on a GPU so the time is the work's, not the launch's."""
    _sync(settings)
    start = time.perf_counter()
    loss = train_step(c, batch, settings, seed)
    _sync(settings)
    return (time.perf_counter() - start) * 1e3, loss


def _sync(settings: Settings) -> None:
    if torch.device(settings.device).type == "cuda":
        torch.cuda.synchronize()


class SavedBytes:
    """Counts what autograd saves for backward: each storage once, fake tensors (tracing) skipped.

    Used as the forward's context: storages are read when forward ends, so a saved reference
    to a weight FSDP has freed (resized to 0 after forward) counts nothing, as it costs
    nothing. Compiled graphs save through the same hooks, so eager and compiled contestants
    are counted alike. Parameter storages are tallied apart: they are alive anyway.
    """

    def __init__(self, param_storages: frozenset[int], model: Optional[nn.Module] = None):
        self.param_storages = param_storages
        self.model = model  # read again when forward ends: FSDP's root keeps its unsharded parameters
        self.saved: dict[int, torch.UntypedStorage] = {}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not _is_fake(t):
            storage = t.untyped_storage()
            self.saved[storage.data_ptr()] = storage
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        if self.model is not None:
            self.param_storages = self.param_storages | param_storages(self.model)
        self.storages = {ptr: storage.nbytes() for ptr, storage in self.saved.items()}
        self.saved.clear()

    @property
    def activation_bytes(self) -> int:
        return sum(n for ptr, n in self.storages.items() if ptr not in self.param_storages)

    @property
    def param_bytes(self) -> int:
        return sum(n for ptr, n in self.storages.items() if ptr in self.param_storages)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def probe_step(c: Contestant, batch, settings: Settings, seed: int) -> None:
    """An untimed step under saved_tensors_hooks (the hooks cost time, so never on a timed step)."""
    counter = SavedBytes(c.param_storages, c.model)
    is_cuda = torch.device(settings.device).type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    train_step(c, batch, settings, seed, forward_context=counter)
    c.result.saved_bytes = counter.activation_bytes
    c.result.saved_param_bytes = counter.param_bytes
    if is_cuda:
        c.result.peak_bytes = torch.cuda.max_memory_allocated()


# ----------------------------------------------------------------------------- one case


def measure_case(case: Case, settings: Settings, progress: Progress = Progress()) -> list[Measurement]:
    """All contestants on one case, interleaved step by step; compiled state is dropped afterwards."""
    torch._dynamo.reset()
    # Every contestant is a new model through the same code (transformers' wrappers, PEFT's layers):
    # their compiles add up against Dynamo's recompile limit, which one training script never meets.
    # PEFT's DoRA under Inductor alone recompiles `wrapped_func` 8 times (a graph break per layer).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    batch = make_batch(case, settings)
    failed: list[Measurement] = []
    alive: list[Contestant] = []
    for name in settings.contestants:
        progress.start(f"{case.label()} {name}: compile")
        try:
            c = build_contestant(name, case, settings)
            first_step(c, batch, settings)
            alive.append(c)
        except Exception as err:  # one broken contestant must not cost the whole sweep
            failed.append(Measurement(name, case.seq, case.rank, case.dropout, error=f"{type(err).__name__}: {err}"))
        progress.done()

    for i in range(1, settings.warmup):
        _round(alive, progress, f"{case.label()} warm-up", lambda c: train_step(c, batch, settings, settings.seed + i))
    _round(alive, progress, f"{case.label()} saved bytes", lambda c: probe_step(c, batch, settings, settings.seed + settings.warmup))
    gc.collect()
    for i in range(settings.steps):
        seed = settings.seed + settings.warmup + 1 + i
        _round(_rotated(alive, i), progress, f"{case.label()} timed", lambda c: c.result.step_ms_all.append(timed_step(c, batch, settings, seed)[0]))
    for c in alive:
        _summarise(c.result)
    if settings.profile_dir:
        for c in alive:
            progress.start(f"{case.label()} profile: {c.name}")
            c.result.profile = _profile(c, case, batch, settings)
            progress.done()

    results = sorted([c.result for c in alive] + failed, key=lambda m: settings.contestants.index(m.contestant))
    _skip_progress(progress, len(failed) * (settings.warmup + settings.steps))
    del alive, batch
    gc.collect()
    torch._dynamo.reset()
    return results


def first_step(c: Contestant, batch, settings: Settings) -> None:
    """The step that compiles: its time and its loss (weights still untouched, so comparable across contestants)."""
    is_fxlora = c.name.startswith("fxlora")
    if is_fxlora:  # its reports alone (fxlora keeps only the latest 64)
        fxlora.clear_reports()
    c.result.first_step_ms, c.result.first_loss = timed_step(c, batch, settings, settings.seed)
    if is_fxlora:
        graphs = fxlora.last_report().graphs
        c.result.fxlora_sites = sum(g.all_rewritten for g in graphs)
        c.result.fxlora_ddp_pieces = sum(len(g.pieces) for g in graphs) or None
        lora = [r for g in graphs for part in (g, *g.regions) if (r := part.result("lora"))]
        c.result.gemm_reads = [row for r in lora for row in group_reads(r.match.sites, r.decisions)] or None


def _round(contestants: Sequence[Contestant], progress: Progress, label: str, step: Callable[[Contestant], Any]) -> None:
    for c in contestants:
        progress.start(f"{label}: {c.name}")
        step(c)
        progress.done()


def _rotated(items: Sequence, i: int) -> list:
    """A different contestant goes first each round, so none always runs on a cold cache."""
    k = i % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _profile(c: Contestant, case: Case, batch, settings: Settings) -> dict:
    os.makedirs(settings.profile_dir, exist_ok=True)
    path = os.path.join(settings.profile_dir, f"seq{case.seq}_r{case.rank}_p{case.dropout:g}_{c.name}.txt")
    shape = settings.shape
    title = f"{c.name}, {case.label()}, batch {shape.batch}, {settings.dtype}, one step (forward + backward + AdamW)"
    summary = profile_step(lambda: train_step(c, batch, settings, settings.seed), path, title, case.rank,
                           full_numel=shape.batch * case.seq * shape.hidden, cuda=torch.device(settings.device).type == "cuda")
    if c.result.gemm_reads:
        with open(path, "a") as f:
            f.write(_reads_table(c.result.gemm_reads))
    return {**summary.as_dict(), "path": path}


def _reads_table(rows: list[dict]) -> str:
    """Per set of LoRA sites sharing x: how many GEMMs read x (forward, backward) and the dYs."""
    lines = ["", "GEMMs reading each shared input x and the sites' dY (fxlora/kinds/lora/group.py gemm_reads):", "",
             "| sites | forms | one op | x reads forward | x reads backward | dY reads (all sites) |", "|---|---|---|---|---|---|"]
    lines += [f"| {', '.join(r['sites'])} | {', '.join(r['forms'])} | {'yes' if r['one_op'] else 'no'} | "
              f"{r['x_reads_forward']} | {r['x_reads_backward']} | {r['dy_reads']} |" for r in rows]
    return "\n".join(lines) + "\n"


def _summarise(m: Measurement) -> None:
    m.step_ms = statistics.median(m.step_ms_all)
    steps = sorted(m.step_ms_all)
    inner = steps[1:-1] if len(steps) >= 4 else steps
    m.step_spread = (inner[-1] - inner[0]) / m.step_ms
    m.compile_s = (m.first_step_ms - m.step_ms) / 1e3


def _skip_progress(progress: Progress, n: int) -> None:
    for _ in range(n):
        progress.done()


# ----------------------------------------------------------------------------- the sweep


def run_sweep(cases: Sequence[Case], settings: Settings, progress: Progress = Progress()) -> BenchResult:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = _loadavg()
    t0 = time.perf_counter()
    warm_up_inductor(settings)
    measurements: list[Measurement] = []
    # Checkpointed layers with Python side effects (transformers >= 5.25) trace under every compiled
    # contestant, not only fxlora (which turns this on for itself): the floor and peft-inductor at their best.
    skip = settings.checkpointing or torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=skip):
        for case in cases:
            measurements.extend(measure_case(case, settings, progress))
    derive(measurements)
    machine = machine_info(settings)
    machine["loadavg_before"], machine["loadavg_after"] = load_before, _loadavg()
    return BenchResult(
        machine=machine,
        settings=settings_record(settings, cases),
        measurements=measurements,
        started=started,
        duration_s=time.perf_counter() - t0,
    )


def warm_up_inductor(settings: Settings) -> None:
    """Pay Inductor's once-a-process costs (imports, toolchain probe) before a contestant's compile is timed.

    Without this the first compiled contestant of the sweep (the floor) carries them.
    Kernels compiled for one contestant still serve the next in the same process, so
    compile times stay indicative: compare them across runs, not within a case.
    """
    if settings.inner != "inductor" or set(settings.contestants) <= {"peft-eager"}:
        return
    x = torch.randn(64, requires_grad=True, device=settings.device)
    torch.compile(lambda t: (t.sin() * 2).sum())(x).backward()
    torch._dynamo.reset()


def _loadavg() -> Optional[tuple[float, ...]]:
    """The 1/5/15-minute load: other work on the cores makes step times meaningless."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


def settings_record(settings: Settings, cases: Sequence[Case]) -> dict[str, Any]:
    record = asdict(settings)
    record["fxlora_options"] = dict(settings.fxlora_options)
    record["fxlora_options_used"] = fxlora_options(settings)
    record["contestants"] = list(settings.contestants)
    if any("velora" in c for c in settings.contestants):
        record["velora"] = VELORA_BENCH
    record["seqs"] = sorted({c.seq for c in cases})
    record["ranks"] = sorted({c.rank for c in cases})
    record["dropouts"] = sorted({c.dropout for c in cases})
    record["lora_targets"] = "all-linear"
    record["optimizer"] = f"AdamW(lr={settings.lr}) on trainable parameters"
    record["compile_caches"] = _compile_caches()
    return record


def _compile_caches() -> dict[str, bool]:
    """Warm on-disk caches make compile time look small; say whether they were on."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return {
        "fx_graph_cache": bool(inductor_config.fx_graph_cache),
        "autograd_cache": bool(getattr(functorch_config, "enable_autograd_cache", False)),
    }


def machine_info(settings: Settings) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "fxlora_commit": _git_commit(),
        "device": settings.device,
    }
    if torch.device(settings.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    for pkg in ("transformers", "peft"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    return info


def _git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except Exception:
        return None
