"""Which chosen LoRA sites run as one `fxlora::lora_group_linear`: those that read the same x.

A Llama layer has two such groups (q/k/v on the attention norm's output, gate/up on the MLP
norm's): grouped, their rank-r GEMMs over x and their dX GEMMs are shared (fxlora/ops/lora_group.py
says which and why it is exact), each site keeping the form the chooser gave it.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from fxlora.cost.core import Form, PricedForm
from fxlora.graph.read import scale_tensor_source, value
from fxlora.kinds.lora.match import LoraSite
from fxlora.ops.lora import BACKWARD_FORMS, KEEPS_XA
from fxlora.ops.lora_group import REBUILDS_XA, SHARED_DOWN


GROUP_BACKWARDS = tuple(k for k, (dA, dB, _) in BACKWARD_FORMS.items() if (dA, dB) == ("z1", "xa"))


TIMED_IN_GROUP = (1, 5)  # the group op runs backward 9 as 5 and 10 as 1 (Z1 always rides on its dX GEMM)


def joins_group(site: LoraSite, form: Form) -> bool:
    """Whether `form` is a candidate for a site that could be grouped: the group op shares dA's
    GEMM over X and each dB reads X A^T, so backwards bracketing them through dY^T X (RunLoRA
    2, 3, 4, 6, 7, 8) would keep it alone, and 9 and 10 run there as 5 and 1 (no need to time them)."""
    return form.lossy or form.spec is None or form.spec.backward in TIMED_IN_GROUP


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
    there; a 4-bit base's weight dequantised inside each layer does not), in graph order."""
    members = sorted(members, key=lambda m: order[m[0].nodes.add])
    first = order[members[0][0].nodes.add]

    def ready(site: LoraSite) -> bool:
        n = site.nodes
        scale = scale_tensor_source(n.scale)
        inputs = [v for v in (n.x, n.weight, n.bias, n.lora_A, n.lora_B, scale) if isinstance(v, fx.Node)]
        return all(order[v] < first for v in inputs)

    return [m for m in members if ready(m[0])]


def gemm_reads(forms: Sequence[tuple[int, int]], grouped: bool) -> tuple[int, int, int]:
    """(GEMMs reading x forward, GEMMs reading x backward, GEMMs reading a dY, summed over the
    sites) for sites sharing x in `forms` [(forward, backward)], as one op per site
    (fxlora/ops/lora.py) or as one group op (fxlora/ops/lora_group.py); A, B and x needing grads.
    What the bench's profile prints per group: the rank-r GEMMs are bound by these reads."""
    if grouped:
        x_fwd = len(forms) + any(f in SHARED_DOWN for f, _ in forms)
        x_bwd = 1 + any(f in REBUILDS_XA for f, _ in forms)
        return x_fwd, x_bwd, 2 * len(forms)
    x_fwd = x_bwd = dy = 0
    for forward, backward in forms:
        dA_by, dB_by, dX_by = BACKWARD_FORMS[backward]
        x_fwd += 2 if forward in SHARED_DOWN else 1  # forwards 1 and 4: base GEMM and X A^T
        xtdy = "xtdy" in (dA_by, dB_by)  # Z2 = dY^T X, shared by dA and dB
        x_bwd += (dA_by == "z1") + xtdy + (dB_by == "xa" and forward not in KEEPS_XA)
        z1_apart = (dA_by == "z1" or dX_by == "split") and not dX_by.endswith("_cat")
        dy += 1 + z1_apart + xtdy + (dB_by == "xa")
    return x_fwd, x_bwd, dy


def group_reads(sites: Sequence[LoraSite], decisions: Sequence) -> list[dict]:
    """One row per set of two or more rewritten sites reading the same x: its sites, whether they
    run as one op, and `gemm_reads` of their forms."""
    by_x: dict[int, list] = {}
    for site, d in zip(sites, decisions):
        if d.rewritten and not d.chosen.form.lossy:
            by_x.setdefault(site.input_group, []).append((site, d))
    rows = []
    for members in (m for m in by_x.values() if len(m) > 1):
        forms = [(d.chosen.form.spec.forward, d.chosen.form.spec.backward) for _, d in members]
        grouped = all(len(d.unit) == len(members) for _, d in members)
        x_fwd, x_bwd, dy = gemm_reads(forms, grouped)
        rows.append({"sites": [".".join((s.module or s.nodes.add.name).split(".")[-2:]) for s, _ in members],
                     "forms": [d.chosen.form.name for _, d in members], "one_op": grouped,
                     "x_reads_forward": x_fwd, "x_reads_backward": x_bwd, "dy_reads": dy})
    return rows
