"""Adapter sites inside activation checkpointing (`torch.utils.checkpoint`, HF `gradient_checkpointing_enable()`).

Dynamo traces a checkpointed call, with either `use_reentrant` setting, as the higher-order
op `tag_activation_checkpoint(body, *inputs, use_reentrant=...)`, whose body is a
sub-GraphModule of the graph. The passes run on each body like on a graph of their own,
on a copy with the same signature (the untouched body stays with the untouched graph).

What changes inside a region:
- Its forward runs twice (once more in backward) and keeps only the region's inputs, so a
  form's saved bytes buy nothing there: forms are chosen by FLOPs (`objective="flops"`).
- LoRA dropout stays as traced: `fxlora::lora_linear` draws its mask from the RNG state at
  call time, so the recompute would draw another mask than the forward used and backward
  would be wrong (the failure of peft#3020). Dropout-free sites are rewritten.
- Lossy compression (`compress`) is not applied: its saved vector has nowhere to live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fxlora.config import Config

CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint

DROPOUT_IN_REGION = "LoRA dropout in a checkpointed region: kept as traced (the recompute would draw another mask)"


@dataclass
class RegionReport:
    """One checkpointed region: what the passes found and did in its body."""

    body: str  # the body's attribute name on the graph (wrap_body_0, ...)
    use_reentrant: Optional[bool]  # as the model asked checkpoint for it; None when Dynamo did not record it
    match: Any = None  # LoraMatch of the body
    decisions: list = field(default_factory=list)  # LoRA Decision per site
    scaling: list = field(default_factory=list)  # (ScalingMatch, [ScalingDecision]) per kind
    fallback: Optional[str] = None  # why the body was left untouched, when it was

    @property
    def sites(self) -> list:
        return self.match.sites if self.match else []

    @property
    def scaling_sites(self) -> list:
        return [s for m, _ in self.scaling for s in m.sites]

    @property
    def rewritten(self) -> int:
        return sum(d.rewritten for d in self.decisions) + sum(d.rewritten for _, ds in self.scaling for d in ds)


RunPasses = Callable[..., tuple]  # (body, config, leave_alone) -> (LoraMatch, [Decision], scaling)


def checkpoint_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CHECKPOINT_HOP]


def region_config(config: Config) -> Config:
    """The options the passes get inside a region: FLOPs decide, no lossy compression."""
    return config.replace(objective="flops", compress=None)


def leave_alone_in_region(site) -> str:
    """Why a LoRA site inside a region is not rewritten ("" when it is)."""
    return DROPOUT_IN_REGION if site.nodes.dropout is not None and site.dropout_p != 0.0 else ""


def rewrite_checkpoint_regions(gm: fx.GraphModule, run_passes: RunPasses, config: Config) -> list[RegionReport]:
    """Run `run_passes` on a copy of every checkpoint body of `gm` and install the rewritten copies on `gm`.

    `gm` must be the graph the caller may change (its own copy): only its attributes are replaced."""
    reports, inner = [], region_config(config)
    for node in checkpoint_calls(gm):
        body_node = node.args[0]
        if not (isinstance(body_node, fx.Node) and body_node.op == "get_attr"):
            continue
        name = body_node.target
        body = getattr(gm, name)
        reentrant = node.kwargs.get("use_reentrant")
        report = RegionReport(name, reentrant if isinstance(reentrant, bool) else None)
        try:
            copy = fx.GraphModule(body, _copy_graph(body))
            report.match, report.decisions, report.scaling = run_passes(copy, inner, leave_alone_in_region)
        except Exception as err:  # a region the passes cannot handle runs as traced
            report.fallback = f"passes failed ({type(err).__name__}: {err})"
            report.match, report.decisions, report.scaling = None, [], []
        else:
            if report.rewritten:
                setattr(gm, name, copy)
        reports.append(report)
    return reports


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    return graph


def reentrant_setting(regions: list[RegionReport]) -> str:
    """"use_reentrant=True", "use_reentrant=False", or both, as the regions were traced."""
    seen = sorted({r.use_reentrant for r in regions if r.use_reentrant is not None})
    return "/".join(f"use_reentrant={v}" for v in seen) or "use_reentrant unknown"


def region_summary(regions: list[RegionReport]) -> str:
    """"; in 2 checkpointed regions (use_reentrant=True): 14 sites, 14 rewritten" ("" without regions)."""
    if not regions:
        return ""
    sites = sum(len(r.sites) + len(r.scaling_sites) for r in regions)
    return (f"; in {len(regions)} checkpointed region(s) ({reentrant_setting(regions)}): "
            f"{sites} adapter sites, {sum(r.rewritten for r in regions)} rewritten")
