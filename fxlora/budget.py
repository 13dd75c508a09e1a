"""A memory budget users name: the least recomputation whose saved-for-backward bytes fit it.

Inductor's min-cut partitioner already solves "least recompute within a memory fraction"
(`torch._functorch.config.activation_memory_budget`: a 0-1 knapsack over the values it would
otherwise refuse to recompute). fxlora drives it through the hooks it offers
(`custom_partitioner_fn`, `CustomKnapsackSolver`, `CustomRuntimeEstimator`) and corrects the
three things it gets wrong on an adapted graph:

- *Prices.* The knapsack prices a value by the FLOPs FlopCounterMode counts, which sees a
  custom op as zero FLOPs; fxlora's ops hold each layer's base GEMM. `node_flops` counts an
  fxlora op by running its body (fake tensors) under the counter.
- *Candidates.* In its aggressive pass the partitioner treats any op neither random nor in its
  compute-intensive list as free to recompute: every fxlora op, base GEMM included, and one
  whose dropout mask comes from the RNG state would redraw it. `is_non_builtin_to_include` makes
  the ops knapsack items with a price; those that are not pure functions of their inputs (and
  random ATen ops such as the seeds' `randint`) are kept (`_protect`).
- *The cliff.* Before the knapsack, the partitioner returns its "more aggressive" or
  "aggressive" min cut whenever that already fits the fraction, whatever it recomputes: for
  fxlora, any budget below 1 recomputed every adapted linear (+30-40% step). fxlora asks for
  the knapsack path (a budget of `_KNAPSACK_PATH`) and solves the knapsack itself for the
  bytes asked, bisecting its capacity until the partition, measured, fits.

Each graph is partitioned a few times (about 1 s each at 4 layers); the report says what the
budget reached and what backward recomputes for it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch._functorch import config as functorch_config
from torch._functorch._activation_checkpointing.knapsack import dp_knapsack
from torch._functorch.partitioners import _remove_symbols_without_guarding, min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomKnapsackSolver, CustomPartitionerFn, CustomRuntimeEstimator
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fxlora.config import MemoryBudget
from fxlora.graph.edit import copy_graph_module
from fxlora.ops._common import is_fxlora_op
from fxlora.ops.inline import op_body, why_not_inline

log = logging.getLogger("fxlora")

_KNAPSACK_PATH = 1e-9  # a fraction no early-return min cut fits: the partitioner goes to the knapsack
_UNCOUNTED = 1e13  # an fxlora op whose FLOPs could not be counted: priced as a large GEMM, so kept
_BISECTIONS = 6  # capacity halvings after the two ends: ~1.5% of the range
# What decides a budgeted partition: this file, and the ops' bodies and purity checks (fxlora/ops).
_SOURCE_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in [Path(__file__), *sorted(
    (Path(__file__).parent / "ops").glob("*.py"))])).hexdigest()


@dataclasses.dataclass
class BudgetResult:
    """How one graph's memory budget was met: bytes against the target, and what backward recomputes for it."""

    requested: str  # the option as written
    target_bytes: int
    unbudgeted_bytes: int  # what the graph keeps without a budget
    reached_bytes: int
    met: bool
    recomputed: dict[str, int] = dataclasses.field(default_factory=dict)  # op -> count recomputed beyond the unbudgeted plan
    recompute_flops: float = 0.0  # FLOPs of those recomputations (fxlora's ops counted by their bodies)
    partitions: int = 0  # min cuts tried
    note: str = ""
    applied: bool = True  # False: the budgeted partition failed, the graph was partitioned as without a budget

    def format(self) -> str:
        if not self.applied:
            return f"memory budget {self.requested}: NOT applied: {self.note}"
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        head = (f"memory budget {self.requested}: saved {mib(self.reached_bytes)} of {mib(self.target_bytes)} allowed "
                f"(unbudgeted {mib(self.unbudgeted_bytes)})")
        if not self.met:
            head += f"; NOT met: {self.note}"
        elif self.note:
            head += f"; {self.note}"
        if self.recomputed:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.recomputed.items(), key=lambda kv: -kv[1]))
            head += f"\n    recomputed in backward for it: {ops} (~{self.recompute_flops / 1e9:.2f} GFLOP)"
        return head


# ----------------------------------------------------------------------------- prices


# FlopCounterMode counts the CUDA attention kernels; on CPU attention would be priced 0 and recomputed first.
_MORE_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                  lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v)}


def node_flops(node: fx.Node) -> float:
    """FLOPs of one node at its traced sizes (symbols at their hints); an fxlora op by its body."""
    target: Callable = op_body(node.target) if is_fxlora_op(node) else node.target
    args, kwargs = tree_map(_concrete, (node.args, node.kwargs))
    fake_mode = torch._guards.detect_fake_mode([a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)])
    if fake_mode is None:  # nothing traced to run it on (a factory such as arange): never run it for real
        return 1.0
    try:
        with fake_mode, FlopCounterMode(display=False, custom_mapping=_MORE_FORMULAS) as counter:
            target(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - a price it cannot count: keep the value (priced high) rather than fail
        log.debug("fxlora: could not count FLOPs of %s (%s: %s)", node, type(err).__name__, err)
        return _UNCOUNTED if is_fxlora_op(node) else 1.0
    return float(max(counter.get_total_flops(), 1))


def _concrete(a: Any) -> Any:
    """A node's value with its symbolic sizes at their hints (as the partitioner's own estimator does)."""
    if not isinstance(a, fx.Node):
        return a
    v = a.meta.get("val")
    if isinstance(v, torch.Tensor):
        return _remove_symbols_without_guarding(v, fallback=4096)
    if isinstance(v, torch.SymInt):
        return optimization_hint(v, fallback=4096)
    return v


class _Flops(CustomRuntimeEstimator):
    """The knapsack's price of recomputing a node: `node_flops`, once per node."""

    def __init__(self):
        self.seen: dict[str, float] = {}  # by name: each try partitions a copy of the same joint graph

    def __call__(self, node: fx.Node) -> float:
        if node.name not in self.seen:
            self.seen[node.name] = node_flops(node)
        return self.seen[node.name]

    def uuid(self) -> Any:
        return _SOURCE_HASH


class _Knapsack(CustomKnapsackSolver):
    """torch's DP knapsack at fxlora's capacity (the partitioner was asked for ~0 to reach it)."""

    def __init__(self, capacity: float, prices: _Flops):
        self.capacity, self.prices = capacity, prices
        self.total = 0.0  # the candidates' memory, in the partitioner's units: the capacity that keeps them all
        self.called = False  # the partitioner reached its knapsack (it may answer before it)

    def __call__(self, memory, joint_graph, max_memory, node_info, nodes) -> tuple[list[int], list[int]]:
        self.called, self.total = True, float(sum(memory))
        if self.capacity >= self.total:  # room for every candidate
            return list(range(len(nodes))), []
        # In units of the candidates' total: torch's DP table has capacity x 10^4 columns, and the
        # partitioner's units (fractions of the unbudgeted step over its inputs) can sum far above 1.
        shares = [m / self.total for m in memory]
        _, saved, recomputed = dp_knapsack(shares, [self.prices(n) for n in nodes], self.capacity / self.total)
        return saved, recomputed

    def uuid(self) -> Any:
        return (_SOURCE_HASH, self.capacity)


# ----------------------------------------------------------------------------- the partitioner


@dataclasses.dataclass
class _Plan:
    fw: fx.GraphModule
    bw: fx.GraphModule
    saved: int  # bytes backward keeps, inputs not counted
    capacity_range: float = 0.0  # on the knapsack path: the capacity that keeps every candidate
    knapsack: bool = False  # the partitioner reached the knapsack (else it answered before it)


class BudgetPartitioner(CustomPartitionerFn):
    """Inductor's partitioner (`inductor_config.custom_partitioner_fn`; AOT's `partition_fn` under
    aot_eager) that meets `budget`: the unbudgeted min cut if it fits, else the knapsack
    capacity with the least recomputation that fits. Appends a BudgetResult per graph to `results`."""

    def __init__(self, budget: MemoryBudget, results: list):
        self.budget, self.results = budget, results

    def uuid(self) -> Any:  # the budget decides the compiled graph: part of Inductor's cache key
        return (_SOURCE_HASH, self.budget.bytes, self.budget.fraction)

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        try:
            fw, bw, result = self.partition(gm, joint_inputs, **kwargs)
        except Exception as err:  # never why a training run dies: the partitioner as without a budget
            log.warning("fxlora: memory budget not applied (%s: %s)", type(err).__name__, err)
            self.results.append(BudgetResult(self.budget.text, 0, 0, 0, met=False, applied=False,
                                             note=f"{type(err).__name__}: {err}; partitioned as without a budget"))
            return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        self.results.append(result)
        return fw, bw

    def partition(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        prices = _Flops()
        outputs = kwargs["num_fwd_outputs"]
        tries: list[_Plan] = []  # every min cut made, for the report

        def plan(capacity: Optional[float]) -> _Plan:
            patches, solver = {}, _Knapsack(capacity or 0.0, prices)
            if capacity is not None:
                patches.update(activation_memory_budget=_KNAPSACK_PATH, is_non_builtin_to_include=True,
                               activation_memory_budget_runtime_estimator=prices, activation_memory_budget_solver=solver)
            joint = copy_graph_module(gm)  # each try starts from the joint graph
            if capacity is not None:
                _protect(joint.graph)
            with functorch_config.patch(patches):
                fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
            tries.append(_Plan(fw, bw, saved_bytes(fw, outputs), solver.total, solver.called))
            return tries[-1]

        free = plan(None)
        target = self.budget.target(free.saved)
        chosen, met, note = _choose(plan, free, target)
        recomputed, flops = recomputed_ops(chosen, free)
        result = BudgetResult(self.budget.text, target, free.saved, chosen.saved, met, recomputed, flops, len(tries), note)
        return chosen.fw, chosen.bw, result


def _choose(plan: Callable[[float], _Plan], free: _Plan, target: int) -> tuple[_Plan, bool, str]:
    """The partition with the least recomputation within `target` bytes: the unbudgeted one if it fits,
    else the largest knapsack capacity that fits (bisected); with whether it was met, and a note."""
    if free.saved <= target:
        return free, True, "met without recomputing more"
    least = plan(0.0)
    if not least.knapsack:  # e.g. activations smaller than the graph's inputs: its own early answer
        met = least.saved <= target
        return (least if met else free), met, ("the partitioner answered before its knapsack (this graph keeps less "
                                               "than its inputs weigh), so no capacity was searched"
                                               + ("" if met else "; kept the unbudgeted partition"))
    if least.saved > target:
        return least, False, (f"the least the partitioner can keep is {least.saved / 2**20:.1f} MiB (it keeps random "
                              "draws, ops whose dropout masks come from the RNG state, collectives, and what backward "
                              "reads of the inputs)")
    most = plan(math.inf)
    if most.saved <= target:  # every knapsack item kept: only what the min cut recomputes for free
        below = most.saved < 0.9 * target
        return most, True, (f"lands below the budget: the least recomputation below the unbudgeted "
                            f"{free.saved / 2**20:.1f} MiB already keeps this little" if below else "")
    chosen, lo, hi = least, 0.0, least.capacity_range
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        p = plan(mid)
        if p.saved <= target:
            chosen, lo = p, mid
        else:
            hi = mid
    below = chosen.saved < 0.9 * target
    return chosen, True, (f"lands below the budget: the knapsack's next step up keeps more than "
                          f"{target / 2**20:.1f} MiB" if below else "")


def _protect(graph: fx.Graph) -> None:
    """Mark what the knapsack must keep (`MUST_SAVE`, the tag selective checkpointing uses): values
    whose recomputation would differ (an op drawing random numbers: a seed, an fxlora op whose mask
    comes from the RNG state, i.e. whose body is not pure) and CPU attention, missing from the
    partitioner's compute-intensive list (its CUDA kernels are there) and so free to recompute."""
    for n in graph.nodes:
        if n.op != "call_function" or "recompute" in n.meta:
            continue
        random = isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags
        impure = is_fxlora_op(n) and why_not_inline(n) is not None
        if random or impure or n.target is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            n.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def saved_bytes(fw: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Bytes the forward graph hands backward, each storage once, not counting the graph's inputs
    (parameters, the batch) or views of them: what `saved_tensors_hooks` would see beyond parameters."""
    nodes = list(fw.graph.nodes)
    inputs = {_storage(n) for n in nodes if n.op == "placeholder"} - {None}
    saved: dict[Any, int] = {}
    for n in nodes[-1].args[0][num_fwd_outputs:]:
        key = _storage(n)
        if key is None or key in inputs:
            continue
        saved[key] = int(optimization_hint(n.meta["val"].untyped_storage().nbytes(), fallback=0))  # a view: its whole buffer
    return sum(saved.values())


def _storage(n: Any) -> Optional[StorageWeakRef]:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return StorageWeakRef(v.untyped_storage()) if isinstance(v, torch.Tensor) else None


def recomputed_ops(plan: _Plan, unbudgeted: _Plan) -> tuple[dict[str, int], float]:
    """Ops backward runs again beyond what the unbudgeted plan recomputes, by op, and their FLOPs."""
    def remat(p: _Plan) -> list[fx.Node]:
        forward = {n.name for n in p.fw.graph.nodes if n.op == "call_function"}
        return [n for n in p.bw.graph.nodes if n.op == "call_function" and n.name in forward]

    before = {n.name for n in remat(unbudgeted)}
    extra = [n for n in remat(plan) if n.name not in before and "val" in n.meta]
    counts = collections.Counter(str(getattr(n.target, "overloadpacket", n.target)).replace("aten.", "") for n in extra)
    return dict(counts), sum(node_flops(n) for n in extra)
