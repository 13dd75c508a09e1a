"""Which chosen LoRA sites run as one `fxlora::lora_group_linear`: those that read the same x.

A Llama layer has two such groups (q/k/v on the attention norm's output, gate/up on the MLP
norm's): grouped, their rank-r GEMMs over x and their dX GEMMs are shared (fxlora/ops/lora_group.py
says which and why it is exact), each site keeping the form the chooser gave it.
"""

from __future__ import annotations

import torch.fx as fx

from fxlora.cost.core import Form, PricedForm
from fxlora.graph.read import scale_tensor_source, value
from fxlora.kinds.lora.match import LoraSite
from fxlora.ops.lora import BACKWARD_FORMS


GROUP_BACKWARDS = tuple(k for k, (dA, dB, _) in BACKWARD_FORMS.items() if (dA, dB) == ("z1", "xa"))


def joins_group(site: LoraSite, form: Form) -> bool:
    """Whether `form` keeps a site that could be grouped (group.py) in its group: the group op
    shares dA's GEMM over X and each dB reads X A^T, so backwards bracketing them through
    dY^T X (RunLoRA 2, 3, 4, 6, 7, 8) stay alone."""
    return form.lossy or form.spec is None or form.spec.backward in GROUP_BACKWARDS


def why_alone(site: LoraSite, priced: PricedForm) -> str:
    """Why `site` cannot join a group ("" if it can)."""
    spec = priced.form.spec
    if priced.form.lossy:
        return "a lossy form"
    return why_not_groupable(site) or ("" if spec.backward in GROUP_BACKWARDS
                                      else f"backward {spec.backward} brackets dA or dB through dY^T X")


def why_not_groupable(site: LoraSite) -> str:
    """Why `site` cannot join a group whatever its form ("" if it can)."""
    if site.shared_x < 2:
        return "its x is read by no other site"
    if site.dropout_p:
        return "dropout: PEFT draws one mask per site, so no GEMM over drop(x) is shared"
    if site.stacked:
        return "stacked on another adapter"
    if not (site.a_trainable and site.b_trainable):
        return "a frozen A or B"
    if site.compute_dtype != value(site.nodes.xab).dtype:
        return "base and adapter compute in different dtypes"
    return ""


def group_sites(chosen: list[tuple[LoraSite, PricedForm]], config) -> tuple[list[list], dict[int, str]]:
    """Units of the rewrite (graph order) and a note for each site of a group of two or more."""
    if not config.group_shared_input:
        return [[c] for c in chosen], {}
    order = {n: k for k, n in enumerate(chosen[0][0].nodes.add.graph.nodes)} if chosen else {}
    by_x: dict[fx.Node, list] = {}
    for site, priced in chosen:
        if not why_alone(site, priced):
            by_x.setdefault(site.nodes.x, []).append((site, priced))
    groups = {}
    for members in by_x.values():
        members = _in_order(members, order)
        if len(members) > 1:
            for site, _ in members:
                groups[site.index] = members
    units, notes, done = [], {}, set()
    for site, priced in chosen:
        if site.index in done:
            continue
        members = groups.get(site.index, [(site, priced)])
        done.update(s.index for s, _ in members)
        units.append(members)
        if len(members) > 1:
            for s, _ in members:
                others = ", ".join(str(o.index) for o, _ in members if o is not s)
                notes[s.index] = f"one op with site{'s' * (len(members) > 2)} {others} (shared x: rank-r GEMMs over x and dX shared)"
    return units, notes


def _in_order(members: list, order: dict) -> list:
    """The members whose inputs all exist before the first member's output (the group op goes
    there); a 4-bit base's weight dequantised inside each layer does not."""
    first = min(order[s.nodes.add] for s, _ in members)

    def ready(site: LoraSite) -> bool:
        n = site.nodes
        scale = scale_tensor_source(n.scale) if isinstance(n.scale, fx.Node) else None
        inputs = [v for v in (n.x, n.weight, n.bias, n.lora_A, n.lora_B, scale) if isinstance(v, fx.Node)]
        return all(order[v] < first for v in inputs)

    return [m for m in members if ready(m[0])]
