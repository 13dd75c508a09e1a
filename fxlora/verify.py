"""`options={"verify": True}`: prove the rewrite on the user's own first batch.

On the first call of a rewritten graph, fxlora runs the untouched graph and the rewritten
one (both through AOTAutograd without codegen, from the same RNG state, on copies of the
inputs) and compares every output and the gradient of every input that requires grad
(parameters are graph inputs under Dynamo). A difference raises `VerificationError`
naming the graph, the input and the rewritten sites; no difference logs one line and the
compiled graph runs as usual. Inductor itself is trusted: this checks what fxlora changed.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("fxlora")

# (rtol, atol relative to the reference's largest magnitude) per dtype
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (1e-2, 1e-3),
}


class VerificationError(AssertionError):
    """The rewritten graph disagreed with the untouched one: a bug in fxlora; please report it."""


def verify_first_call(
    original: fx.GraphModule, rewritten: fx.GraphModule, compiled: Callable, what: str
) -> Callable:
    """Wrap `compiled` so its first call is checked against `original`; `what` names the sites."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")
    names = [_input_name(n) for n in original.graph.find_nodes(op="placeholder")]  # before AOT strips the metadata
    state = {"checked": False}

    def run(*args):
        if not state["checked"]:
            state["checked"] = True
            compare(aot_eager(original, list(args)), aot_eager(rewritten, list(args)), args, names, what)
        return compiled(*args)

    return run


def compare(reference: Callable, candidate: Callable, args: Sequence[Any], names: Sequence[str], what: str) -> None:
    ref_out, ref_grads = _step(reference, args)
    got_out, got_grads = _step(candidate, args)
    for i, (want, got) in enumerate(zip(ref_out, got_out)):
        _check(f"output {i}", want, got, what)
    for i, want in ref_grads.items():
        _check(f"gradient of {names[i] if i < len(names) else f'input {i}'}", want, got_grads.get(i), what)
    log.info("fxlora: verify: %s equal to the untouched graph (outputs and %d input gradients)", what, len(ref_grads))


def _step(fn: Callable, args: Sequence[Any]) -> tuple[list, dict[int, torch.Tensor]]:
    """One forward (fixed RNG) on copies of the inputs, then backward of a fixed random projection."""
    copies = [_leaf_copy(a) for a in args]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        outs = fn(*copies)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    wrt = {i: c for i, c in enumerate(copies) if isinstance(c, torch.Tensor) and c.requires_grad}
    diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
    grads: dict[int, torch.Tensor] = {}
    if wrt and diff:
        gen = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o) for o in diff]
        found = torch.autograd.grad(diff, list(wrt.values()), cotangents, allow_unused=True)
        grads = {i: g for i, g in zip(wrt, found) if g is not None}
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], grads


def _input_name(placeholder: fx.Node) -> str:
    """The user-facing name of a graph input, read off Dynamo's source chain:
    `base_model.model...q_proj.lora_A.default.weight` rather than the mangled placeholder."""
    parts, source = [], getattr(placeholder.meta.get("grapharg"), "source", None)
    while source is not None:
        key = getattr(source, "index", None) or getattr(source, "member", None) or getattr(source, "local_name", None)
        if isinstance(key, (str, int)) and key not in ("__dict__", "_modules", "_parameters", "_buffers", "self"):
            parts.append(str(key))
        source = getattr(source, "base", None)
    return ".".join(reversed(parts)) or placeholder.name


def _leaf_copy(a: Any) -> Any:
    if not isinstance(a, torch.Tensor):
        return a
    return a.detach().clone().requires_grad_(a.requires_grad)


def _check(label: str, want: Any, got: Any, what: str) -> None:
    if not isinstance(want, torch.Tensor):
        if want != got:
            raise VerificationError(f"fxlora verify: {label} differs ({got!r} != {want!r}) after rewriting {what}")
        return
    if got is None:
        raise VerificationError(f"fxlora verify: {label} is missing after rewriting {what}")
    rtol, atol = TOLERANCES.get(want.dtype, (0.0, 0.0))
    scale = want.detach().abs().max().item() if want.numel() and want.is_floating_point() else 1.0
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(scale, 1e-30) if scale else atol)
    except AssertionError as err:
        raise VerificationError(
            f"fxlora verify: {label} differs after rewriting {what}.\n{err}\n"
            "This is a bug in fxlora: run with options={'rewrite': False} to train on, and please "
            "report it with the graph dump (options={'dump_graphs': DIR})."
        ) from None
