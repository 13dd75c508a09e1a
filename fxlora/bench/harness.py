"""Side-by-side LoRA training-step measurements, as /work/shared/notes/measuring.md prescribes.

A claim of fxlora is a ratio taken in one run against the strongest peer on the same
work, so every configuration builds four contestants from the same seed (same weights,
same batch, same dtype, same AdamW step) and runs them interleaved, step by step:

    floor          base model, no adapters, only the input embeddings train (Inductor):
                   the physical limit of this step, which no exact rewrite can beat
    peft-eager     PEFT LoRA, no compile
    peft-inductor  PEFT LoRA, torch.compile(model)
    fxlora         PEFT LoRA, torch.compile(model, backend="fxlora", options=...)

Per contestant and configuration: the median step time, the compile time (first step
minus the median, reported apart), the bytes saved for backward, and the figures
derived from them against the best peer (the better of peft-eager and peft-inductor,
per figure) and the floor (the adapter tax).
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
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from fxlora.testing.models import tiny_model, token_batch, with_ia3, with_lora, with_vera

FLOOR = "floor"
NOISE = "noise"  # the DiT batch's target, not a model input
PEERS = ("peft-eager", "peft-inductor")
CONTESTANTS = (FLOOR, *PEERS, "fxlora")
# Opt-in forms (docs/lossy.md). `variants` turns the fxlora contestant into one per variant
# ("fxlora" = exact, "fxlora-<variant>" otherwise); a LoRA-FA variant brings PEFT with every
# A frozen, eager and Inductor: the honest peer, since autograd then keeps only x A^T too.
VARIANTS = ("exact", "lora-fa", "velora", "lora-fa+velora")
FA_PEERS = ("peft-fa-eager", "peft-fa-inductor")
VARIANT_CONTESTANTS = tuple("fxlora" if v == "exact" else f"fxlora-{v}" for v in VARIANTS)
ALL_CONTESTANTS = (*CONTESTANTS, *FA_PEERS, *VARIANT_CONTESTANTS[1:])
VELORA_BENCH = {"method": "velora", "sub_token": "D/32", "targets": ["all"]}  # every site: no x left saved
DTYPES = ("fp32", "bf16")
ADAPTERS = ("lora", "ia3", "vera", "reft")  # PEFT LoraConfig, IA3Config (default targets), VeraConfig; fxlora.reft LoReFT
INNERS = ("inductor", "aot_eager")
PARALLEL = ("none", "ddp", "fsdp")
MIB = 2**20
NOISY_SPREAD = 0.25  # (max - min) / median of the timed steps above which a step time is flagged noisy


# ----------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class ModelShape:
    """A small Llama: wide enough for the adapters to matter, vocab small so the LM head does not dominate."""

    family: str = "llama"
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    vocab: int = 2048
    batch: int = 1


@dataclass(frozen=True)
class Case:
    """One configuration of the sweep; every contestant runs it."""

    seq: int
    rank: int
    dropout: float

    def label(self) -> str:
        return f"seq={self.seq} r={self.rank} p={self.dropout:g}"


@dataclass(frozen=True)
class Settings:
    """Everything held fixed across a sweep.

    inner: "inductor" is the real comparison; "aot_eager" compiles every compiled
        contestant (floor, peft-inductor, fxlora) without codegen, for fast smoke tests.
    fxlora_options: passed as `torch.compile(..., options=...)`; a parameter because the
        rewrite options change faster than this harness.
    """

    shape: ModelShape = ModelShape()
    adapter: str = "lora"
    dtype: str = "fp32"
    steps: int = 5
    warmup: int = 2
    contestants: tuple[str, ...] = CONTESTANTS
    inner: str = "inductor"
    fxlora_options: Mapping[str, Any] = field(default_factory=dict)
    lora_alpha: int = 16
    lr: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    parallel: str = "none"  # "ddp" or "fsdp": each contestant wrapped on every rank (fxlora.bench.distributed)
    ddp_bucket_mb: float = 25.0  # DDP's bucket_cap_mb; small values make Dynamo split each graph into pieces

    def __post_init__(self):
        unknown = [c for c in self.contestants if c not in ALL_CONTESTANTS]
        if unknown or not self.contestants:
            raise ValueError(f"unknown contestants {unknown}; choose from {', '.join(ALL_CONTESTANTS)}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.inner not in INNERS:
            raise ValueError(f"inner must be one of {INNERS}, got {self.inner!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.warmup < 1 or self.steps < 1:
            raise ValueError("need at least 1 warm-up step (it carries the compile) and 1 timed step")


# ----------------------------------------------------------------------------- what comes out


@dataclass
class Measurement:
    """One contestant on one case. Derived figures are None where a peer or the floor is missing."""

    contestant: str
    seq: int
    rank: int
    dropout: float
    step_ms: float = float("nan")  # median of the timed steps
    step_ms_all: list[float] = field(default_factory=list)
    step_spread: float = float("nan")  # (max - min) / median: another process on the cores shows up here
    first_step_ms: float = float("nan")
    compile_s: float = float("nan")  # first step minus the median step
    saved_bytes: int = 0  # saved for backward, parameters excluded (they live anyway)
    saved_param_bytes: int = 0  # parameter storages saved for backward, for the record
    first_loss: float = float("nan")  # before any optimizer step: equal weights give equal losses
    peak_bytes: Optional[int] = None  # CUDA only: max allocated during the saved-bytes step
    fxlora_sites: Optional[int] = None  # sites fxlora rewrote (every kind), fxlora contestant only
    fxlora_ddp_pieces: Optional[int] = None  # bucket sub-graphs DDP cut fxlora's graphs into (--parallel ddp)
    error: Optional[str] = None
    time_ratio: Optional[float] = None  # step_ms / best peer's step_ms
    saved_ratio: Optional[float] = None
    time_tax: Optional[float] = None  # (this - floor) / (best peer - floor)
    saved_tax: Optional[float] = None

    @property
    def saved_mib(self) -> float:
        return self.saved_bytes / MIB

    @property
    def case(self) -> Case:
        return Case(self.seq, self.rank, self.dropout)

    @property
    def noisy(self) -> bool:
        return self.step_spread > NOISY_SPREAD


@dataclass
class BenchResult:
    """A whole sweep with what a reader needs to judge it: machine, torch, dtype, shapes."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    measurements: list[Measurement]
    started: str
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "started": self.started,
            "duration_s": self.duration_s,
            "measurements": [asdict(m) for m in self.measurements],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BenchResult":
        """Back from the JSON, so a long sweep's table and plot can be redrawn without rerunning it."""
        known = {f.name for f in fields(Measurement)}
        return cls(
            machine=dict(data["machine"]),
            settings=dict(data["settings"]),
            measurements=[Measurement(**{k: v for k, v in m.items() if k in known}) for m in data["measurements"]],
            started=data["started"],
            duration_s=data["duration_s"],
        )

    @property
    def errors(self) -> list[Measurement]:
        return [m for m in self.measurements if m.error]


def measurement_columns() -> list[str]:
    """Flat columns for a CSV row; the per-step list is left to the JSON."""
    return [f.name for f in fields(Measurement) if f.name != "step_ms_all"]


# ----------------------------------------------------------------------------- progress


class Progress:
    """What the harness tells a progress display (the CLI's tqdm bar); the default says nothing."""

    def start(self, label: str) -> None:
        pass

    def done(self) -> None:
        pass


def steps_per_case(settings: Settings) -> int:
    """Steps one case runs: per contestant, warm-up (first one compiles) + saved-bytes probe + timed."""
    return len(settings.contestants) * (settings.warmup + 1 + settings.steps)


# ----------------------------------------------------------------------------- contestants


@dataclass
class Contestant:
    """A model ready to train, its optimizer, and what its steps have measured so far."""

    name: str
    model: nn.Module  # what is called: compiled or not
    optimizer: torch.optim.Optimizer
    param_storages: frozenset[int]  # data_ptrs of parameter/buffer storages, not counted as saved activations
    result: Measurement


def build_model(name: str, case: Case, settings: Settings) -> nn.Module:
    """The same random weights for every contestant: tiny_model and with_lora seed themselves."""
    s = settings.shape
    if s.family == "dit":
        return _build_dit(name, case, settings)
    model = tiny_model(
        s.family, hidden=s.hidden, intermediate=s.intermediate, layers=s.layers, heads=s.heads,
        vocab=s.vocab, max_positions=max(4096, case.seq), seed=settings.seed,
    )
    if name == FLOOR:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # something must need grad for backward to run
    elif name in FA_PEERS or name.startswith("fxlora-"):
        model = with_lora(model, s.family, r=case.rank, alpha=settings.lora_alpha, dropout=case.dropout, seed=settings.seed)
        if "velora" in name:  # v from the batch every step sees (deterministic from the seed)
            import fxlora

            fxlora.velora.prepare(model, token_batch(s.batch, case.seq, s.vocab, settings.seed), VELORA_BENCH)
        if "lora-fa" in name or name in FA_PEERS:
            import fxlora

            fxlora.freeze_lora_A(model)
    elif settings.adapter == "ia3":  # PEFT's default IA3 targets; rank and dropout do not apply
        model = with_ia3(model, s.family, seed=settings.seed)
    elif settings.adapter == "vera":
        model = with_vera(model, s.family, r=case.rank, dropout=case.dropout, seed=settings.seed)
    elif settings.adapter == "reft":  # LoReFT on every write into the residual stream (o_proj, down_proj)
        from fxlora.reft import attach_reft

        model = attach_reft(model, ("o_proj", "down_proj"), kind="loreft", r=case.rank, seed=settings.seed)
    else:
        model = with_lora(model, s.family, r=case.rank, alpha=settings.lora_alpha, dropout=case.dropout, seed=settings.seed)
    return model.to(settings.device).train()


def _build_dit(name: str, case: Case, settings: Settings) -> nn.Module:
    """A diffusers DiT seeing `case.seq` patch tokens ("Activations are not cheap in LoRA, weights are" measured DiT); LoRA on its linears."""
    from fxlora.testing.diffusion import dit_sample_size, tiny_dit, with_dit_lora

    if settings.adapter != "lora" or name != FLOOR and name not in PEERS and name != "fxlora":
        raise ValueError("the DiT rows measure exact LoRA only (floor, peft-eager, peft-inductor, fxlora)")
    s = settings.shape
    model = tiny_dit(hidden=s.hidden, layers=s.layers, heads=s.heads, sample_size=dit_sample_size(case.seq), seed=settings.seed)
    if name == FLOOR:
        model.requires_grad_(False)
        model.pos_embed.proj.weight.requires_grad_(True)  # the patch embedding: backward runs through every block
    else:
        model = with_dit_lora(model, r=case.rank, alpha=settings.lora_alpha, dropout=case.dropout, seed=settings.seed)
    return model.to(settings.device).train()


def make_batch(case: Case, settings: Settings) -> dict[str, torch.Tensor]:
    """Token ids and labels for a language model; latents, timesteps, labels and the noise target for a DiT."""
    s = settings.shape
    if s.family == "dit":
        from fxlora.testing.diffusion import IN_CHANNELS, dit_batch

        batch = dit_batch(s.batch, case.seq, settings.seed)
        gen = torch.Generator().manual_seed(settings.seed + 1)
        batch[NOISE] = torch.randn(batch["hidden_states"].shape[0], IN_CHANNELS, *batch["hidden_states"].shape[2:], generator=gen)
    else:
        batch = token_batch(s.batch, case.seq, s.vocab, settings.seed)
    return {k: v.to(settings.device) for k, v in batch.items()}


def step_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if NOISE in batch:  # DiT: epsilon-prediction MSE
        from fxlora.testing.diffusion import diffusion_loss

        return diffusion_loss(model, {k: v for k, v in batch.items() if k != NOISE}, batch[NOISE])
    return model(**batch).loss


def compile_for(name: str, model: nn.Module, settings: Settings) -> nn.Module:
    """torch.compile once per contestant per case; with inner="aot_eager" every compiler skips codegen."""
    if name in ("peft-eager", "peft-fa-eager"):
        return model
    if name == "fxlora" or name.startswith("fxlora-"):
        options = fxlora_options(settings)
        if "velora" in name:
            options["compress"] = VELORA_BENCH
        return torch.compile(model, backend="fxlora", options=options)
    if settings.inner == "aot_eager":
        return torch.compile(model, backend="aot_eager")
    return torch.compile(model)


def fxlora_options(settings: Settings) -> dict[str, Any]:
    """The user's options, with the inner compiler forced when the whole run falls back from Inductor."""
    options = dict(settings.fxlora_options)
    if settings.inner != "inductor":
        options["inner"] = settings.inner
    return options


def build_contestant(name: str, case: Case, settings: Settings) -> Contestant:
    model = build_model(name, case, settings)
    if settings.parallel != "none":
        from fxlora.bench.distributed import parallelize

        model = parallelize(model, settings.parallel, bucket_mb=settings.ddp_bucket_mb)
    trainable = [p for p in model.parameters() if p.requires_grad]
    storages = param_storages(model)
    return Contestant(
        name=name,
        model=compile_for(name, model, settings),
        optimizer=torch.optim.AdamW(trainable, lr=settings.lr),
        param_storages=storages,
        result=Measurement(name, case.seq, case.rank, case.dropout),
    )


def param_storages(model: nn.Module) -> frozenset[int]:
    """data_ptrs of the storages a model's parameters and buffers hold now (an FSDP shard: its local tensor)."""
    return frozenset(
        getattr(t, "_local_tensor", t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
    )


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
        import fxlora

        fxlora.clear_reports()
    c.result.first_step_ms, c.result.first_loss = timed_step(c, batch, settings, settings.seed)
    if is_fxlora:
        graphs = fxlora.last_report().graphs
        c.result.fxlora_sites = sum(g.rewritten for g in graphs)
        c.result.fxlora_ddp_pieces = sum(len(g.pieces) for g in graphs) or None


def _round(contestants: Sequence[Contestant], progress: Progress, label: str, step: Callable[[Contestant], Any]) -> None:
    for c in contestants:
        progress.start(f"{label}: {c.name}")
        step(c)
        progress.done()


def _rotated(items: Sequence, i: int) -> list:
    """A different contestant goes first each round, so none always runs on a cold cache."""
    k = i % len(items) if items else 0
    return [*items[k:], *items[:k]]


def _summarise(m: Measurement) -> None:
    m.step_ms = statistics.median(m.step_ms_all)
    m.step_spread = (max(m.step_ms_all) - min(m.step_ms_all)) / m.step_ms
    m.compile_s = (m.first_step_ms - m.step_ms) / 1e3


def _skip_progress(progress: Progress, n: int) -> None:
    for _ in range(n):
        progress.done()


# ----------------------------------------------------------------------------- derived figures


def derive(measurements: Iterable[Measurement]) -> None:
    """Fill ratios against the best peer and the adapter tax, per case and per figure."""
    by_case: dict[Case, dict[str, Measurement]] = {}
    for m in measurements:
        if m.error is None:
            by_case.setdefault(m.case, {})[m.contestant] = m
    for group in by_case.values():
        for figure, ratio, tax in (("step_ms", "time_ratio", "time_tax"), ("saved_bytes", "saved_ratio", "saved_tax")):
            peer = _best_peer(group, figure)
            floor = getattr(group[FLOOR], figure) if FLOOR in group else None
            for m in group.values():
                value = getattr(m, figure)
                setattr(m, ratio, value / peer if peer else None)
                setattr(m, tax, adapter_tax(value, floor, peer))


def _best_peer(group: Mapping[str, Measurement], figure: str) -> Optional[float]:
    values = [getattr(group[p], figure) for p in PEERS if p in group]
    return min(values) if values else None


def adapter_tax(value: float, floor: Optional[float], peer: Optional[float]) -> Optional[float]:
    """(value - floor) / (peer - floor): 1.0 costs what the best peer's adapters cost, 0.0 costs nothing.

    Undefined (None) without a floor or a peer, or when the peer is not above the floor
    (noise on tiny shapes), since the ratio would then mean nothing.
    """
    if floor is None or peer is None or peer - floor <= 0:
        return None
    return (value - floor) / (peer - floor)


# ----------------------------------------------------------------------------- the sweep


def contestants_for(contestants: Sequence[str], variants: Sequence[str]) -> tuple[str, ...]:
    """Expand "fxlora" into one contestant per variant; a LoRA-FA variant adds PEFT-with-A-frozen peers."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    out: list[str] = []
    for c in contestants:
        if c == "fxlora":
            out += [VARIANT_CONTESTANTS[VARIANTS.index(v)] for v in variants]
        else:
            out.append(c)
    if any("lora-fa" in v for v in variants):
        out += [f"peft-fa-{p.removeprefix('peft-')}" for p in PEERS if p in contestants]
    return tuple(dict.fromkeys(out))


def sweep_cases(seqs: Iterable[int], ranks: Iterable[int], dropouts: Iterable[float]) -> list[Case]:
    """Ordered so a rank/dropout pair's seqs run together: short configs first, failures show early."""
    return [Case(s, r, p) for r in ranks for p in dropouts for s in seqs]


def run_sweep(cases: Sequence[Case], settings: Settings, progress: Progress = Progress()) -> BenchResult:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = _loadavg()
    t0 = time.perf_counter()
    warm_up_inductor(settings)
    measurements: list[Measurement] = []
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
