"""fxlora under torch.distributed: DDP's graph split and FSDP's sharded parameters (docs/distributed.md).

DDP. Dynamo's DDPOptimizer cuts each captured graph at gradient-bucket boundaries and hands
the backend the pieces one at a time, so a LoRA site whose nodes straddle a boundary would
reach fxlora as two halves, neither of them a site. fxlora therefore asks for the whole graph
first: it rewrites it (each rewritten site is one op node, which no split can cut) and then
lets DDPOptimizer split the rewritten graph with DDP's own buckets, so the comm/compute
overlap DDPOptimizer exists for is kept. Backends other than fxlora see stock DDPOptimizer.

FSDP2. `fully_shard` swaps each module's sharded DTensor parameters for plain unsharded
tensors around its forward and backward. Dynamo breaks the graph at each sharded module and
runs those hooks eagerly, so each layer is its own graph in which W is a plain frozen
parameter, and the passes work as on one device. What FSDP needs of a rewrite is that no copy of the unsharded W outlives the
op: fxlora's ops save W itself (whose storage FSDP frees after forward and refills before
backward) and rebuild a merged W + sBA in backward instead of saving it (cost.transient_bytes).

What fxlora cannot do yet is said at compile time and leaves the graph untouched:
`unsupported_parallelism` names it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxlora.graph.read import module_path
from fxlora.ops._common import is_fxlora_op

# A backend callable that wants the whole graph under DDP carries this attribute and takes a
# `split` keyword: a function (rewritten gm, example_inputs, compile_piece) -> compiled callable.
SPLITS_AFTER_REWRITE = "_fxlora_splits_after_rewrite"


def splits_after_rewrite(fn: Callable) -> Callable:
    """Mark a backend function (fxlora's, explain's) as one DDPOptimizer should give the whole graph."""
    setattr(fn, SPLITS_AFTER_REWRITE, True)
    return fn


def install_ddp_split_after_rewrite() -> bool:
    """Make Dynamo's DDPOptimizer give fxlora the whole graph and split fxlora's rewritten graph.

    Dynamo builds a DDPOptimizer for every graph captured inside a DDP forward (optimize_ddp
    "ddp_optimizer", the default) by looking the class up in its module at that moment; this
    puts a subclass there that differs only for fxlora backends. Returns False (and fxlora
    reports each piece it gets, see `ddp_piece_note`) where this torch has no such class.
    """
    try:
        from torch._dynamo.backends import distributed as dynamo_ddp
    except ImportError:  # torch built without distributed
        return False
    stock = getattr(dynamo_ddp, "DDPOptimizer", None)
    if stock is None or not callable(getattr(stock, "compile_fn", None)):
        return False
    if getattr(stock, SPLITS_AFTER_REWRITE, False):
        return True

    class DDPOptimizerSplitAfterRewrite(stock):
        """DDPOptimizer that lets an fxlora backend rewrite the whole graph before the bucket split."""

        stock_class = stock  # what Dynamo had: for tests, and for anyone undoing this

        def compile_fn(self, gm: fx.GraphModule, example_inputs: list, **kwargs: Any):
            backend = _fxlora_backend_of(self.backend_compile_fn)
            if backend is None:
                return super().compile_fn(gm, example_inputs, **kwargs)

            def split(rewritten: fx.GraphModule, inputs: Sequence[Any], compile_piece: Callable):
                pieces = stock(self.bucket_bytes_cap, compile_piece, first_bucket_cap=self.first_bucket_cap)
                return pieces.compile_fn(rewritten, list(inputs), **kwargs)

            return backend(gm, example_inputs, split=split)

    setattr(DDPOptimizerSplitAfterRewrite, SPLITS_AFTER_REWRITE, True)
    dynamo_ddp.DDPOptimizer = DDPOptimizerSplitAfterRewrite
    return True


def _fxlora_backend_of(fn: Callable) -> Optional[Callable]:
    """fxlora's backend with its torch.compile options bound, if `fn` wraps one; else None.

    torch.compile's _TorchCompileWrapper holds the backend as `compiler_fn` and its mode and
    options as `kwargs`; Dynamo's WrapBackendDebug copies those attributes (functools.wraps),
    and other wrappers point inward with `_torchdynamo_orig_backend`. A functools.partial of
    fxlora's backend is unwrapped too. (Dynamo's `repro_after` minifier wrapper is bypassed.)
    """
    kwargs: dict = {}
    for _ in range(16):  # a wrapper chain, never a cycle; bounded all the same
        if getattr(fn, SPLITS_AFTER_REWRITE, False):
            return functools.partial(fn, **kwargs)
        if isinstance(fn, functools.partial):
            kwargs = {**fn.keywords, **kwargs}
            fn = fn.func
        elif hasattr(fn, "compiler_fn") and hasattr(fn, "kwargs"):
            kwargs = {**fn.kwargs, **kwargs}
            fn = fn.compiler_fn
        elif hasattr(fn, "_torchdynamo_orig_backend"):
            fn = fn._torchdynamo_orig_backend
        else:
            return None
    return None


def fxlora_op_sites(graph: fx.Graph) -> list[str]:
    """The module path of each fxlora op in a graph (op name added unless LoRA): explain's list per DDP piece."""
    calls = []
    for node in graph.nodes:
        if is_fxlora_op(node):
            # the rewrite gives the op's result (a getitem) the site's metadata; a group op has one per site
            if node.target._opname == "lora_group_linear":
                calls += [module_path(user) or user.name for user in sorted(node.users, key=lambda u: u.args[1])]
                continue
            where = next(filter(None, (module_path(user) for user in node.users)), None) or node.name
            calls.append(where if node.target._opname == "lora_linear" else f"{where} ({node.target._opname})")
    return calls


def ddp_piece_note() -> Optional[str]:
    """Why a graph may hold only part of a site: DDPOptimizer handed fxlora one bucket's piece."""
    if not _inside_ddp_forward() or torch._dynamo.utils.get_optimize_ddp_mode() != "ddp_optimizer":
        return None
    from torch._dynamo.backends import distributed as dynamo_ddp

    why = (
        "fxlora's backend was not recognised behind its wrappers"
        if getattr(dynamo_ddp.DDPOptimizer, SPLITS_AFTER_REWRITE, False)
        else "this torch has no DDPOptimizer class fxlora can hook"
    )
    return (
        f"compiled as one DDP bucket's piece ({why}): a site cut by a bucket boundary is not seen; "
        "pass backend=\"fxlora\" to torch.compile, or set torch._dynamo.config.optimize_ddp = False"
    )


def _inside_ddp_forward() -> bool:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return False
    get = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return bool(get and get() is not None)


def unsupported_parallelism(gm: fx.GraphModule) -> Optional[str]:
    """Why fxlora must leave this graph untouched, or None.

    DTensor inputs mean tensor parallelism, or sharded parameters traced into the graph:
    the weights are shards and the collectives are graph ops, and fxlora's ops are not
    DTensor-aware yet.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    for node in gm.graph.find_nodes(op="placeholder"):
        if isinstance(node.meta.get("example_value"), DTensor):
            return (
                "DTensor inputs (tensor parallelism, or sharded parameters traced into the graph): "
                "fxlora's ops are not DTensor-aware yet; FSDP2's fully_shard works (docs/distributed.md)"
            )
    return None
