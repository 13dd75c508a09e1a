"""What fxlora saw and did, as data (GraphReport, Report) and as text, for every kind alike.

The store keeps the latest 64 graph reports of this process (`last_report()`) and the latest
Dynamo graph breaks of fxlora's compiles (fxlora/breaks.py records them); the backend records
into it, explain builds its own. Formatting reads each kind's table cells from the
kind itself (fxlora/kinds/base.py `Kind.row`), so a new kind needs nothing here.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any, Optional

_RECENT: collections.deque = collections.deque(maxlen=64)
_BREAKS: collections.deque = collections.deque(maxlen=256)


@dataclass
class KindResult:
    """One kind's pass over one graph: what it matched and what it decided for each site."""

    kind: Any  # fxlora.kinds.base.Kind
    match: Any  # fxlora.kinds.base.Match
    decisions: list = field(default_factory=list)  # fxlora.kinds.base.Decision per site
    normalised: dict = field(default_factory=dict)  # site index -> normalisation rules that made its nodes


class _Results:
    """Every kind's sites, decisions and rejections of one graph or region, flattened."""

    kinds: list  # KindResult per kind, in pipeline order

    @property
    def sites(self) -> list:
        return [s for r in self.kinds for s in r.match.sites]

    @property
    def decisions(self) -> list:
        return [d for r in self.kinds for d in r.decisions]

    @property
    def rejections(self) -> list:
        return [x for r in self.kinds for x in r.match.rejections]

    @property
    def rewritten(self) -> int:
        return sum(d.rewritten for d in self.decisions)

    def result(self, kind: str) -> Optional[KindResult]:
        """The KindResult of kind `kind` ("lora", "ia3", ...), or None when the passes did not run."""
        return next((r for r in self.kinds if r.kind.name == kind), None)


@dataclass
class RegionReport(_Results):
    """One activation-checkpointed region (fxlora/checkpoint.py): what the pipeline did in its body."""

    body: str  # the body's attribute name on the graph (wrap_body_0, ...)
    use_reentrant: Optional[bool]  # as the model asked checkpoint for it; None when Dynamo did not record it
    kinds: list = field(default_factory=list)
    fallback: Optional[str] = None  # why the body was left untouched, when it was


@dataclass
class GraphReport(_Results):
    """One Dynamo graph: each kind's sites, rejections and decisions, its checkpointed regions,
    the graph before/after."""

    compile_id: str
    num_nodes: int
    graph_before: str
    graph_after: str
    kinds: list = field(default_factory=list)
    regions: list[RegionReport] = field(default_factory=list)
    fallback: Optional[str] = None  # why the graph was left untouched, when it was
    notes: list[str] = field(default_factory=list)
    pieces: list[list[str]] = field(default_factory=list)  # DDP: each bucket sub-graph's fxlora op sites, in order
    no_backward: bool = False  # gradients disabled: forms chosen by FLOPs, saved bytes do not apply
    rules: dict = field(default_factory=dict)  # normalisation rule -> times fired (fxlora/normalize.py)
    near_misses: list = field(default_factory=list)  # Rejection per adapter-like layer no kind matched
    # What the graph holds, for fxlora/accounting.py and the why of "0 adapter sites":
    contents: str = ""  # its parameters in a few words (fxlora/accounting.py `describe_graph`)
    ended_by: str = ""  # the Dynamo graph break this graph ends at, when it does
    frame_module: Any = None  # weakref to the module whose frame Dynamo traced: `module` paths start there
    frame_code: str = ""  # "file:line name" of that frame's code: Dynamo reuses the graph for its class's instances
    parameters: list = field(default_factory=list)  # weakref per parameter the graph reads
    inlined: list = field(default_factory=list)  # InlineResult per graph Inductor compiled (forward, backward)
    budget: list = field(default_factory=list)  # BudgetResult per partitioned graph (fxlora/budget.py), with memory_budget

    @property
    def all_sites(self) -> list:
        """Sites of the graph and of its checkpointed regions."""
        return [*self.sites, *(s for r in self.regions for s in r.sites)]

    @property
    def all_rewritten(self) -> int:
        """Sites rewritten in the graph and in its checkpointed regions."""
        return self.rewritten + sum(r.rewritten for r in self.regions)

    @property
    def checkpointed_regions(self) -> int:
        """Calls of Dynamo's activation-checkpoint HOP: subgraphs the passes do not descend into."""
        return self.graph_before.count("torch.ops.higher_order.tag_activation_checkpoint(")

    def format(self, verbose: bool = False) -> str:
        return "\n".join(_format_graph(self, verbose))

    def __str__(self) -> str:
        return self.format()


@dataclass
class GraphBreak:
    """One Dynamo graph break while tracing for fxlora (recorded by fxlora/breaks.py)."""

    gb_type: str  # Dynamo's name for it: "HOP: Unsafe side effect", "Data-dependent branching", ...
    explanation: str = ""
    context: str = ""  # Dynamo's developer context: "Attempted to mutate ..."
    hint: str = ""  # Dynamo's first hint
    where: str = ""  # the user line that broke: "peft/tuners/loha/layer.py:241 in forward: `...`"
    installed: bool = False  # that line is in an installed package (site-packages), not the user's code
    frame: str = ""  # the frame Dynamo was tracing: "LlamaDecoderLayer.forward (transformers/...:280)"
    skipped: bool = False  # Dynamo gave up on the whole frame and ran it uncompiled
    calls: int = 0  # user frames between the traced frame and the break (> 0: it broke inside a call)
    module: Any = None  # weakref to the frame's module (`self`)
    module_class: Optional[type] = None
    skip_checkpoint_side_effects: bool = True  # the option of the compile it broke
    advice: str = ""  # what the user can do (fxlora/breaks.py ADVICE)

    @property
    def key(self) -> tuple[str, str]:
        """Breaks with the same key are one cause met in several frames."""
        return self.gb_type, self.where

    def describe(self) -> str:
        """Dynamo's reason in one line: its name, explanation and context, where it broke."""
        text = self.gb_type + (f": {self.explanation}" if self.explanation else "")
        text += f" ({self.context})" if self.context else ""
        return text + (f" at {self.where}" if self.where else "")


@dataclass
class Report:
    """Every graph fxlora compiled for one call (several when Dynamo breaks the graph), the
    graph breaks met on the way, and, when the model is known, its adapter layers accounted for."""

    graphs: list[GraphReport]
    breaks: list[GraphBreak] = field(default_factory=list)
    accounting: Any = None  # fxlora.accounting.Accounting: explain sets it, `fxlora.account(model)` builds it

    @property
    def sites(self) -> list:
        """Every site found, inside checkpointed regions too."""
        return [s for g in self.graphs for s in g.all_sites]

    @property
    def decisions(self) -> list:
        return [d for g in self.graphs for d in (*g.decisions, *(d for r in g.regions for d in r.decisions))]

    @property
    def rejections(self) -> list:
        return [r for g in self.graphs for r in g.rejections]

    @property
    def near_misses(self) -> list:
        """Adapter-like layers no kind matched, with the rule that failed (fxlora/near_misses.py)."""
        return [r for g in self.graphs for r in g.near_misses]

    def sites_of(self, kind: str) -> list:
        return [s for g in self.graphs if g.result(kind) for s in g.result(kind).match.sites]

    def decisions_of(self, kind: str) -> list:
        return [d for g in self.graphs if g.result(kind) for d in g.result(kind).decisions]

    def rejections_of(self, kind: str) -> list:
        return [r for g in self.graphs if g.result(kind) for r in g.result(kind).match.rejections]

    def format(self, verbose: bool = False) -> str:
        parts = [g.format(verbose) for g in self.graphs] or ["fxlora: no graph compiled yet"]
        if self.breaks:
            parts.append("\n".join(format_breaks(self.breaks)))
        if self.accounting is not None:
            parts.append(self.accounting.format())
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.format()


def record(report: GraphReport) -> None:
    _RECENT.append(report)


def record_break(brk: GraphBreak) -> None:
    _BREAKS.append(brk)


def last_report(verbose: bool = False) -> Report:
    """The reports of the graphs fxlora compiled in this process (the latest 64), oldest first,
    and the Dynamo graph breaks met while tracing for fxlora.

    Printing it shows the short form; `last_report(verbose=True)` (or `.format(verbose=True)`)
    prints every form's candidates too. `fxlora.account(model)` adds the model's adapter layers."""
    cls = VerboseReport if verbose else Report
    return cls(list(_RECENT), list(_BREAKS))


class VerboseReport(Report):
    """A Report whose text includes every candidate form."""

    def __str__(self) -> str:
        return self.format(verbose=True)


def clear_reports() -> None:
    """Forget the recorded graph reports and graph breaks (tests start from a clean store)."""
    _RECENT.clear()
    _BREAKS.clear()


# --- formatting ---------------------------------------------------------------------


def summary(g: GraphReport) -> str:
    """One line: each kind's sites, rewritten and rejected, the bytes saved against PEFT, and
    what the checkpointed regions held."""
    parts = [kind_summary(r) for r in g.kinds if r.match.sites or r.match.rejections]
    chosen = [d for d in g.decisions if d.rewritten and d.peft_saved_bytes is not None]
    if chosen and not g.no_backward:
        ours, peft = sum(d.chosen.saved_bytes for d in chosen), sum(d.peft_saved_bytes for d in chosen)
        parts.append(f"saved for backward (cost model, sum over rewritten sites) {_mib(ours)} vs PEFT {_mib(peft)}")
    if g.regions:
        parts.append(f"{len(g.regions)} checkpointed region(s): {sum(len(r.sites) for r in g.regions)} sites, "
                     f"{sum(r.rewritten for r in g.regions)} rewritten")
    return "; ".join(parts) or f"0 adapter sites: {no_site_why(g)}"


def no_site_why(g: GraphReport) -> str:
    """Why a graph has no site: what it holds, and the graph break it ends at (a count never stands alone)."""
    if g.near_misses:
        return "its adapter-like layers match no kind (listed below)"
    why = g.contents or "no kind found an adapter's math in it"
    return why + (f"; Dynamo ended this graph at a graph break: {g.ended_by}" if g.ended_by else "")


def kind_summary(r) -> str:
    m, n = r.match, len(r.match.sites)
    text = f"{n} {r.kind.title} site{'' if n == 1 else 's'}" + (f" on {m.linears} linears" if m.linears else "")
    shared = sum(1 for members in m.input_groups.values() if len(members) > 1)
    text += f", {sum(d.rewritten for d in r.decisions)} rewritten, {len(m.rejections)} rejected"
    return text + (f", {shared} shared-input groups" if shared else "")


def format_breaks(breaks: list[GraphBreak]) -> list[str]:
    """Each distinct graph break once: Dynamo's reason, the frames it hit, what to do."""
    groups: dict = {}
    for b in breaks:
        groups.setdefault(b.key, []).append(b)
    lines = [f"Dynamo graph breaks while tracing for fxlora ({len(groups)} distinct, in {len(breaks)} frames):"]
    for group in groups.values():
        frames = list(dict.fromkeys(b.frame for b in group if b.frame))
        skipped = sum(b.skipped for b in group)
        lines.append(f"  {group[0].describe()}")
        if frames:
            more = f", +{len(frames) - 3} more" if len(frames) > 3 else ""
            lines.append(f"    in {', '.join(frames[:3])}{more}"
                         + (f"; Dynamo ran {skipped} of these frames uncompiled" if skipped else ""))
        if group[0].advice:
            lines.append(f"    what to do: {group[0].advice}")
    return lines


def _format_graph(g: GraphReport, verbose: bool) -> list[str]:
    head = f"fxlora graph {g.compile_id} ({g.num_nodes} nodes)"
    if not g.kinds:
        return [head, f"  left untouched: {g.fallback}", *(f"  {note}" for note in g.notes), *_format_budget(g),
                *_format_pieces(g)]
    lines = [f"{head}: {summary(g)}"]
    if g.rules:
        lines.append("  normalised before matching: " + ", ".join(f"{k} x{v}" for k, v in g.rules.items()))
    for r in g.kinds:
        lines += _format_kind(r, verbose)
    if g.near_misses:
        lines.append("  adapter-like, matched by no kind (left untouched):")
        lines += [f"    {x.node}" + (f" in {x.module}" if x.module else "") + f": {x.reason}" for x in g.near_misses]
    if g.fallback:
        lines.append(f"  left untouched: {g.fallback}")
    lines += [f"  {note}" for note in g.notes]
    lines += _format_inlined(g)
    lines += _format_budget(g)
    lines += _format_pieces(g)
    lines += _format_regions(g, verbose)
    return lines


def _format_inlined(g: GraphReport) -> list[str]:
    """What Inductor compiled inside fxlora's ops (fxlora/ops/inline.py), over the forward and backward graphs."""
    if not g.inlined:
        return []
    counts: dict[str, int] = {}
    opaque: dict[tuple[str, str], int] = {}
    for result in g.inlined:
        for name, n in result.inlined.items():
            counts[name] = counts.get(name, 0) + n
        for key in result.opaque:
            opaque[key] = opaque.get(key, 0) + 1
    short = lambda name: name.split("::")[-1]  # noqa: E731
    lines = [f"  op bodies compiled by Inductor: {sum(counts.values())} of {sum(counts.values()) + sum(opaque.values())}"
             + (" (" + ", ".join(f"{short(k)} x{v}" for k, v in counts.items()) + ")" if counts else "")]
    lines += [f"    left opaque (eager body): {short(name)} x{n}: {why}" for (name, why), n in opaque.items()]
    return lines


def _format_budget(g: GraphReport) -> list[str]:
    """How the memory budget was met, per partitioned graph (a DDP piece each)."""
    return [f"  {result.format()}" for result in g.budget]


def _format_regions(g: GraphReport, verbose: bool) -> list[str]:
    """Checkpointed regions: one line for all, then each region's site tables."""
    if not g.regions:
        return [f"  {checkpoint_note(g.checkpointed_regions)}"] if g.checkpointed_regions else []
    settings = sorted({r.use_reentrant for r in g.regions if r.use_reentrant is not None})
    reentrant = "/".join(f"use_reentrant={v}" for v in settings) or "use_reentrant unknown"
    lines = [f"  {len(g.regions)} activation-checkpointed region(s) ({reentrant}) searched: "
             f"{sum(len(r.sites) for r in g.regions)} sites, {sum(r.rewritten for r in g.regions)} rewritten; "
             "forms chosen by measured time with the forward counted twice, or by FLOPs without timings "
             "(a region's forward runs again in backward and keeps only its inputs)"]
    for region in g.regions:
        lines.append(f"  region {region.body} (use_reentrant={region.use_reentrant}):"
                     + (f" left untouched: {region.fallback}" if region.fallback else ""))
        for r in region.kinds:
            lines += ["  " + line for line in _format_kind(r, verbose)]
    return lines


_DECISION_COLUMNS = ("form", "saved", "PEFT saved", "why")


def _format_kind(r, verbose: bool) -> list[str]:
    m = r.match
    if not m.sites and not m.rejections:
        return []
    lines = [f"  {r.kind.title} sites, matched as {r.kind.canonical}:"] if m.sites else []
    if r.normalised:
        made = ", ".join(f"site {i} ({', '.join(rules)})" for i, rules in r.normalised.items())
        lines.append(f"  {r.kind.name} matched as {r.kind.canonical} after normalising: {made}")
    by_site = {d.site: d for d in r.decisions}
    rows = [(*r.kind.row(site, m), *_decision_cells(by_site.get(site.index))) for site in m.sites]
    if rows:
        lines += _table(rows, (*r.kind.columns, *_DECISION_COLUMNS))
    if m.rejections:
        lines.append(f"  rejected ({r.kind.title}-like, not provably a site; left untouched):")
        for x in m.rejections:
            lines.append(f"    {x.node}" + (f" in {x.module}" if x.module else "") + f": {x.reason}")
    lossy = [str(d.site) for d in r.decisions if d.chosen is not None and d.chosen.form.lossy]
    if lossy:  # opt-in compression (docs/lossy.md): say it where nobody can miss it
        lines.append(f"  LOSSY sites {','.join(lossy)}: opted in via `compress`; their gradients are approximate")
    if verbose:
        lines += _format_candidates(r)
    return lines


def _decision_cells(d) -> tuple[str, str, str, str]:
    if d is None or d.chosen is None:
        return "-", "-", "-", "kept: " + (d.reason if d is not None else "not priced")
    return d.chosen.form.name, _mib(d.chosen.saved_bytes), _mib(d.peft_saved_bytes), d.reason


def _format_candidates(r) -> list[str]:
    """Candidates once per distinct site shape: formulas in T, i, o, r and their values here."""
    groups: dict = {}
    for d in r.decisions:
        if d.candidates:
            groups.setdefault(d.shape, []).append(d)
    lines = []
    for shape, group in groups.items():
        d = group[0]
        what, sizes = r.kind.describe_shape(shape)
        ids = ",".join(str(g.site) for g in group)
        lines.append(f"  candidates for {what + ' ' if what else ''}sites {ids} ({sizes}):")
        rows = []
        for c in d.candidates:
            mark = "*" if d.chosen is not None and c.form == d.chosen.form else ""
            rows.append((
                mark + c.form.name, str(c.form.flops), _num(c.flops), str(c.form.saved_bytes),
                _mib(c.saved_bytes), _mib(c.transient_bytes) if c.transient_bytes else "-",
                "-" if c.seconds is None else f"{c.seconds * 1e3:.3g} ms",
                "" if c.form.legal else "illegal: " + c.form.why_not,
            ))
        header = ("form", "FLOPs formula", "FLOPs", "saved formula", "saved", "in-op merged W", "time", "")
        lines += ["  " + row for row in _table(rows, header)]
    return lines


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def _format_pieces(g: GraphReport) -> list[str]:
    if not g.pieces:
        return []
    every = [site for sites in g.pieces for site in sites]
    prefix = os.path.commonprefix(every) if len(every) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]  # whole module names only
    rewritten = g.rewritten and not g.fallback
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
