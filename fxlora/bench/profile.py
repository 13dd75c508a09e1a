"""Where a step's time goes: one step per contestant under `torch.profiler` with
`record_shapes=True`, the top ops by self time grouped by input shape, and the counts
measuring.md asks for: rank-r GEMMs (a dimension equal to r) and full-size copies/fills.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::linear")
COPIES = ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous")
# ATen calls that only make a view or allocate (or dispatch on to a call that works): host work, no data.
VIEWS_AND_ALLOCATIONS = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "as_strided",
    "slice", "select", "unsqueeze", "squeeze", "flatten", "unflatten", "split", "split_with_sizes", "chunk",
    "narrow", "alias", "detach", "lift_fresh", "view_as", "unbind", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "resize_", "to", "contiguous",
))
ROWS = 40


@dataclass
class ProfileSummary:
    """One step of one contestant: totals of the ops the adapter tax is made of (ms of self time)."""

    self_ms: float = 0.0
    rank_gemms: int = 0
    rank_gemm_ms: float = 0.0
    gemms: int = 0
    gemm_ms: float = 0.0
    full_copies: int = 0  # copy_/fill_/clone of at least `full_numel` elements (an activation's size)
    full_copy_ms: float = 0.0
    aten_calls: int = 0  # every ATen call of the step, nested ones included (host work: a launch each on a GPU)
    aten_work_calls: int = 0  # those that are more than a view or an allocation

    def as_dict(self) -> dict:
        return asdict(self)


def summarise(averages, rank: int, full_numel: int, device_time: bool) -> ProfileSummary:
    s = ProfileSummary()
    for e in averages:
        ms = (e.self_device_time_total if device_time else e.self_cpu_time_total) / 1e3
        if e.key.startswith("aten::"):
            s.aten_calls += e.count
            s.aten_work_calls += 0 if e.key in VIEWS_AND_ALLOCATIONS else e.count
        s.self_ms += ms
        shapes = [sh for sh in (e.input_shapes or []) if sh]
        if e.key in GEMMS:
            s.gemms += e.count
            s.gemm_ms += ms
            if any(rank in sh for sh in shapes):
                s.rank_gemms += e.count
                s.rank_gemm_ms += ms
        elif e.key in COPIES and shapes and math.prod(shapes[0]) >= full_numel:
            s.full_copies += e.count
            s.full_copy_ms += ms
    return s


def profile_step(step: Callable[[], None], path: str, title: str, rank: int, full_numel: int,
                 cuda: bool) -> ProfileSummary:
    """Run `step` once under the profiler; write its top ops to `path`; return the summary."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages(group_by_input_shape=True)
    summary = summarise(averages, rank, full_numel, device_time=cuda)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort, row_limit=ROWS, max_name_column_width=40, max_shapes_column_width=70)
    with open(path, "w") as f:
        f.write(f"{title}\n\n{_describe(summary, rank)}\n\n{table}\n")
    return summary


def _describe(s: ProfileSummary, rank: int) -> str:
    return (f"ATen calls {s.aten_calls} ({s.aten_work_calls} more than a view or an allocation); "
            f"self time {s.self_ms:.1f} ms; GEMMs {s.gemms} ({s.gemm_ms:.1f} ms), of which rank-{rank} "
            f"{s.rank_gemms} ({s.rank_gemm_ms:.1f} ms); full-size copy_/fill_/clone {s.full_copies} ({s.full_copy_ms:.1f} ms)")
