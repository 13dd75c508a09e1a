"""The `torch.compile` backend: Dynamo graph -> fxlora passes -> inner compiler (Inductor).

Registered as the `fxlora` entry point of `torch_dynamo_backends` (pyproject.toml), so
`torch.compile(model, backend="fxlora")` works without importing fxlora.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxlora.accounting import describe_graph
from fxlora.breaks import ended_by
from fxlora.budget import BudgetPartitioner
from fxlora.config import Config, MemoryBudget, check_mode
from fxlora.distributed import ddp_piece_note, fxlora_op_sites, splits_after_rewrite, unsupported_parallelism
from fxlora.graph.edit import copy_graph_module
from fxlora.graph.read import parameter_inputs
from fxlora.inference import NO_BACKWARD_NOTE, needs_backward
from fxlora.logs import log_report
from fxlora.ops.inline import InlineOpsPass
from fxlora.pipeline import PipelineResult, count, run_pipeline
from fxlora.report import GraphReport, record
from fxlora.tracing import mark_backend, traced_frame
from fxlora.verify import verify_first_call

log = logging.getLogger("fxlora")


@mark_backend
@splits_after_rewrite
def fxlora_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Any = None,
    mode: Optional[str] = None,
    split: Optional[Callable] = None,
) -> Callable:
    """Entry point Dynamo calls with each captured graph; `options`/`mode` come from torch.compile.

    `split` comes from DDP's graph splitter (fxlora.distributed): it compiles the rewritten graph in pieces."""
    config = Config.from_options(options)
    check_mode(mode)
    return compile_graph(gm, example_inputs, config, mode=mode, split=split)


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: Config,
    *,
    mode: Optional[str] = None,
    on_report: Optional[Callable[[GraphReport], None]] = None,
    run_with: Optional[str] = None,
    split: Optional[Callable] = None,
) -> Callable:
    """Run fxlora's passes on `gm`, report them, then hand the graph to the inner compiler.

    `run_with` runs the result with another inner compiler than the one the decisions were
    made for (explain prices for Inductor but runs eagerly). `split(gm, inputs, compile_piece)`
    compiles the rewritten graph in pieces (DDP's buckets) instead of whole."""
    compile_id = _compile_id()
    original, before = gm, gm.code
    no_backward = not needs_backward(gm)  # eval / generate graphs (fxlora/inference.py)
    if no_backward:
        config = config.replace(objective="flops")
    result, fallback = PipelineResult([]), None
    unsupported = unsupported_parallelism(gm)
    try:
        if unsupported:
            raise NotImplementedError(unsupported)
        # Match and rewrite a copy (one cheap node pass): if anything goes wrong the
        # untouched graph is still at hand.
        candidate = copy_graph_module(gm)
        # DDP's splitter copies `_param_name_to_source` to each piece and fails without it.
        # `meta` stays empty on purpose: without Dynamo's compile id there, AOT does not demand
        # a source for every attribute, and the rewrites add some (VeLoRA's v). The price: AOT
        # treats rewritten graphs as not Dynamo's and marks no static inputs (cudagraphs).
        if hasattr(gm, "_param_name_to_source"):
            candidate._param_name_to_source = gm._param_name_to_source
        result = run_pipeline(candidate, config)
        # Normalising alone never changes what runs: without a rewritten site the traced graph is compiled.
        gm = candidate if result.rewritten else gm
    except Exception as err:  # never the reason a training run dies: compile the untouched graph
        log.warning("fxlora: graph %s left untouched (%s: %s)", compile_id, type(err).__name__, err)
        fallback = unsupported or f"passes failed ({type(err).__name__}: {err})"
        result = PipelineResult([])
    piece_note = ddp_piece_note() if split is None else None
    if piece_note:
        log.warning("fxlora: graph %s %s", compile_id, piece_note)
    report = GraphReport(
        compile_id=compile_id,
        num_nodes=len(gm.graph.nodes),
        graph_before=before,
        graph_after=gm.code,
        kinds=result.kinds,
        regions=result.regions,
        rules=result.rules,
        near_misses=result.near_misses,
        fallback=fallback,
        notes=([NO_BACKWARD_NOTE] if no_backward else []) + ([piece_note] if piece_note else []),
        no_backward=no_backward,
        **_holdings(original),
    )
    rewritten = gm is not original
    if run_with is not None:  # eager runs what was decided: no partitioner, so no budget
        config = config.replace(inner=run_with, verify=False, **({"memory_budget": None} if run_with == "eager" else {}))
    budget = MemoryBudget.parse(config.memory_budget) if config.memory_budget is not None else None
    if split is not None and budget is not None and budget.bytes is not None:
        report.notes.append(BYTES_PER_PIECE_NOTE)
    remat = config.rematerialize and rewritten

    def compile_piece(piece: fx.GraphModule, inputs: Sequence[Any], **_dynamo_configs: Any) -> Callable:
        # Dynamo's debug config overrides are dropped: Inductor's patches come from fxlora's options.
        if split is not None:
            report.pieces.append(fxlora_op_sites(piece.graph))
        inline = InlineOpsPass(report.inlined) if config.inline_ops and rewritten else None
        partitioner = BudgetPartitioner(budget, report.budget) if budget is not None else None
        return _inner_compile(piece, inputs, config, mode, rematerialize=remat, inline=inline, budget=partitioner)

    def compile_whole(graph: fx.GraphModule) -> Callable:
        return compile_piece(graph, example_inputs) if split is None else split(graph, example_inputs, compile_piece)

    hits = _cache_hits()
    try:
        try:
            compiled = compile_whole(gm)
        except Exception as err:  # as for the passes: a rewrite must never be why training stops
            if gm is original or isinstance(err, _DYNAMO_CONTROL_FLOW):
                raise
            log.warning("fxlora: graph %s: compiling the rewritten graph failed (%s: %s); compiling it untouched",
                        compile_id, type(err).__name__, err)
            report.fallback = f"compiling the rewritten graph failed ({type(err).__name__}: {err}); compiled untouched"
            report.graph_after, report.pieces[:] = before, []
            gm, rewritten, remat = original, False, False
            untouched(report, "the graph fell back (see below)")
            compiled = compile_whole(original)
        count([*report.kinds, *(k for r in report.regions for k in r.kinds)])
        cached = _cache_hits() > hits
        if rewritten and config.inline_ops and config.inner == "inductor" and not report.inlined and cached:
            report.notes.append(CACHED_NOTE)
        if budget is not None and not report.budget and cached:
            report.notes.append(BUDGET_CACHED_NOTE)
    finally:  # after compiling, so DDP's pieces are in the log and the dump
        if on_report is None:
            record(report)
            log_report(report)
        else:
            on_report(report)
        if config.dump_graphs:
            _dump(report, config.dump_graphs)
    if config.verify and rewritten:
        compiled = verify_first_call(original, gm, compiled, f"graph {compile_id} ({result.rewritten} rewritten sites)")
    return compiled


def _holdings(gm: fx.GraphModule) -> dict[str, Any]:
    """What the graph holds, for the accounting of adapter layers (fxlora/accounting.py): the
    parameters it reads and the traced frame's module (weakly: a report never keeps a model
    alive), what they are in words, and the graph break it ends at. Never fails a compile."""
    try:
        root, code = traced_frame()
        return dict(
            contents=describe_graph(gm, root),
            ended_by=ended_by(gm),
            frame_module=weakref.ref(root) if root is not None else None,
            frame_code=code,
            parameters=[weakref.ref(p) for _, p in parameter_inputs(gm)],
        )
    except Exception as err:  # noqa: BLE001 - a report detail is never why a graph fails
        log.debug("fxlora: could not describe what the graph holds (%s: %s)", type(err).__name__, err)
        return {}


def untouched(report: GraphReport, why: str) -> None:
    """The graph runs as traced after all: no decision of it stands as a rewrite."""
    for d in [*report.decisions, *(d for r in report.regions for d in r.decisions)]:
        if d.rewritten:
            d.chosen, d.reason = None, f"would be {d.chosen.form.name}, but {why}"


# Exceptions Dynamo raises through a backend to restart or skip the frame: signals, not failures.
_DYNAMO_CONTROL_FLOW = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame)


def _inner_compile(
    gm: fx.GraphModule, example_inputs, config: Config, mode: Optional[str], rematerialize: bool = False,
    inline: Optional[InlineOpsPass] = None, budget: Optional[BudgetPartitioner] = None,
) -> Callable:
    """`budget` replaces the min-cut partitioner by one that meets the user's memory budget (fxlora/budget.py)."""
    if config.inner == "eager":
        return gm.forward
    if config.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs) if budget is None else _aot_eager_with(budget)(gm, example_inputs)
    from torch._inductor import config as inductor_config, list_mode_options
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(config.inductor)
    if budget is not None:
        patches["custom_partitioner_fn"] = budget
    if inline is not None:  # first among the post-grad passes, before the user's own
        theirs = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
        patches["post_grad_custom_pre_pass"] = [inline, *get_custom_graph_passes(theirs)]
    # An adapter's dA needs its input x (a norm output, an activation) in backward. By default
    # the min-cut partitioner never recomputes a value that backward must materialize, so x
    # is saved even where it is one cheap pointwise kernel away from tensors saved anyway
    # (norm input and rstd; gate and up). Lifting that one ban lets the min-cut choose.
    functorch_patches = {"ban_recompute_materialized_backward": False} if rematerialize else {}
    with torch._functorch.config.patch(functorch_patches):
        return compile_fx(gm, example_inputs, config_patches=patches)


def _aot_eager_with(partition_fn: Callable) -> Callable:
    """aot_eager (AOTAutograd, no codegen) with another partitioner than its min cut."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition_fn,
                        keep_inference_input_mutations=True)


BYTES_PER_PIECE_NOTE = ("memory budget: DDP compiles this graph in pieces and a budget in bytes applies to each piece; "
                        "give a fraction (memory_budget=0.5) for the whole step")
BUDGET_CACHED_NOTE = ("memory budget: this graph came compiled from a cache, partitioned under the same budget "
                      "when first compiled (the cache key holds it)")
CACHED_NOTE = ("op bodies: this graph came compiled from Inductor's cache; its ops were inlined when it was "
               "first compiled (set inline_ops=False to compare)")


def _cache_hits() -> int:
    """Inductor's FX graph cache and AOTAutograd's cache: a hit skips the post-grad passes (and so the inlining)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def _compile_id() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return str(compile_id) if compile_id is not None else "?"


def _dump(report: GraphReport, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, "graph_" + report.compile_id.replace("/", "_").replace(" ", ""))
    for suffix, text in (("before", report.graph_before), ("after", report.graph_after), ("report", report.format(verbose=True))):
        with open(f"{stem}.{suffix}.txt", "w") as f:
            f.write(text)
