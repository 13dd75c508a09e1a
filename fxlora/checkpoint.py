"""Adapter sites inside activation checkpointing (`torch.utils.checkpoint`, HF `gradient_checkpointing_enable()`).

Dynamo traces a checkpointed call, with either `use_reentrant` setting, as the higher-order
op `tag_activation_checkpoint(body, *inputs, use_reentrant=...)`, whose body is a
sub-GraphModule of the graph. The pipeline runs on each body like on a graph of its own,
on a copy with the same signature (the untouched body stays with the untouched graph).

What changes inside a region:
- Its forward runs twice (once more in backward) and keeps only the region's inputs, so a
  form's saved bytes buy nothing there: under `objective="time"` forms are chosen by their
  measured time with the forward counted twice, otherwise by FLOPs.
- A form must not draw random numbers at call time: the recompute would draw another mask
  than the forward used and backward would be wrong (the failure of peft#3020). LoRA dropout
  stays a traced op, whose RNG AOTAutograd replays in the recompute (or whose output it keeps);
  the rewritten op reads the traced drop(x) (`x_adapter`). A kind without such a form keeps its
  random sites as traced (`Kind.draws_random`).
- Lossy compression (`compress`) is not applied: its saved vector has nowhere to live.

Reads the graph only; imports nothing of fxlora but its config.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.fx as fx

from fxlora.config import Config

CHECKPOINT_HOP = torch.ops.higher_order.tag_activation_checkpoint

DROPOUT_IN_REGION = "random numbers drawn by the rewritten form in a checkpointed region: kept as traced (the recompute would draw another mask)"


def checkpoint_bodies(gm: fx.GraphModule) -> Iterator[tuple[str, fx.GraphModule, Optional[bool]]]:
    """(attribute name, body, use_reentrant) of every checkpoint call in `gm`."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not CHECKPOINT_HOP:
            continue
        body = node.args[0]
        if isinstance(body, fx.Node) and body.op == "get_attr":
            reentrant = node.kwargs.get("use_reentrant")
            yield body.target, getattr(gm, body.target), reentrant if isinstance(reentrant, bool) else None


def region_config(config: Config) -> Config:
    """The options the pipeline gets inside a region: time (forward twice) or FLOPs decide, no lossy compression."""
    return config.replace(objective="time" if config.objective == "time" else "flops", compress=None, in_checkpoint=True)
