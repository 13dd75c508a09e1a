"""What fxlora saw and did, for people: per-graph reports, `explain(model, ...)`, `last_report()`."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from fxlora.graph_utils import describe_size, dtype_name
from fxlora.sites import LoraMatch, LoraSite

_RECENT: collections.deque = collections.deque(maxlen=64)


@dataclass
class GraphReport:
    """One Dynamo graph: the sites matched, what was rejected and why, the graph before/after."""

    compile_id: str
    num_nodes: int
    match: Optional[LoraMatch]
    graph_before: str
    graph_after: str
    fallback: Optional[str] = None  # why the graph was left untouched, when it was
    decisions: list = field(default_factory=list)  # fxlora.passes.Decision per site
    notes: list[str] = field(default_factory=list)
    scaling: list = field(default_factory=list)  # (ScalingMatch, [ScalingDecision]) per adapter kind: IA3, VeRA, ReFT
    pieces: list[list[str]] = field(default_factory=list)  # DDP: each bucket sub-graph's fxlora op sites, in order
    rules: dict = field(default_factory=dict)  # normalisation rule -> times fired (fxlora.normalize)
    near_misses: list = field(default_factory=list)  # Rejection per adapter-like layer no kind matched

    @property
    def scaling_sites(self) -> list:
        return [s for m, _ in self.scaling for s in m.sites]

    @property
    def scaling_decisions(self) -> list:
        return [d for _, ds in self.scaling for d in ds]

    @property
    def sites(self) -> list[LoraSite]:
        return self.match.sites if self.match else []

    @property
    def checkpointed_regions(self) -> int:
        """Calls of Dynamo's activation-checkpoint HOP: subgraphs the passes do not descend into."""
        return self.graph_before.count("torch.ops.higher_order.tag_activation_checkpoint(")

    def __str__(self) -> str:
        return "\n".join(_format_graph(self))


@dataclass
class Report:
    """Every graph fxlora compiled for one call (several when Dynamo breaks the graph)."""

    graphs: list[GraphReport]

    @property
    def sites(self) -> list[LoraSite]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def rejections(self):
        return [r for g in self.graphs if g.match for r in g.match.rejections]

    @property
    def near_misses(self):
        """Adapter-like layers no kind matched, with the rule that failed (fxlora.near_misses)."""
        return [r for g in self.graphs for r in g.near_misses]

    @property
    def scaling_sites(self) -> list:
        """IA3, VeRA and ReFT sites of every graph."""
        return [s for g in self.graphs for s in g.scaling_sites]

    @property
    def scaling_decisions(self) -> list:
        return [d for g in self.graphs for d in g.scaling_decisions]

    def __str__(self) -> str:
        if not self.graphs:
            return "fxlora: no graph compiled yet"
        return "\n\n".join(str(g) for g in self.graphs)


def record(report: GraphReport) -> None:
    from fxlora.logs import log_report

    _RECENT.append(report)
    log_report(report)


def last_report() -> Report:
    """The reports of the graphs fxlora compiled in this process (the latest 64), oldest first."""
    return Report(list(_RECENT))


def clear_reports() -> None:
    _RECENT.clear()


def explain(model: Any, *args: Any, options: Any = None, **kwargs: Any) -> Report:
    """Trace `model(*args, **kwargs)` with Dynamo and report the adapter sites fxlora finds.

    Runs one forward pass (gradients enabled, so trainability is seen as in training);
    nothing is compiled with Inductor and the model is not changed.
    """
    from fxlora.backend import compile_graph
    from fxlora.config import Config
    from fxlora.distributed import splits_after_rewrite

    config = Config.from_options(options)  # decisions as under the real inner compiler; run eagerly
    captured: list[GraphReport] = []

    @splits_after_rewrite
    def capture(gm, example_inputs, split=None, **_):
        return compile_graph(gm, example_inputs, config, on_report=captured.append, run_with="eager", split=split)

    # A fresh backend object gets its own cache entry; lift the limit so repeated explains still trace.
    with torch._dynamo.config.patch(recompile_limit=10_000, accumulated_recompile_limit=10_000):
        torch.compile(model, backend=capture)(*args, **kwargs)
    if not captured:
        raise RuntimeError(
            "fxlora.explain traced no graph: the call ran without Dynamo compiling anything "
            "(is the model already compiled with another backend, or is torch._dynamo disabled?)"
        )
    return Report(captured)


# --- formatting ---------------------------------------------------------------------


def _by_shape(decisions) -> dict:
    """Priced decisions grouped by site shape: candidates are printed once per distinct shape."""
    groups: dict = {}
    for d in decisions:
        if d.candidates:
            groups.setdefault(d.shape, []).append(d)
    return groups

_COLUMNS = ("#", "site", "base", "tokens", "in", "out", "r", "dtype", "trains", "dropout", "scale", "bias", "x shared with")


def _site_row(site: LoraSite, match: LoraMatch) -> tuple[str, ...]:
    name = site.module or site.nodes.add.name
    if site.adapter:
        name += f" [{site.adapter}]"
    trains = "+".join(k for k, on in (("A", site.a_trainable), ("B", site.b_trainable)) if on) or "-"
    if site.autocast:
        dtype = f"{dtype_name(site.adapter_dtype)}@{site.autocast.split(':')[1]}"
    else:
        dtype = dtype_name(site.adapter_dtype)
    if dtype_name(site.weight_dtype) != dtype_name(site.adapter_dtype):
        dtype = f"W {dtype_name(site.weight_dtype)}, AB {dtype}"
    shared = [str(i) for i in match.input_groups.get(site.input_group, []) if i != site.index]
    bias = "trainable" if site.bias_trainable else ("yes" if site.has_bias else "no")
    return (
        str(site.index),
        name,
        site.base_kind + (f"+{site.stacked}" if site.stacked else ""),
        "*".join(describe_size(d) for d in site.tokens) or "1",
        describe_size(site.in_features),
        describe_size(site.out_features),
        describe_size(site.rank),
        dtype,
        trains,
        "runtime" if site.dropout_p is None else f"{site.dropout_p:g}",
        site.scaling,
        bias,
        ",".join(shared) or "-",
    )


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), *map(fmt, rows)]


def _format_graph(g: GraphReport) -> list[str]:
    m = g.match
    head = f"fxlora graph {g.compile_id} ({g.num_nodes} nodes)"
    if m is None:
        return [head, f"  left untouched: {g.fallback}", *(f"  {note}" for note in g.notes), *_format_pieces(g)]
    shared = sum(1 for members in m.input_groups.values() if len(members) > 1)
    lines = [
        f"{head}: {len(m.sites)} LoRA sites on {m.linears} linears, "
        f"{shared} shared-input groups, {len(m.rejections)} rejected"
    ]
    lines += _format_normalization(g)
    if m.sites:
        lines += _table([_site_row(s, m) for s in m.sites], _COLUMNS)
    if m.rejections:
        lines.append("  rejected (LoRA-like, not provably a site; left untouched):")
        for r in m.rejections:
            lines.append(f"    {r.node}" + (f" in {r.module}" if r.module else "") + f": {r.reason}")
    if g.decisions:
        lines += _format_decisions(g.decisions)
    for scaling_match, scaling_decisions in g.scaling:
        lines += _format_scaling(scaling_match, scaling_decisions)
    if g.fallback:
        lines.append(f"  left untouched: {g.fallback}")
    lines += [f"  {note}" for note in g.notes]
    lines += _format_pieces(g)
    if g.checkpointed_regions:
        lines.append(f"  {checkpoint_note(g.checkpointed_regions)}")
    return lines


def _format_normalization(g: GraphReport) -> list[str]:
    """The normalisation rules that fired, the canonical form each site was matched as (with the
    rules that made it), and the adapter-like layers no kind matched (fxlora.normalize, near_misses)."""
    from fxlora.near_misses import PREFIX
    from fxlora.normalize import CANONICAL, site_rules

    lines = []
    if g.rules:
        lines.append("  normalised before matching: " + ", ".join(f"{k} x{v}" for k, v in g.rules.items()))
    for kind, sites in _group_by_kind(g.sites + g.scaling_sites).items():
        made = [f"site {s.index} ({', '.join(sorted(r))})" for s in sites if (r := site_rules(s))]
        if made:
            lines.append(f"  {kind} matched as {CANONICAL[kind]} after normalising: {', '.join(made)}")
    if g.near_misses:
        lines.append("  adapter-like, matched by no kind (left untouched):")
        for r in g.near_misses:
            lines.append(f"    {r.node}" + (f" in {r.module}" if r.module else "") + f": {r.reason.removeprefix(PREFIX)}")
    return lines


def _group_by_kind(sites) -> dict:
    groups: dict = {}
    for s in sites:
        groups.setdefault(s.kind, []).append(s)
    return groups


def _format_pieces(g: GraphReport) -> list[str]:
    if not g.pieces:
        return []
    every = [site for sites in g.pieces for site in sites]
    prefix = os.path.commonprefix(every) if len(every) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]  # whole module names only
    rewritten = any(d.rewritten for d in g.decisions) and not g.fallback
    lines = [f"  DDP split the {'rewritten ' if rewritten else ''}graph into {len(g.pieces)} bucket sub-graph(s); "
             "fxlora ops (LoRA unless named) in each" + (f", under {prefix[:-1]}:" if prefix else ":")]
    for k, sites in enumerate(g.pieces):
        lines.append(f"    sub-graph {k}: {len(sites)}" + (f" ({', '.join(s[len(prefix):] for s in sites)})" if sites else ""))
    return lines


def checkpoint_note(regions: int) -> str:
    return (
        f"{regions} activation-checkpointed region(s) (torch.utils.checkpoint, use_reentrant=False) not searched: "
        "their LoRA sites run as traced (exact, recomputed in backward, not rewritten)"
    )


def _num(expr) -> str:
    try:
        v = int(expr)
    except TypeError:
        return str(expr)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return str(v)


def _mib(expr) -> str:
    try:
        return f"{int(expr) / 2**20:.2f} MiB"
    except TypeError:
        return str(expr)


def _format_decisions(decisions) -> list[str]:
    rows = []
    for d in decisions:
        if d.chosen is None:
            rows.append((str(d.site), "-", "-", "-", "-", "not rewritten: " + d.reason))
        else:
            rows.append((
                str(d.site), d.chosen.form.name, _num(d.chosen.flops), _mib(d.chosen.saved_bytes),
                _mib(d.peft_saved_bytes), d.reason,
            ))
    lines = ["  forms (FLOPs of forward+backward; bytes this site saves for backward; PEFT's for comparison):"]
    lines += _table(rows, ("#", "form", "FLOPs", "saved", "PEFT saved", "why"))
    lossy = [str(d.site) for d in decisions if d.chosen is not None and d.chosen.form.lossy]
    if lossy:  # opt-in compression (docs/lossy.md): say it where nobody can miss it
        lines.append(f"  LOSSY sites {','.join(lossy)}: opted in via `compress`; their lora_A gradients are approximate")
    # Candidates once per distinct site shape: formulas in T, i, o, r and their values here.
    for shape, group in _by_shape(decisions).items():
        d = group[0]
        lines.append(
            f"  candidates for sites {','.join(str(g.site) for g in group)} "
            f"(T={shape.tokens}, i={shape.in_features}, o={shape.out_features}, r={shape.rank}"
            + (", A frozen" if not shape.a_trainable else "") + (", dropout" if shape.dropout else "") + "):"
        )
        rows = []
        for c in d.candidates:
            mark = "*" if d.chosen is not None and c.form == d.chosen.form else ""
            rows.append((
                mark + c.form.name, str(c.form.flops), _num(c.flops), str(c.form.saved_bytes),
                _mib(c.saved_bytes), _mib(c.transient_bytes) if c.transient_bytes else "-",
                "" if c.form.legal else "illegal: " + c.form.why_not,
            ))
        header = ("form", "FLOPs formula", "FLOPs", "saved formula", "saved", "merged W (in op)", "")
        lines += ["  " + r for r in _table(rows, header)]
    return lines


# --- IA3 and VeRA: one generic table per adapter kind ------------------------------------

_SCALING_KINDS = {"ia3_out": "IA3 (output scaling)", "ia3_in": "IA3 (input scaling)", "vera": "VeRA",
                  "loreft": "LoReFT", "direft": "DiReFT"}


def _format_scaling(match, decisions) -> list[str]:
    if not match.sites and not match.rejections:
        return []
    by_site = {d.site: d for d in decisions}
    rows = []
    for s in match.sites:
        d = by_site.get(s.index)
        dtype = dtype_name(s.compute_dtype) + (f"@{s.autocast.split(':')[1]}" if s.autocast else "")
        if dtype_name(s.vector_dtype) != dtype_name(s.compute_dtype):
            dtype += f", vec {dtype_name(s.vector_dtype)}"
        rows.append((
            str(s.index), s.module or s.nodes.out.name, _SCALING_KINDS[s.kind], s.base_kind,
            "*".join(describe_size(t) for t in s.tokens) or "1", describe_size(s.in_features),
            describe_size(s.out_features), "-" if s.rank is None else describe_size(s.rank), dtype,
            "+".join(s.trainable), "yes" if s.has_bias else "no", str(s.shared_x),
            "-" if d is None or d.chosen is None else d.chosen.form.name,
            "-" if d is None or d.chosen is None else _mib(d.chosen.saved_bytes),
            "-" if d is None or d.peft_saved_bytes is None else _mib(d.peft_saved_bytes),
            "" if d is None else (d.reason if d.chosen is not None else "not rewritten: " + d.reason),
        ))
    kinds = sorted({_SCALING_KINDS[s.kind].split(" ")[0] for s in match.sites}) or ["IA3/VeRA"]
    lines = [f"  {'/'.join(kinds)} sites: {len(match.sites)}, {len(match.rejections)} rejected"]
    if rows:
        lines += _table(rows, ("#", "site", "kind", "base", "tokens", "in", "out", "r", "dtype", "trains", "bias",
                               "x read by", "form", "saved", "PEFT saved", "why"))
    for r in match.rejections:
        lines.append(f"    rejected {r.node}" + (f" in {r.module}" if r.module else "") + f": {r.reason}")
    for shape, group in _by_shape(decisions).items():
        d = group[0]
        lines.append(
            f"  candidates for {_SCALING_KINDS[shape.kind]} sites {','.join(str(g.site) for g in group)} "
            f"(T={shape.tokens}, i={shape.in_features}, o={shape.out_features}"
            + (f", r={shape.rank}" if shape.kind in ("vera", "loreft", "direft") else "")
            + (f", x read by {shape.shared_x}" if shape.shared_x > 1 else "")
            + (", x rebuilt by the partitioner" if shape.x_rebuilt else "") + "):"
        )
        crows = []
        for c in d.candidates:
            mark = "*" if d.chosen is not None and c.form == d.chosen.form else ""
            crows.append((mark + c.form.name, str(c.form.flops), _num(c.flops), str(c.form.saved_bytes),
                          _mib(c.saved_bytes), "" if c.form.legal else "illegal: " + c.form.why_not))
        lines += ["  " + r for r in _table(crows, ("form", "FLOPs formula", "FLOPs", "saved formula", "saved", ""))]
    return lines
