"""What a sweep gives back: one Measurement per contestant and case, and the figures derived against the best peer and the floor."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Optional

from fxlora.bench.spec import FLOOR, MIB, NOISY_SPREAD, PEERS, Case

@dataclass
class Measurement:
    """One contestant on one case. Derived figures are None where a peer or the floor is missing."""

    contestant: str
    seq: int
    rank: int
    dropout: float
    step_ms: float = float("nan")  # median of the timed steps
    step_ms_all: list[float] = field(default_factory=list)
    step_spread: float = float("nan")  # (2nd largest - 2nd smallest) / median (measuring.md); max - min under 4 steps
    first_step_ms: float = float("nan")
    compile_s: float = float("nan")  # first step minus the median step
    saved_bytes: int = 0  # saved for backward, parameters excluded (they live anyway)
    saved_param_bytes: int = 0  # parameter storages saved for backward, for the record
    first_loss: float = float("nan")  # before any optimizer step: equal weights give equal losses
    peak_bytes: Optional[int] = None  # CUDA only: max allocated during the saved-bytes step
    fxlora_sites: Optional[int] = None  # sites fxlora rewrote (every kind), fxlora contestant only
    fxlora_ddp_pieces: Optional[int] = None  # bucket sub-graphs DDP cut fxlora's graphs into (--parallel ddp)
    gemm_reads: Optional[list] = None  # per set of LoRA sites sharing x: GEMMs reading x and dY (kinds/lora/group.py)
    error: Optional[str] = None
    profile: Optional[dict] = None  # bench/profile.py's ProfileSummary of one step, with --profile
    verdict: Optional[str] = None  # against the best peer's time: "faster", "slower" or "within noise"
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
        best = min((group[p] for p in PEERS if p in group), key=lambda m: m.step_ms, default=None)
        for m in group.values():
            m.verdict = None if best is None or m is best else verdict(m, best)


def verdict(m: Measurement, peer: Measurement) -> str:
    """Faster or slower than the peer only beyond the larger of the two spreads (measuring.md)."""
    noise = max(m.step_spread, peer.step_spread)
    change = m.step_ms / peer.step_ms - 1
    if abs(change) <= noise:
        return "within noise"
    return "faster" if change < 0 else "slower"


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


def describe_model(shape: dict, short: bool = False) -> str:
    """The benchmark's model in words, for captions (long) and plot titles (short)."""
    if short:
        return f"{shape['family']} h{shape['hidden']} i{shape['intermediate']} L{shape['layers']} vocab {shape['vocab']}"
    return (f"{shape['family']} hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['layers']} layers, "
            f"{shape['heads']} heads, vocab {shape['vocab']}, batch {shape['batch']}")
