"""`fxlora.explain(model, ...)`: what fxlora would do to a model, without training it."""

from __future__ import annotations

import functools
from typing import Any

import torch

from fxlora.accounting import account
from fxlora.backend import compile_graph
from fxlora.breaks import collecting
from fxlora.config import Config
from fxlora.distributed import splits_after_rewrite
from fxlora.report import GraphReport, Report, VerboseReport
from fxlora.tracing import mark_backend


def explain(model: Any, *args: Any, options: Any = None, verbose: bool = False, **kwargs: Any) -> Report:
    """Trace `model(*args, **kwargs)` with Dynamo and report the adapter sites fxlora finds.

    Runs one forward pass (gradients enabled, so trainability is seen as in training);
    decisions are made as under the real inner compiler, the graphs run eagerly, and the
    model is not changed. `print(report)` shows the site tables, the graph breaks met and, when
    `model` is an nn.Module, its adapter layers accounted for (`report.accounting`, as
    `fxlora.account(model)`); `report.format(verbose=True)` adds every candidate form with its
    formulas (`verbose` here only sets what `str` shows).
    """
    config = Config.from_options(options)
    captured: list[GraphReport] = []

    @functools.partial(mark_backend, config=config)
    @splits_after_rewrite
    def capture(gm, example_inputs, split=None, **_):
        return compile_graph(gm, example_inputs, config, on_report=captured.append, run_with="eager", split=split)

    # A fresh backend object gets its own cache entry; lift the limit so repeated explains still trace.
    with torch._dynamo.config.patch(recompile_limit=10_000, accumulated_recompile_limit=10_000), collecting() as breaks:
        torch.compile(model, backend=capture)(*args, **kwargs)
    if not captured:
        raise RuntimeError(
            "fxlora.explain traced no graph: the call ran without Dynamo compiling anything "
            "(is the model already compiled with another backend, or is torch._dynamo disabled?)"
        )
    report = (VerboseReport if verbose else Report)(captured, breaks)
    if isinstance(model, torch.nn.Module):
        report.accounting = account(model, report)
    return report
