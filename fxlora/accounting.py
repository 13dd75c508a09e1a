"""Every adapter layer of a model accounted for: seen by fxlora or not, rewritten or why not, and
for a layer no graph held, the Dynamo graph break that cut it out and what to do.

    print(fxlora.account(model))     # after compiled steps: from fxlora.last_report()
    fxlora.explain(model, **batch)   # its report ends with the same accounting

A model's adapter layers are PEFT's tuner layers (`BaseTunerLayer`, when peft is installed and
the model has some), else every module that owns adapter parameters in general: a frozen base
weight of its own or of a direct child, beside trainable parameters that hold no frozen weight.
A layer is *seen* when a graph fxlora compiled reads one of its parameters (by identity: the
report keeps weak references); report items (sites, rejections, near misses) are tied to layers
through their module path, which starts at the module whose frame Dynamo traced
(`GraphReport.frame_module`), so `_orig_mod.`, `base_model.model.` and frames that start deep in
the model (after a graph break) all resolve to the model's own paths. A frame's graph also runs
for the other modules of its class and parameter shapes that got no graph of their own (Dynamo
guards it on type and shapes, not identity): those count as seen, through that graph. Module
names here are for people only; nothing is matched by them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.breaks import install_break_records
from fxlora.graph.read import parameter_inputs
from fxlora.near_misses import PREFIX as NEAR_MISS
from fxlora.report import GraphBreak, GraphReport, Report, last_report

# Best outcome first: a layer seen in several graphs is accounted for by the best of them.
STATUSES = ("rewritten", "kept", "rejected", "near miss", "unclaimed", "unseen")


@dataclass
class LayerAccount:
    """One adapter layer: what became of it and why."""

    path: str  # in the model as given (no `_orig_mod.`)
    what: str  # the layer's class, for people: "peft.tuners.lora.layer.Linear (LORA)"
    status: str  # one of STATUSES
    reason: str = ""
    graphs: list[str] = field(default_factory=list)  # compile ids of the graphs that read its parameters
    breaks: list[GraphBreak] = field(default_factory=list)  # unseen: what cut it out; seen: what split it
    whole: bool = False  # one graph read both its frozen base and its trainable adapter


@dataclass
class Accounting:
    """A model's adapter layers against what fxlora saw: `str()` is the report's last section."""

    layers: list[LayerAccount]
    breaks: list[GraphBreak] = field(default_factory=list)  # the graph breaks met in this model
    counted: dict = field(default_factory=dict)  # Dynamo's own counters, when no break was recorded

    @property
    def seen(self) -> list[LayerAccount]:
        return [x for x in self.layers if x.status != "unseen"]

    @property
    def rewritten(self) -> list[LayerAccount]:
        return [x for x in self.layers if x.status == "rewritten"]

    @property
    def unseen(self) -> list[LayerAccount]:
        return [x for x in self.layers if x.status == "unseen"]

    def summary(self) -> str:
        return (f"adapter layers: {len(self.layers)} in the model, {len(self.seen)} seen by fxlora, "
                f"{len(self.rewritten)} rewritten")

    def format(self) -> str:
        return "\n".join(format_accounting(self))

    def __str__(self) -> str:
        return self.format()


def account(model: nn.Module, report: Optional[Report] = None) -> Accounting:
    """`model`'s adapter layers against `report` (default: `fxlora.last_report()`).

    `model` may be the compiled module (`torch.compile(...)` returns a wrapper; its `_orig_mod`
    is used), a PEFT model or the model inside it: paths are given from the module passed."""
    model = getattr(model, "_orig_mod", model)
    report = report if report is not None else last_report()
    index = _ModelIndex(model)
    accounts = {path: LayerAccount(path, _what(index.modules[path]), "unseen") for path in index.layers}
    breaks = [b for b in report.breaks if index.owns_break(b)]
    graphs = [g for g in report.graphs if index.reads(g)]
    for g in graphs:
        for placement in index.placements(g, graphs):
            _seen_in(g, placement, index, accounts)
    for layer in accounts.values():
        if layer.status == "unclaimed":
            layer.breaks = _breaks_inside(layer.path, index, breaks)
            layer.reason = _unclaimed(layer)
        elif layer.status == "unseen":
            layer.breaks = _cut_by(layer.path, index, breaks)
            layer.reason = "in no graph fxlora compiled" + (
                "" if layer.breaks else ": no Dynamo graph break was recorded on its way, so it did not run "
                "under torch.compile(backend='fxlora') (not called in forward, or called outside the compiled module)")
    counted = {} if install_break_records() else dict(torch._dynamo.utils.counters.get("graph_break", {}))
    return Accounting(list(accounts.values()), breaks, counted)


# --- the model's adapter layers --------------------------------------------------------------


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each adapter layer, outermost only, in module order."""
    modules = list(model.named_modules())
    tuner = _tuner_layer_class()
    is_layer: Callable[[nn.Module], bool] = owns_adapter
    if tuner is not None and any(isinstance(m, tuner) for _, m in modules):
        is_layer = lambda m: isinstance(m, tuner)  # noqa: E731
    found: list[tuple[str, nn.Module]] = []
    taken: set[str] = set()
    for path, m in modules:
        if not any(a in taken for a in _ancestors(path)[1:]) and is_layer(m):
            found.append((path, m))
            taken.add(path)
    return found


def _tuner_layer_class() -> Optional[type]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional
        return None
    return BaseTunerLayer


def _frozen_weight(p: torch.Tensor) -> bool:
    return p.dim() >= 2 and p.dtype.is_floating_point and not p.requires_grad


def owns_adapter(m: nn.Module) -> bool:
    """A frozen base weight (its own or a direct child's) beside trainable parts holding no frozen weight."""
    own = list(m.named_parameters(recurse=False))
    children = list(m.named_children())
    base = [n for n, p in own if _frozen_weight(p)] + [
        n for n, c in children if any(_frozen_weight(p) for p in c.parameters(recurse=False))]
    if not base:
        return False
    trainable_own = any(p.requires_grad for n, p in own if n not in base)
    trainable_child = any(
        any(p.requires_grad for p in c.parameters()) and not any(_frozen_weight(p) for p in c.parameters())
        for n, c in children if n not in base)
    return trainable_own or trainable_child


def _what(layer: nn.Module) -> str:
    """The layer's class in full and, for PEFT's, the tuner it belongs to ("LOHA")."""
    cls = type(layer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    parts = cls.__module__.split(".")
    tuner = parts[2].upper() if len(parts) > 2 and parts[:2] == ["peft", "tuners"] else ""
    return name + (f" ({tuner})" if tuner else "")


def _ancestors(path: str) -> list[str]:
    """`path`, its parent, ..., "" (the model itself)."""
    out = [path]
    while path:
        path = path.rpartition(".")[0]
        out.append(path)
    return out


@dataclass
class _Placement:
    """Where a graph ran in the model: `resolve` maps a module path of the graph (relative to its
    frame's module) to the model's, `move` maps the traced module's paths to this instance's.
    `reused` names the module the graph was compiled for, when it ran for another of its class."""

    resolve: Callable[[Optional[str]], Optional[str]]
    move: Callable[[Optional[str]], Optional[str]] = lambda path: path
    reused: str = ""


class _ModelIndex:
    """The model's modules and parameters by identity, its adapter layers by path."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.path_of = {id(m): p for p, m in self.modules.items()}
        named = model.named_parameters(remove_duplicate=False)
        self.param_module = {id(p): name.rpartition(".")[0] for name, p in named}
        self.trainable = {id(p) for p in model.parameters() if p.requires_grad}
        self.layers = {path: None for path, _ in adapter_layers(model)}  # in module order

    def layer_of(self, path: Optional[str]) -> Optional[str]:
        """The adapter layer `path` lies in (the layer itself, or a module inside it)."""
        if path is None:
            return None
        return next((a for a in _ancestors(path) if a in self.layers), None)

    def reads(self, g: GraphReport) -> bool:
        return any(self._param(ref) is not None for ref in g.parameters)

    def _param(self, ref: Any) -> Optional[torch.Tensor]:
        p = ref() if callable(ref) else None
        return p if p is not None and id(p) in self.param_module else None

    def read_layers(self, g: GraphReport, move: Callable) -> dict[str, set[bool]]:
        """Adapter layer -> whether `g` reads its trainable (True) and/or frozen (False) parameters."""
        found: dict[str, set[bool]] = {}
        for p in (p for p in map(self._param, g.parameters) if p is not None):
            layer = self.layer_of(move(self.param_module[id(p)]))
            if layer is not None:
                found.setdefault(layer, set()).add(id(p) in self.trainable)
        return found

    def placements(self, g: GraphReport, graphs: list[GraphReport]) -> list[_Placement]:
        """Where `g` ran: for its frame's module, and for every other module of the same class and
        parameter shapes that has no graph of that frame of its own. Dynamo guards such a frame on
        the module's type and its parameters' shapes, not on which instance it is, so it runs the
        graph compiled for the first one for all of them (a decoder layer's graph for each layer)."""
        here = _Placement(self.resolver(g))
        root = g.frame_module() if callable(g.frame_module) else None
        if root is None or not g.frame_code or id(root) not in self.path_of:
            return [here]
        own = {id(x.frame_module()) for x in graphs if x.frame_code == g.frame_code and callable(x.frame_module)}
        path, signature = self.path_of[id(root)], _signature(root)
        others = [p for p, m in self.modules.items()
                  if type(m) is type(root) and id(m) not in own and _signature(m) == signature]
        return [here, *(_Placement(here.resolve, _mover(path, other), path) for other in others)]

    def resolver(self, g: GraphReport) -> Callable[[Optional[str]], Optional[str]]:
        """Graph module path -> model path: paths start at the module of the traced frame."""
        root = g.frame_module() if callable(g.frame_module) else None
        if root is None or id(root) == id(self.model):
            return lambda path: path or ""
        if id(root) in self.path_of:
            prefix = self.path_of[id(root)]
            return lambda path: ".".join(p for p in (prefix, path) if p)
        inside = next((p for p, m in root.named_modules() if m is self.model), None)
        if inside is None:  # the model is neither in the traced module nor around it
            return lambda path: None
        return lambda path: _strip(path or "", inside)

    def owns_break(self, b: GraphBreak) -> bool:
        m = b.module() if callable(b.module) else None
        return m is not None and (id(m) in self.path_of or any(x is self.model for x in m.modules()))

    def break_path(self, b: GraphBreak) -> Optional[str]:
        m = b.module() if callable(b.module) else None
        return self.path_of.get(id(m)) if m is not None else None


def _signature(m: nn.Module) -> list:
    return [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in m.named_parameters()]


def _mover(source: str, target: str) -> Callable[[Optional[str]], Optional[str]]:
    """Model path under `source` -> the same path under `target` (None outside `source`)."""
    def move(path: Optional[str]) -> Optional[str]:
        rest = _strip(path, source) if path is not None else None
        return None if rest is None else ".".join(p for p in (target, rest) if p)
    return move


def _strip(path: str, prefix: str) -> Optional[str]:
    if not prefix or path == prefix:
        return path[len(prefix):].lstrip(".")
    return path[len(prefix) + 1:] if path.startswith(prefix + ".") else None


# --- what the graphs say about each layer ----------------------------------------------------


def _seen_in(g: GraphReport, where: _Placement, index: _ModelIndex, accounts: dict[str, LayerAccount]) -> None:
    """Mark the layers whose parameters `g` reads where it ran, then give each item of `g` to its layer."""
    reused = f" (in the graph Dynamo compiled for {where.reused} and reuses here)" if where.reused else ""
    untouched = not g.kinds and g.fallback  # the passes failed or did not apply: every layer in it is as traced
    for path, kinds in index.read_layers(g, where.move).items():
        layer = accounts[path]
        if g.compile_id not in layer.graphs:
            layer.graphs.append(g.compile_id)
        layer.whole = layer.whole or kinds == {True, False}
        _better(layer, *(("kept", f"graph {g.compile_id} left untouched: {g.fallback}{reused}") if untouched
                         else ("unclaimed", "")))
    for module, status, reason in _items(g):
        path = index.layer_of(where.move(where.resolve(module)))
        if path in accounts:
            if g.compile_id not in accounts[path].graphs:
                accounts[path].graphs.append(g.compile_id)
            _better(accounts[path], status, reason + reused)


def _items(g: GraphReport) -> Iterable[tuple[Optional[str], str, str]]:
    """(module path, status, reason) for every site, rejection and near miss of `g` and its regions."""
    if not g.kinds and g.fallback:
        return
    for where, results in [("", g.kinds), *((f"region {r.body}: ", r.kinds) for r in g.regions)]:
        for r in results:
            by_site = {d.site: d for d in r.decisions}
            for site in r.match.sites:
                d = by_site.get(site.index)
                if d is not None and d.rewritten:
                    yield site.module, "rewritten", f"{where}{r.kind.title} site, {d.chosen.form.name}"
                else:
                    yield site.module, "kept", f"{where}{r.kind.title} site kept: {d.reason if d else 'not priced'}"
            for x in r.match.rejections:
                reason = x.reason if x.reason.startswith(r.kind.title) else f"{r.kind.title}: {x.reason}"
                yield x.module, "rejected", where + reason
    for x in g.near_misses:
        yield x.module, "near miss", x.reason.removeprefix(NEAR_MISS)


def _better(layer: LayerAccount, status: str, reason: str) -> None:
    if STATUSES.index(status) < STATUSES.index(layer.status):
        layer.status, layer.reason = status, reason


def _unclaimed(layer: LayerAccount) -> str:
    text = f"in graph {', '.join(layer.graphs)}, but no kind claims it ({layer.what})"
    if not layer.whole:
        text += "; its frozen base and its trainable adapter were never in one graph, so no kind could match it"
    return text


def _breaks_inside(path: str, index: _ModelIndex, breaks: list[GraphBreak]) -> list[GraphBreak]:
    """Breaks in the frames of the layer or of a module inside it: they split the layer's math."""
    inside = [b for b in breaks if index.layer_of(index.break_path(b)) == path]
    same_class = [b for b in breaks if b.module_class is type(index.modules[path])]
    return _distinct(inside or same_class)


def _cut_by(path: str, index: _ModelIndex, breaks: list[GraphBreak]) -> list[GraphBreak]:
    """The breaks that kept `path` out of every graph: those of its nearest enclosing module that
    broke (that module, or one of its class: compiled code is shared by a class's instances)."""
    for ancestor in _ancestors(path):
        m = index.modules.get(ancestor)
        hits = [b for b in breaks if b.module is not None and b.module() is m]
        hits = hits or [b for b in breaks if b.module_class is type(m)]
        if hits:
            return _distinct(sorted(hits, key=lambda b: not b.calls))  # breaks inside a call first
    return []


def _distinct(breaks: list[GraphBreak]) -> list[GraphBreak]:
    return list({b.key: b for b in reversed(breaks)}.values())[::-1]


# --- text ------------------------------------------------------------------------------------


def format_accounting(a: Accounting) -> list[str]:
    lines = [a.summary()]
    other = [x for x in a.seen if x.status not in ("rewritten", "unclaimed")]
    if other:
        lines.append(f"  seen, not rewritten ({len(other)}):")
        lines += [f"    {x.path}: {x.status}: {x.reason} [graph {', '.join(x.graphs)}]" for x in other]
    unclaimed = [x for x in a.layers if x.status == "unclaimed"]
    for group in _groups(unclaimed, lambda x: (x.what, x.whole, tuple(b.key for b in x.breaks))).values():
        lines.append(f"  seen, but no kind claims them, so fxlora does not rewrite them ({len(group)}): "
                     + group[0].what)
        lines += [f"    {line}" for line in compact_paths([x.path for x in group])]
        if not group[0].whole:
            lines.append("    their frozen base and trainable adapter were never in one graph"
                         + (", split by a Dynamo graph break inside:" if group[0].breaks else ""))
        for b in group[0].breaks:
            lines.append(f"    {'' if group[0].whole else '  '}graph break: {b.describe()}")
            lines.append(f"      what to do: {b.advice}")
    unseen = a.unseen
    if unseen:
        lines.append(f"  never in a graph fxlora compiled ({len(unseen)}):")
    for key, group in _groups(unseen, lambda x: tuple(b.key for b in x.breaks)).items():
        if not key:
            lines += [f"    {line}" for line in compact_paths([x.path for x in group])]
            lines.append(f"    {group[0].reason.removeprefix('in no graph fxlora compiled: ')}")
            continue
        b = group[0].breaks[0]
        lines.append(f"    cut out by a Dynamo graph break: {b.describe()}")
        lines.append(f"      Dynamo broke in {b.frame}" + (", gave up on that frame" if b.skipped else "")
                     + f"; these layers ran uncompiled ({len(group)}):")
        lines += [f"        {line}" for line in compact_paths([x.path for x in group])]
        lines.append(f"      what to do: {b.advice}")
    if a.counted and unseen:
        lines.append("  Dynamo counted graph breaks (fxlora could not record where; torch._dynamo.utils.counters):")
        lines += [f"    {reason.splitlines()[0]} (x{n})" for reason, n in a.counted.items()]
    return lines


def _groups(items: list, key: Callable) -> dict:
    groups: dict = {}
    for x in items:
        groups.setdefault(key(x), []).append(x)
    return groups


def compact_paths(paths: list[str]) -> list[str]:
    """Paths grouped by parent, one line each: "model.layers.0.self_attn: q_proj, k_proj"."""
    by_parent: dict[str, list[str]] = {}
    for p in paths:
        parent, _, name = p.rpartition(".")
        by_parent.setdefault(parent, []).append(name)
    return [f"{parent}: {', '.join(names)}" if parent else ", ".join(names) for parent, names in by_parent.items()]


# --- what one graph holds (for the why of "0 adapter sites") ---------------------------------


def describe_graph(gm: fx.GraphModule, root: Optional[nn.Module] = None) -> str:
    """What `gm` holds in a few words: the trainable parameters no kind claimed and their layer,
    or that it holds none (then no adapter can be in it)."""
    params = parameter_inputs(gm)
    trainable = [path for path, p in params if p.requires_grad]
    if trainable:
        names = ", ".join(trainable[:3]) + (f", +{len(trainable) - 3} more" if len(trainable) > 3 else "")
        return f"no kind claims its trainable parameters ({names}, of {_owners(root, trainable, adapter=True)})"
    if params:
        count = "its parameter is frozen" if len(params) == 1 else f"its {len(params)} parameters are all frozen"
        return f"no adapter layer in this graph: {count} (it holds {_owners(root, [path for path, _ in params])})"
    return "no adapter layer in this graph: it reads no parameter"


def _owners(root: Optional[nn.Module], params: list[str], adapter: bool = False, most: int = 4) -> str:
    """The modules owning `params` with their classes; `adapter`: the enclosing adapter layer instead
    (the nearest module that also holds a frozen weight: PEFT's tuner layer, not its ParameterDict)."""
    found: list[str] = []
    for name in params:
        path = name.rpartition(".")[0]
        if root is not None and adapter:
            path = next((a for a in _ancestors(path) if _holds_frozen(root, a)), path)
        label = _label(root, path, full=adapter)
        if label not in found:
            found.append(label)
    return ", ".join(found[:most]) + (f", +{len(found) - most} more" if len(found) > most else "")


def _holds_frozen(root: nn.Module, path: str) -> bool:
    try:
        m = root.get_submodule(path)
    except AttributeError:
        return False
    return any(_frozen_weight(p) for p in m.parameters())


def _label(root: Optional[nn.Module], path: str, full: bool = False) -> str:
    """`path (Class)`; `full`: the class with its module (an adapter layer: peft.tuners.loha.layer.Linear)."""
    try:
        cls = type(root.get_submodule(path)) if root is not None else None
    except AttributeError:
        cls = None
    if cls is None:
        return path or "the traced module"
    full = full and not cls.__module__.startswith("torch.")
    name = f"{cls.__module__}.{cls.__qualname__}" if full else cls.__qualname__
    return f"{path} ({name})" if path else f"the traced {name}"


__all__ = ["Accounting", "LayerAccount", "account", "adapter_layers", "compact_paths", "describe_graph", "owns_adapter"]
