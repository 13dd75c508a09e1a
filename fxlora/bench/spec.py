"""What a sweep runs: the names of contestants, adapters and variants, the model shape, the cases, the settings.

Every other bench module reads these, so this one imports nothing from the bench.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

FLOOR = "floor"
NOISE = "noise"  # the DiT batch's target, not a model input
PEERS = ("peft-eager", "peft-inductor")
CONTESTANTS = (FLOOR, *PEERS, "fxlora")
# Opt-in forms (docs/lossy.md). `variants` turns the fxlora contestant into one per variant
# ("fxlora" = exact, "fxlora-<variant>" otherwise); a LoRA-FA variant brings PEFT with every
# A frozen, eager and Inductor: the honest peer, since autograd then keeps only x A^T too.
# "ungrouped": exact, one op per site (group_shared_input=False), the before of shared-input groups.
# "opaque": exact, every op running its eager body (inline_ops=False), the before of compiled op bodies.
# "saved-bytes": exact, forms by the cost model alone (objective="saved_bytes": no timing).
VARIANTS = ("exact", "lora-fa", "velora", "lora-fa+velora", "ungrouped", "opaque", "saved-bytes")
EXACT_VARIANTS = {"fxlora-ungrouped": {"group_shared_input": False}, "fxlora-opaque": {"inline_ops": False},
                  "fxlora-saved-bytes": {"objective": "saved_bytes"}}
FA_PEERS = ("peft-fa-eager", "peft-fa-inductor")
VARIANT_CONTESTANTS = tuple("fxlora" if v == "exact" else f"fxlora-{v}" for v in VARIANTS)
LORA_REFERENCE = "fxlora-lora"  # --adapter dora: fxlora on the same model with plain LoRA, the cost DoRA should match
ALL_CONTESTANTS = (*CONTESTANTS, *FA_PEERS, *VARIANT_CONTESTANTS[1:], LORA_REFERENCE)
VELORA_BENCH = {"method": "velora", "sub_token": "D/32", "targets": ["all"]}  # every site: no x left saved
DTYPES = ("fp32", "bf16")
ADAPTERS = ("lora", "ia3", "vera", "reft", "dora")  # PEFT LoraConfig, IA3Config (default targets), VeraConfig; fxlora.reft LoReFT; LoraConfig(use_dora=True)
INNERS = ("inductor", "aot_eager")
PARALLEL = ("none", "ddp", "fsdp")
MIB = 2**20
NOISY_SPREAD = 0.25  # (max - min) / median of the timed steps above which a step time is flagged noisy


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
        rewrite options change faster than this benchmark.
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
    parallel: str = "none"  # "ddp" or "fsdp": each contestant wrapped on every rank (fxlora.bench.ranks)
    ddp_bucket_mb: float = 25.0  # DDP's bucket_cap_mb; small values make Dynamo split each graph into pieces
    profile_dir: Optional[str] = None  # one profiled step per contestant and case, written here (bench/profile.py)
    checkpointing: bool = False  # HF gradient checkpointing (use_reentrant=False) on every contestant, floor included
    quant: Optional[str] = None  # "nf4"/"fp4": every contestant's base reloaded 4-bit with bitsandbytes (QLoRA), floor included

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
        if self.quant not in (None, "nf4", "fp4"):
            raise ValueError(f"quant must be nf4 or fp4, got {self.quant!r}")
        if self.warmup < 1 or self.steps < 1:
            raise ValueError("need at least 1 warm-up step (it carries the compile) and 1 timed step")


def steps_per_case(settings: Settings) -> int:
    """Steps one case runs: per contestant, warm-up (first one compiles) + saved-bytes probe + timed."""
    return len(settings.contestants) * (settings.warmup + 1 + settings.steps + bool(settings.profile_dir))


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
