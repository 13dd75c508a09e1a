"""The one driver: normalise, then every adapter kind goes find -> own -> check -> price ->
choose -> rewrite, then the near misses no kind claimed are named.

A pass in the Inductor sense: a function over a GraphModule that returns what it did and
counts, once the graph compiled, what runs (`count`: `torch._dynamo.utils.counters["fxlora"]["<kind>_sites|_rewritten|_kept|_rejected"]`).
Kinds run in registry order, each on the graph the kinds before it rewrote; a node that an
earlier kind's site claims makes a later kind's site a Rejection naming the owner (first
match wins, as PEFT's dispatchers do). Each site is rewritten on its own: one that fails is
left as traced and costs no other (`rewrite_each`). `recompile` runs once per graph. The same
driver then runs on each activation-checkpoint body (fxlora/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx
from torch._dynamo.utils import counters

from fxlora.checkpoint import DROPOUT_IN_REGION, checkpoint_bodies, region_config
from fxlora.config import Config
from fxlora.cost.core import PricedForm, at, choose_form, price
from fxlora.cost.guards import SizeDecider, size_decider
from fxlora.cost.timing import Timings
from fxlora.graph.edit import copy_graph, copy_graph_module, remap_nodes
from fxlora.graph.prove import Rejection
from fxlora.graph.read import module_path, value
from fxlora.kinds import KINDS
from fxlora.kinds.base import Decision, Kind, Match
from fxlora.near_misses import find_near_misses
from fxlora.normalize import normalize, site_rules
from fxlora.report import KindResult, RegionReport


@dataclass
class PipelineResult:
    """What the pipeline did to one graph."""

    kinds: list[KindResult]
    regions: list[RegionReport] = field(default_factory=list)
    rules: dict[str, int] = field(default_factory=dict)  # normalisation rule -> times fired
    near_misses: list[Rejection] = field(default_factory=list)  # adapter-like layers no kind matched

    @property
    def rewritten(self) -> int:
        return sum(d.rewritten for r in self.kinds for d in r.decisions) + sum(r.rewritten for r in self.regions)


def run_pipeline(gm: fx.GraphModule, config: Config) -> PipelineResult:
    """Rewrite `gm` in place (the caller's copy): normalise it (fxlora/normalize.py, docs/recognises.md),
    rewrite every kind's sites, name the near misses, then do the same in each checkpointed region."""
    rules = normalize(gm, recompile=False)  # run_kinds recompiles when it rewrites
    kinds = run_kinds(gm, config)
    result = PipelineResult(kinds, rewrite_regions(gm, config), rules, find_near_misses(gm, [r.match for r in kinds]))
    if rules and result.rewritten and not any(d.rewritten for r in kinds for d in r.decisions):
        gm.recompile()  # only regions changed: the normalised graph runs, so its code must be current
    return result


def run_kinds(gm: fx.GraphModule, config: Config, kinds: Sequence[Kind] = KINDS,
              recomputed: bool = False) -> list[KindResult]:
    """Match, price, choose and rewrite every kind's sites in `gm` (in place).

    recomputed: `gm` is a checkpoint body, run again in backward (sites drawing random numbers stay)."""
    decide = size_decider(gm, guard=config.form_guards)
    timings: dict = {}  # device -> Timings, read from disk once per graph
    owner: dict[fx.Node, str] = {}
    results = []
    for kind in kinds:
        match = _claim(kind, kind.find(gm), owner)
        decisions = [_decide(kind, site, config, decide, recomputed, timings) for site in match.sites]
        result = KindResult(kind, match, decisions,
                            {s.index: sorted(rules) for s in match.sites if (rules := site_rules(s))})
        chosen = [(site, d.chosen) for site, d in zip(match.sites, result.decisions) if d.rewritten]
        units, notes = kind.group(chosen, config) if kind.group and chosen else ([[c] for c in chosen], {})
        failed, units = rewrite_each(gm, kind, units, owner, notes)
        for index, note in notes.items():
            result.decisions[index].reason += f"; {note}"
        for unit in (u for u in units if len(u) > 1):
            for site, _ in unit:
                result.decisions[site.index].unit = tuple(s.index for s, _ in unit)
        for index, why in failed.items():
            decision = result.decisions[index]
            decision.chosen, decision.reason = None, why
        results.append(result)
    if any(d.rewritten for r in results for d in r.decisions):
        gm.recompile()
    return results


def rewrite_each(gm: fx.GraphModule, kind: Kind, units: list[list], owner: dict,
                 notes: dict) -> tuple[dict[int, str], list[list]]:
    """Rewrite one kind's chosen sites unit by unit (a site, or a group the kind formed), in graph
    order; a site whose rewrite raises is left as traced and the others are rewritten without it;
    a group whose rewrite raises is split into its sites (`notes` says why). Returns
    ({site index: why it failed}, the units as rewritten).

    A site may read an earlier site's output (chained sites): its nodes are looked up again
    through the replacement the earlier rewrite recorded (graph/edit.py `remap_nodes`). After a
    failure the graph as it was before this kind is restored and the rewrite starts over."""
    failed: dict[int, str] = {}
    units = [list(u) for u in units]
    moved: dict[fx.Node, fx.Node] = {}  # node the sites were found with -> its copy in the restored graph
    while units:
        backup, copies = copy_graph(gm)
        try:
            for j, unit in enumerate(units):
                live = [(site, form) for site, form in unit if site.index not in failed]
                if not live:
                    continue
                try:
                    kind.rewrite_sites(gm, [(dataclasses.replace(site, nodes=remap_nodes(site.nodes, moved)), form)
                                            for site, form in live])
                    gm.graph.lint()
                except Exception as err:  # noqa: BLE001 - costs this site (or this group's sharing) only
                    why = f"{type(err).__name__}: {err}"
                    if len(live) > 1:
                        units[j:j + 1] = [[c] for c in live]
                        for site, _ in live:
                            notes[site.index] = f"rewritten alone: its group's op failed ({why})"
                    else:
                        failed[live[0][0].index] = f"rewrite failed ({why}); left as traced"
                        notes.pop(live[0][0].index, None)
                    raise
        except Exception:  # noqa: BLE001 - start over from the restored graph, without the failed site
            found_with = set(moved) | set(copies)
            moved = {n: copies[moved.get(n, n)] for n in found_with if moved.get(n, n) in copies}
            gm.graph = backup
            for node in [n for n in owner if n in moved]:
                owner[moved[node]] = owner.pop(node)
            continue
        break
    return failed, units


def count(results: Sequence[KindResult], ran: bool = True) -> None:
    """Add what will run to `counters["fxlora"]`: once per compiled graph, after it compiled
    (`ran=False`: it fell back to the untouched graph, so nothing of it counts as rewritten)."""
    stats = counters["fxlora"]
    for r in results:
        rewritten = sum(d.rewritten for d in r.decisions) if ran else 0
        stats[f"{r.kind.name}_sites"] += len(r.match.sites)
        stats[f"{r.kind.name}_rewritten"] += rewritten
        stats[f"{r.kind.name}_kept"] += len(r.match.sites) - rewritten
        stats[f"{r.kind.name}_rejected"] += len(r.match.rejections)


def rewrite_regions(gm: fx.GraphModule, config: Config) -> list[RegionReport]:
    """Run the kinds on a copy of every checkpoint body of `gm`; install the copies that changed."""
    regions, inner = [], region_config(config)
    for name, body, use_reentrant in list(checkpoint_bodies(gm)):
        region = RegionReport(name, use_reentrant)
        try:
            copy = copy_graph_module(body)
            normalize(copy, recompile=False)
            region.kinds = run_kinds(copy, inner, recomputed=True)
        except Exception as err:  # a region the passes cannot handle runs as traced
            region.kinds, region.fallback = [], f"passes failed ({type(err).__name__}: {err})"
        else:
            if region.rewritten:
                setattr(gm, name, copy)
        regions.append(region)
    return regions


def _claim(kind: Kind, match: Match, owner: dict[fx.Node, str]) -> Match:
    """Sites whose nodes an earlier kind's site claims become Rejections naming that site."""
    claimed = {n.name for n in owner}  # a look-alike inside an earlier kind's site is that site (DoRA's B(A(u)))
    sites, rejections = [], [r for r in match.rejections if r.node not in claimed]
    for site in match.sites:
        nodes = [n for n in kind.owned(site) if isinstance(n, fx.Node)]
        taken = next((n for n in nodes if n in owner), None)
        if taken is not None:
            rejections.append(Rejection(taken.name, module_path(taken), f"{kind.title}: {taken.name} is already part of {owner[taken]}"))
            continue
        sites.append(site)
    for site in sites:
        for n in kind.owned(site):
            if isinstance(n, fx.Node):
                owner[n] = f"{kind.title} site {site.index}"
    return Match(sites, rejections, match.linears)


TIME_FLOP_SLACK = 1.25  # a form over 1.25x the cheapest FLOPs is not worth timing (RunLoRA Table 1: the slow ones are ~1.5-2x)


def _timed(kind: Kind, site, shape, priced: list[PricedForm], decide: SizeDecider, timings: dict,
           saved_budget) -> list[PricedForm]:
    """The priced forms, each legal exact one within TIME_FLOP_SLACK x the cheapest FLOPs (and
    within `saved_budget` of the fewest saved bytes: the only ones "time" may choose) with its
    measured time (fxlora/cost/timing.py) at the size hints."""
    exact = [p for p in priced if p.form.legal and not p.form.lossy and not p.form.traced]
    if kind.time_case is None or not exact:
        return priced
    if saved_budget is not None:
        saved = [decide.at_hints(p.saved_bytes) for p in exact]
        exact = [p for p, b in zip(exact, saved) if b <= (1 + saved_budget) * min(saved)]
    flops = [decide.at_hints(p.flops) for p in exact]
    cases = {p.form.name: kind.time_case(site, shape, p.form, decide.at_hints)
             for p, f in zip(exact, flops) if f <= TIME_FLOP_SLACK * min(flops)}
    cases = {name: case for name, case in cases.items() if case is not None}
    device = value(site.nodes.x).device
    timer = timings.get(device) or timings.setdefault(device, Timings(device))
    try:
        figures = dict(zip(cases, timer.figures(list(cases.values()))))
    except Exception:  # noqa: BLE001 - a form that cannot run here is simply not timed
        return priced
    return [dataclasses.replace(p, seconds=figures[p.form.name][0], spread=figures[p.form.name][1])
            if p.form.name in figures else p for p in priced]


def _decide(kind: Kind, site, config: Config, decide: SizeDecider, recomputed: bool, timings: dict) -> Decision:
    device = value(site.nodes.x).device.type
    why_not = f"device {device} is not supported by fxlora's ops" if device not in ("cpu", "cuda") else ""
    if recomputed and kind.draws_random(site, config):
        why_not = why_not or DROPOUT_IN_REGION
    why_not = why_not or kind.why_not(site, config)
    if why_not:
        return Decision(kind.name, site.index, reason=why_not)
    shape = kind.shape(site, config)
    forms, note = kind.site_forms(site, shape, config)
    priced = price(forms, shape)
    if config.objective == "time":
        priced = _timed(kind, site, shape, priced, decide, timings, None if recomputed else config.saved_budget)
    hinted = len(decide.at_hint)
    chosen, why = choose_form(
        priced, objective=config.objective, flop_budget=config.flop_budget if kind.flop_budget else None,
        saved_budget=None if recomputed else config.saved_budget, decide=decide, forced=kind.forced(config),
    )
    if note and not chosen.form.lossy:
        why = f"{why}; {note}"
    if len(decide.at_hint) > hinted:
        why += f"; sizes compared at the traced {decide.hints()}, no guard (form_guards=False)"
    if chosen.form.traced:
        why += f" ({chosen.form.name}: the traced graph is kept as it is)"
    decision = Decision(kind.name, site.index, shape, priced, None, at(kind.peft_saved_bytes(shape), shape), why)
    if config.rewrite:
        decision.chosen = chosen
    else:
        decision.reason = f"rewrite=False (would choose {chosen.form.name}: {why})"
    return decision
