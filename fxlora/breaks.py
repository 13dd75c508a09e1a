"""Dynamo's graph breaks while it traces for fxlora, each with where it happened and what to do.

A graph break decides what fxlora can see: a layer that Dynamo runs uncompiled (a frame it
skipped, a checkpointed layer it refused) is in no graph fxlora receives, so no report mentions
it. Dynamo counts breaks in `torch._dynamo.utils.counters["graph_break"]` by message only; to say
*which* layers a break cut out, fxlora records each break as Dynamo logs it (its translator's
`log_graph_break`, wrapped once by `install_break_records`, for fxlora's own compiles only), with
the frame's `self` module, the user line that broke, and the advice of the first matching rule
in `ADVICE`. The records go to fxlora's report store (`Report.breaks`) and, once per distinct
break, to the "fxlora" logger at INFO; fxlora/accounting.py ties them to the layers they cut out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

from fxlora.logs import log_break
from fxlora.report import GraphBreak, record_break
from fxlora.tracing import frame_module, fxlora_options, skips_checkpoint_side_effects, wrap_once

log = logging.getLogger("fxlora")

_SKIPPED = "Skipping the function"  # Dynamo's words when it gives up on a whole frame (runs it eagerly)
_COMBINED = "*** While handling this graph break, another graph break occurred: ***"
_collectors: list[list[GraphBreak]] = []  # explain's: breaks of its own trace, besides the store


def install_break_records() -> bool:
    """Record the graph breaks of fxlora's compiles (idempotent). False when this torch has no
    such hook: fxlora/accounting.py then names the breaks from Dynamo's counters only."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslatorBase
    except ImportError:
        return False

    def make(original):
        def log_graph_break(self, *args, **kwargs):
            try:
                _record(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - a report is never why tracing fails
                log.debug("fxlora: could not record a graph break (%s: %s)", type(err).__name__, err)
            return original(self, *args, **kwargs)
        return log_graph_break

    return wrap_once(InstructionTranslatorBase, "log_graph_break", make)


@contextlib.contextmanager
def collecting() -> Iterator[list[GraphBreak]]:
    """The graph breaks recorded while the block runs (fxlora.explain keeps its trace's own)."""
    found: list[GraphBreak] = []
    _collectors.append(found)
    try:
        yield found
    finally:
        _collectors.remove(found)


def _record(tx: Any, code_options: Any = None, reason: str = "", exc: Any = None, **_: Any) -> None:
    compiler_fn = getattr(getattr(tx, "output", None), "compiler_fn", None)
    if exc is None or getattr(exc, "logged", False) or not fxlora_options(compiler_fn)[0]:
        return
    brk = describe_break(tx, str(reason), exc, skips_checkpoint_side_effects(compiler_fn))
    record_break(brk)
    log_break(brk)
    for found in _collectors:
        found.append(brk)


def describe_break(tx: Any, reason: str, exc: Any, skip_side_effects: bool) -> GraphBreak:
    """One GraphBreak from Dynamo's translator at the break and the exception it raised."""
    message = str(getattr(exc, "msg", exc))
    first = message.split(_COMBINED)[0].strip()  # the break that started it, not its consequences
    lines = first.splitlines()
    gb_type = lines[0].strip() if lines else str(getattr(exc, "gb_type", type(exc).__name__))
    module = frame_module(tx)
    stack = list(getattr(exc, "real_stack", None) or [])
    code = getattr(tx, "f_code", None)
    brk = GraphBreak(
        gb_type=gb_type,
        explanation=_field(lines, "Explanation:"),
        context=_field(lines, "Developer debug context:"),
        hint=_field(lines, "Hint:"),
        where=_where(stack[-1]) if stack else "",
        installed=bool(stack) and _installed(stack[-1].filename),
        frame=_frame(code, module),
        skipped=_SKIPPED in reason,
        calls=max(len(stack) - 1, 0),
        module=weakref.ref(module) if module is not None else None,
        module_class=type(module) if module is not None else None,
        skip_checkpoint_side_effects=skip_side_effects,
    )
    brk.advice = advice(brk)
    return brk


def _field(lines: list[str], label: str) -> str:
    """The first line of one of Dynamo's labelled fields ("Explanation:", "Hint:", ...)."""
    return next((line.strip()[len(label):].strip() for line in lines if line.strip().startswith(label)), "")


def _installed(filename: str) -> bool:
    parts = filename.replace(os.sep, "/").split("/")
    return "site-packages" in parts or "dist-packages" in parts


def short_path(filename: str) -> str:
    """A source path as people read it: from the package down (`transformers/modeling_layers.py`)."""
    parts = filename.replace(os.sep, "/").split("/")
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return "/".join(parts[-2:])


def _where(frame: Any) -> str:
    line = (getattr(frame, "line", "") or "").strip()
    return f"{short_path(frame.filename)}:{frame.lineno} in {frame.name}" + (f": `{line}`" if line else "")


def _frame(code: Any, module: Optional[torch.nn.Module]) -> str:
    if code is None:
        return ""
    owner = f"{type(module).__name__}." if module is not None else ""
    return f"{owner}{code.co_name} ({short_path(code.co_filename)}:{code.co_firstlineno})"


def ended_by(gm: Any) -> str:
    """The graph break `gm` ends at (Dynamo compiled the graph so far, then broke), or ""."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return ""
    lines = str(getattr(reason, "reason", "")).split(_COMBINED)[0].strip().splitlines()
    stack = list(getattr(reason, "user_stack", None) or [])
    return (lines[0].strip() if lines else "graph break") + (f" at {_where(stack[-1])}" if stack else "")


# --- what the user can do, first matching rule wins ------------------------------------


def _checkpoint_side_effect(b: GraphBreak) -> bool:
    return b.gb_type.startswith("HOP: Unsafe side effect") and "checkpoint" in b.hint


def _random_branch(b: GraphBreak) -> bool:
    return b.gb_type == "Data-dependent branching" and ("rand(" in b.where or "rand(" in b.explanation)


def _data_dependent(b: GraphBreak) -> bool:
    return b.gb_type == "Data-dependent branching"


def _checkpoint_advice(b: GraphBreak) -> str:
    if b.skip_checkpoint_side_effects:
        return ("fxlora's skip_checkpoint_side_effects is on but did not apply here (a torch without "
                "Dynamo's CheckpointHigherOrderVariable hook?); see docs/checkpointing.md")
    return ("set skip_checkpoint_side_effects=True (fxlora's default; FXLORA_OPTIONS for Trainer/TRL): "
            "Dynamo then traces the checkpointed layer and applies its Python side effect once, in "
            "forward; see docs/checkpointing.md")


ADVICE: tuple[tuple[Callable[[GraphBreak], bool], Callable[[GraphBreak], str]], ...] = (
    (_checkpoint_side_effect, _checkpoint_advice),
    (_random_branch, lambda b: (
        "a random number decides a Python `if`, so every call splits the graph there (PEFT's LoHa/LoKr "
        "draw `torch.rand(1)` for module_dropout in every training forward, whatever module_dropout is, "
        "even 0; in eval mode they draw nothing). No option avoids it in training: each layer still runs "
        "exactly as written, in pieces between graphs; the split costs compile time and launches, not correctness")),
    (_data_dependent, lambda b: (
        "a Python `if` on a tensor's value cannot be traced: compute the branch with tensor ops "
        "(torch.where) or move it out of the forward")),
)


def advice(b: GraphBreak) -> str:
    """What the user can do about `b`: fxlora's rule for it, else Dynamo's own hint (addressed to the
    authors of the package the line is in, when it is an installed package's)."""
    for applies, text in ADVICE:
        if applies(b):
            return text(b)
    package = b.where.split("/")[0] if "/" in b.where.split(":")[0] else ""
    if package and b.installed:
        return (f"the line is in the installed package {package}, not in the model's code"
                + (f" (Dynamo's hint, for its authors: {b.hint})" if b.hint else "")
                + "; what this break cuts out runs uncompiled, and exactly")
    return b.hint or "see Dynamo's message (TORCH_LOGS=graph_breaks)"


__all__ = ["ADVICE", "advice", "collecting", "describe_break", "ended_by", "install_break_records", "short_path"]
