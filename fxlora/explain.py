"""What fxlora saw and did, for people: per-graph reports, `explain(model, ...)`, `last_report()`."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from fxlora.graph_utils import describe_size, dtype_name
from fxlora.inference import NO_BACKWARD_NOTE
from fxlora.sites import LoraMatch, LoraSite  # noqa: F401

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
    regions: list = field(default_factory=list)  # fxlora.checkpoint.RegionReport per checkpointed region

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
        """Calls of Dynamo's activation-checkpoint HOP (their bodies are searched too: `regions`)."""
        return self.graph_before.count("torch.ops.higher_order.tag_activation_checkpoint(")

    @property
    def region_sites(self) -> list:
        return [s for r in self.regions for s in r.sites]

    def format(self, verbose: bool = False) -> str:
        """The summary line and the site table; `verbose` adds each form's candidates with their formulas."""
        return "\n".join(_format_graph(self, verbose))

    def __str__(self) -> str:
        return self.format()


@dataclass
class Report:
    """Every graph fxlora compiled for one call (several when Dynamo breaks the graph)."""

    graphs: list[GraphReport]

    @property
    def sites(self) -> list[LoraSite]:
        """Every LoRA site found, inside checkpointed regions too."""
        return [s for g in self.graphs for s in (*g.sites, *g.region_sites)]

    @property
    def rejections(self):
        return [r for g in self.graphs if g.match for r in g.match.rejections]

    @property
    def scaling_sites(self) -> list:
        """IA3, VeRA and ReFT sites of every graph."""
        return [s for g in self.graphs for s in g.scaling_sites]

    @property
    def scaling_decisions(self) -> list:
        return [d for g in self.graphs for d in g.scaling_decisions]

    def format(self, verbose: bool = False) -> str:
        if not self.graphs:
            return "fxlora: no graph compiled yet"
        return "\n\n".join(g.format(verbose) for g in self.graphs)

    def __str__(self) -> str:
        return self.format()


class VerboseReport(Report):
    """A Report that prints with every candidate form (what `verbose=True` returns)."""

    def __str__(self) -> str:
        return self.format(verbose=True)


def record(report: GraphReport) -> None:
    from fxlora.logs import log_report

    _RECENT.append(report)
    log_report(report)


def last_report(verbose: bool = False) -> Report:
    """The reports of the graphs fxlora compiled in this process (the latest 64), oldest first.

    Printing it shows the short form; `last_report(verbose=True)` (or `.format(verbose=True)`)
    prints every form's candidates too."""
    return VerboseReport(list(_RECENT)) if verbose else Report(list(_RECENT))


def clear_reports() -> None:
    _RECENT.clear()


def explain(model: Any, *args: Any, options: Any = None, verbose: bool = False, **kwargs: Any) -> Report:
    """Trace `model(*args, **kwargs)` with Dynamo and report the adapter sites fxlora finds.

    Runs one forward pass (gradients enabled, so trainability is seen as in training);
    nothing is compiled with Inductor and the model is not changed. The report prints
    short; `verbose=True` adds every form's candidates.
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
    return VerboseReport(captured) if verbose else Report(captured)


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


def _format_graph(g: GraphReport, verbose: bool = False) -> list[str]:
    m = g.match
    head = f"fxlora graph {g.compile_id} ({g.num_nodes} nodes)"
    if m is None:
        return [head, f"  left untouched: {g.fallback}", *(f"  {note}" for note in g.notes), *_format_pieces(g)]
    lines = [f"{head}: {_summary(g)}"]
    lines += _lora_lines(m, g.decisions, verbose)
    for scaling_match, scaling_decisions in g.scaling:
        lines += _format_scaling(scaling_match, scaling_decisions, verbose)
    if g.fallback:
        lines.append(f"  left untouched: {g.fallback}")
    lines += [f"  {note}" for note in g.notes]
    lines += _format_pieces(g)
    lines += _format_regions(g, verbose)
    return lines


def _summary(g: GraphReport) -> str:
    """One line: sites, rewritten, rejected, and what the rewritten sites save for backward vs PEFT."""
    m = g.match
    shared = sum(1 for members in m.input_groups.values() if len(members) > 1)
    chosen = [d for d in (*g.decisions, *g.scaling_decisions) if d.rewritten and d.peft_saved_bytes is not None]
    kinds = [f"{len(ms.sites)} {_kind_name(ms)} sites" for ms, _ in g.scaling if ms.sites]
    text = (f"{len(m.sites)} LoRA sites on {m.linears} linears" + "".join(f", {k}" for k in kinds)
            + f", {shared} shared-input groups, {sum(d.rewritten for d in (*g.decisions, *g.scaling_decisions))} rewritten, "
            f"{len(m.rejections) + sum(len(ms.rejections) for ms, _ in g.scaling)} rejected")
    if chosen and NO_BACKWARD_NOTE not in g.notes:
        ours = sum((d.chosen.saved_bytes for d in chosen), 0)
        peft = sum((d.peft_saved_bytes for d in chosen), 0)
        text += f"; saved for backward (cost model, sum over sites) {_mib(ours)} vs PEFT {_mib(peft)}"
    if g.regions:
        text += f"; {len(g.regions)} checkpointed region(s): {sum(len(r.sites) + len(r.scaling_sites) for r in g.regions)} sites, " \
                f"{sum(r.rewritten for r in g.regions)} rewritten"
    return text


def _kind_name(scaling_match) -> str:
    return "/".join(sorted({_SCALING_KINDS[s.kind].split(" ")[0] for s in scaling_match.sites}))


def _lora_lines(m: LoraMatch, decisions, verbose: bool) -> list[str]:
    """The LoRA site table (with each site's chosen form when short), rejections, and in verbose the forms."""
    lines = []
    by_site = {d.site: d for d in decisions}
    if m.sites and verbose:
        lines += _table([_site_row(s, m) for s in m.sites], _COLUMNS)
    elif m.sites:
        rows = [(*_site_row(s, m)[:10], *_chosen_cells(by_site.get(s.index))) for s in m.sites]
        lines += _table(rows, (*_COLUMNS[:10], "form", "saved", "PEFT saved", "note"))
    if m.rejections:
        lines.append("  rejected (LoRA-like, not provably a site; left untouched):")
        for r in m.rejections:
            lines.append(f"    {r.node}" + (f" in {r.module}" if r.module else "") + f": {r.reason}")
    if decisions and verbose:
        lines += _format_decisions(decisions)
    elif _lossy_line(decisions):  # opt-in compression: said where nobody can miss it
        lines.append(_lossy_line(decisions))
    return lines


def _chosen_cells(d) -> tuple[str, str, str, str]:
    if d is None:
        return ("-", "-", "-", "")
    if d.chosen is None:
        return ("-", "-", "-", "kept: " + d.reason)
    return (d.chosen.form.name, _mib(d.chosen.saved_bytes), _mib(d.peft_saved_bytes), d.reason if d.chosen.form.lossy else "")


def _lossy_line(decisions) -> str:
    lossy = [str(d.site) for d in decisions if d.chosen is not None and d.chosen.form.lossy]
    return f"  LOSSY sites {','.join(lossy)}: opted in via `compress`; their lora_A gradients are approximate" if lossy else ""


def _format_regions(g: GraphReport, verbose: bool) -> list[str]:
    """Checkpointed regions: one line for all of them, then their sites (per region with `verbose`)."""
    if not g.regions:
        return [f"  {checkpoint_note(g.checkpointed_regions)}"] if g.checkpointed_regions else []
    from fxlora.checkpoint import reentrant_setting

    lines = [f"  {len(g.regions)} activation-checkpointed region(s) ({reentrant_setting(g.regions)}) searched: "
             f"{sum(len(r.sites) + len(r.scaling_sites) for r in g.regions)} sites, {sum(r.rewritten for r in g.regions)} rewritten; "
             "forms chosen by FLOPs (a region's forward runs again in backward and keeps only its inputs)"]
    if verbose:
        for r in g.regions:
            lines.append(f"  region {r.body} (use_reentrant={r.use_reentrant}):"
                         + (f" left untouched: {r.fallback}" if r.fallback else ""))
            if r.match is not None:
                lines += ["  " + line for line in _lora_lines(r.match, r.decisions, True)]
                for scaling_match, scaling_decisions in r.scaling:
                    lines += ["  " + line for line in _format_scaling(scaling_match, scaling_decisions, True)]
        return lines
    rows = []
    for r in g.regions:
        if r.fallback:
            rows.append((r.body, "-", "-", "-", "-", "-", "-", "left untouched: " + r.fallback))
        by_site = {d.site: d for d in r.decisions}
        for s in r.sites:
            form, _, _, note = _chosen_cells(by_site.get(s.index))
            rows.append((r.body, s.module or s.nodes.add.name, "*".join(describe_size(t) for t in s.tokens) or "1",
                         describe_size(s.in_features), describe_size(s.out_features), describe_size(s.rank), form, note))
        for ms, ds in r.scaling:
            by_scaling = {d.site: d for d in ds}
            for s in ms.sites:
                d = by_scaling.get(s.index)
                rows.append((r.body, f"{s.module or s.nodes.out.name} ({_SCALING_KINDS[s.kind]})",
                             "*".join(describe_size(t) for t in s.tokens) or "1", describe_size(s.in_features),
                             describe_size(s.out_features), "-" if s.rank is None else describe_size(s.rank),
                             "-" if d is None or d.chosen is None else d.chosen.form.name,
                             "" if d is None or d.chosen is not None else "kept: " + d.reason))
    if rows:
        lines += _table(rows, ("region", "site", "tokens", "in", "out", "r", "form", "note"))
    return lines


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
    """For graphs whose regions were not searched (the graph was left untouched)."""
    return (
        f"{regions} activation-checkpointed region(s) (torch.utils.checkpoint) not searched: "
        "their adapter sites run as traced (exact, recomputed in backward, not rewritten)"
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
    if _lossy_line(decisions):  # opt-in compression (docs/lossy.md): say it where nobody can miss it
        lines.append(_lossy_line(decisions))
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


def _format_scaling(match, decisions, verbose: bool = True) -> list[str]:
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
    if not verbose:
        return lines
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
