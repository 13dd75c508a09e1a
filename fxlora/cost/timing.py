"""Measured time of a site's candidate forms, for `objective="time"`.

FLOPs do not predict time where a GEMM has a dimension of r = 8: such GEMMs are bound by
memory traffic and by the BLAS's layout, and the forms differ by passes FLOPs do not see.
So each candidate form's op is run, forward and backward, on random tensors of the site's
size (at the size hints), on the device the graph runs on: all cases built and warmed
first (one warm-up call per set of sizes), then a few rounds of one call each in rotated order, median per case (the method of
the benchmark, docs/results.md). Figures are cached on disk per device and torch version,
as Inductor's autotuning caches its choices, so only the first compile of a shape measures;
each figure keeps the spread of its rounds, so a later choice can tell a real margin from noise
(`fxlora timings --show` lists them, `--clear` forgets them). A case over OUT_OF_RACE x the
fastest after the first round is not run again (its one figure is kept, without a spread).

Imports nothing from fxlora.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

CACHE_ENV = "FXLORA_CACHE_DIR"  # where timings.json lives [~/.cache/fxlora]
ROUNDS = 2  # after a warm call; the spread (max - min) / median of the two tells a margin from noise
OUT_OF_RACE = 1.5  # after the first round, a case this many times the fastest's time is not run again


@dataclass(frozen=True)
class TimingCase:
    """One form at one size: `key` names everything its time depends on (kind, form, sizes,
    dtypes, flags); `build` allocates its inputs and returns one forward + backward call."""

    key: str
    build: Callable[[], Callable[[], None]]
    sizes: str = ""  # cases with the same (non-empty) sizes share one warm-up call: the allocator and BLAS are warm for all


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "fxlora")
    return Path(root) / "timings.json"


def device_key(device: torch.device) -> str:
    """The machine a time holds for: device model (and CPU threads), torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()} x{torch.get_num_threads()} threads"
    return f"{name} | torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class Timings:
    """The on-disk cache of one device's figures, and the measurement of what it lacks."""

    def __init__(self, device: torch.device, path: Optional[Path] = None, rounds: int = ROUNDS):
        self.device, self.path, self.rounds = torch.device(device), path or cache_path(), rounds
        self.key = device_key(self.device)
        self.measured = 0  # cases measured by this object (the rest came from the cache)
        self._figures = self._load().get(self.key, {})

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def seconds(self, cases: Sequence[TimingCase]) -> list[float]:
        """Seconds per call of each case; uncached cases are measured together, then cached."""
        return [median for median, _ in self.figures(cases)]

    def figures(self, cases: Sequence[TimingCase]) -> list[tuple[float, Optional[float]]]:
        """(seconds per call, spread) of each case: the spread is (slowest - fastest round) / median,
        measured alongside (None for a figure cached before spreads were kept)."""
        missing = list({c.key: c for c in cases if c.key not in self._figures}.values())
        if missing:
            self._figures.update(self._measure(missing))
            self.measured += len(missing)
            self._store()
        return [_figure(self._figures[c.key]) for c in cases]

    def _measure(self, cases: Sequence[TimingCase]) -> dict[str, float]:
        # Plain eager, whatever the caller runs under: no fake tensors, the caller's RNG stream
        # untouched, no autocast, and no compiled autograd (DDP's python_reducer turns it on;
        # it would hand the timing's own backward to the backend as one more graph).
        from torch._dynamo import compiled_autograd
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        devices = [self.device] if self.device.type == "cuda" else []
        with unset_fake_temporarily(), compiled_autograd._disable(), \
                torch.random.fork_rng(devices=devices, device_type=self.device.type), \
                torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
            calls = [c.build() for c in cases]
            warmed: set[str] = set()
            for case, call in zip(cases, calls):
                if not case.sizes or case.sizes not in warmed:
                    call()
                    warmed.add(case.sizes)
            times: list[list[float]] = [[] for _ in calls]
            racing = list(range(len(calls)))
            for r in range(self.rounds):
                for j in range(len(racing)):
                    k = racing[(j + r) % len(racing)]  # rotated order: drift spreads over every case
                    self._sync()
                    start = time.perf_counter()
                    calls[k]()
                    self._sync()
                    times[k].append(time.perf_counter() - start)
                if r == 0:  # a margin this large needs no second look: the first compile measures less
                    fastest = min(t[0] for t in times)
                    racing = [k for k in racing if times[k][0] <= OUT_OF_RACE * fastest]
        return {c.key: {"s": statistics.median(t), "spread": (max(t) - min(t)) / statistics.median(t) if len(t) > 1 else None}
                for c, t in zip(cases, times)}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _store(self) -> None:
        """Merge into the file under an exclusive lock (another process timing at once waits, and
        its keys are kept), written to a temporary file and renamed: readers never see half a file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                data = self._load()
                data.setdefault(self.key, {}).update(self._figures)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".timings.")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: figures stay in memory for this compile


def _figure(entry) -> tuple[float, Optional[float]]:
    if isinstance(entry, dict):
        return float(entry["s"]), entry.get("spread")
    return float(entry), None  # a cache written before spreads were kept


def cached(path: Optional[Path] = None) -> dict[str, dict[str, tuple[float, Optional[float]]]]:
    """Every cached figure: device key -> case key -> (seconds, spread), for `fxlora timings --show`."""
    try:
        data = json.loads((path or cache_path()).read_text())
    except (OSError, ValueError):
        return {}
    return {device: {key: _figure(v) for key, v in figures.items()} for device, figures in data.items()}


def clear(path: Optional[Path] = None) -> bool:
    """Forget every cached figure (the next compile of each shape measures again); False if there were none."""
    path = path or cache_path()
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
