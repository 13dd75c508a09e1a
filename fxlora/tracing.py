"""What fxlora changes in how Dynamo traces, for fxlora's own compiles only (docs/checkpointing.md).

Checkpointed layers and Python side effects. Dynamo traces `torch.utils.checkpoint` as the
higher-order op `tag_activation_checkpoint` and, by default, graph-breaks on any Python side
effect inside it ("HOP: Unsafe side effect"): eager checkpointing replays such an effect when
it recomputes the forward in backward, and a compiled recompute cannot. With transformers
>= 5.25 every decoder layer has one: its attention forward is wrapped by the `kernels`
package (`use_kernelized_func`), which sets a module-level `CompileableContextVar`
(`_ACTIVE_KERNEL_FUNCS`) and resets it in `finally`. So under HF gradient checkpointing each
layer ran uncompiled, whatever the backend, and fxlora saw no adapter in it.

Dynamo's own switch `skip_fwd_side_effects_in_bwd_under_checkpoint` traces such regions and
applies their side effects once (in forward) instead of again in the recompute. fxlora turns it
on only while Dynamo traces for fxlora (the option `skip_checkpoint_side_effects`, default on):
other backends in the same process are untouched. Why the gradients stay exact: the recompute
runs the traced tensor graph, not the Python code (AOTAutograd's partitioner duplicates the
region's nodes, and replays its RNG state), so what backward computes never depends on the
skipped Python effect. What differs from eager checkpointing: a Python effect (a counter, a list
append, an attribute set) happens once per step, as it would without checkpointing, not twice.
The kernels context variable is set and restored around each call, so both give the same state.

A torch class's name. PEFT's DoRA layers read `type(module.weight).__module__.startswith(...)`
(peft.utils.integrations.dequantize_module_weight, to spot a torchao weight) on every forward;
Dynamo 2.13 cannot call `startswith` on a torch class's `__module__` and graph-breaks twice in
every DoRA layer, so no DoRA site reached a backend whole. For fxlora's compiles a torch class's
`__module__` / `__name__` / `__qualname__` read as constants (the class itself is guarded by
identity, so the strings cannot change under the guard).

A Parameter built inside forward. PEFT's `transpose(weight, fan_in_fan_out)` (GPT-2's Conv1D
under DoRA) returns `nn.Parameter(weight.T)`, which Dynamo cannot construct in a graph: it
graph-breaks in every such layer. For fxlora's compiles, a Parameter wrapped around a view of a
graph input that needs no gradient (a frozen weight's `.T`) is traced as that view; any other
`nn.Parameter(...)` in forward (a lazily created weight, say) still graph-breaks as before. What differs from eager: the
temporary Parameter would receive a gradient nobody can read (it is dropped when forward
returns); every gradient that reaches the model's parameters is the same.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Optional

from fxlora.config import Config

log = logging.getLogger("fxlora")

# Set on every backend function of fxlora's (the backend, explain's capture); Dynamo's wrappers
# copy a wrapped function's __dict__ (functools.wraps), so the mark survives them.
FXLORA_MARK = "__fxlora_config__"


def mark_backend(fn: Any, config: Any = True) -> Any:
    """Mark `fn` as an fxlora backend; `config` is its fxlora.Config when it has a fixed one."""
    setattr(fn, FXLORA_MARK, config)
    return fn


def fxlora_options(compiler_fn: Any) -> tuple[bool, Any]:
    """(is this Dynamo compiler fxlora's, the options it was given) by walking Dynamo's wrappers
    (WrapBackendDebug -> torch.compile's _TorchCompileWrapper -> the backend function; under DDP
    the DDPOptimizer's bound `compile_fn` -> its `backend_compile_fn`)."""
    options, seen = None, set()
    while compiler_fn is not None and id(compiler_fn) not in seen:
        seen.add(id(compiler_fn))
        kwargs = getattr(compiler_fn, "kwargs", None)
        if isinstance(kwargs, dict) and "options" in kwargs:
            options = kwargs["options"]
        mark = getattr(compiler_fn, FXLORA_MARK, None)
        if mark is not None:
            return True, (mark if mark is not True else options)
        owner = getattr(compiler_fn, "__self__", None)  # a bound method: DDPOptimizer.compile_fn
        compiler_fn = next((getattr(compiler_fn, a) for a in ("_torchdynamo_orig_backend", "compiler_fn", "__wrapped__", "func")
                            if getattr(compiler_fn, a, None) is not None), getattr(owner, "backend_compile_fn", None))
    return False, None


def skips_checkpoint_side_effects(compiler_fn: Any) -> bool:
    """Does this compile trace checkpointed regions with their side effects skipped in the recompute?"""
    ours, options = fxlora_options(compiler_fn)
    if not ours:
        return False
    try:
        return Config.from_options(options).skip_checkpoint_side_effects
    except ValueError:  # bad options: the backend reports them when Dynamo calls it
        return False


def wrap_once(owner: type, attr: str, make: Callable[[Callable], Callable]) -> bool:
    """Replace the method `owner.attr` by `make(original)`, once: the wrapper carries FXLORA_MARK,
    so installing again is a no-op; a classmethod stays one. False when this torch has no such
    method (the caller's feature then stays off)."""
    descriptor = inspect.getattr_static(owner, attr, None)
    if descriptor is None:
        return False
    classmethod_ = isinstance(descriptor, classmethod)
    original = descriptor.__func__ if classmethod_ else getattr(owner, attr)
    if getattr(original, FXLORA_MARK, False):
        return True
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, FXLORA_MARK, True)
    setattr(owner, attr, classmethod(wrapper) if classmethod_ else wrapper)
    return True


def install_checkpoint_side_effects() -> bool:
    """Let checkpointed regions traced for fxlora keep their side effects (idempotent).
    False when this torch has no such hook (the report then names the graph break instead)."""
    try:
        from torch._dynamo.variables.higher_order_ops import CheckpointHigherOrderVariable
    except ImportError:
        return False
    if not hasattr(CheckpointHigherOrderVariable, "allow_side_effects"):
        return False

    def make(original):
        def _call_function(self, tx, args, kwargs):
            if not self.allow_side_effects and skips_checkpoint_side_effects(_compiler_fn(tx)):
                self.allow_side_effects = True
            return original(self, tx, args, kwargs)
        return _call_function

    return wrap_once(CheckpointHigherOrderVariable, "_call_function", make)


CLASS_NAMES = ("__module__", "__name__", "__qualname__")


def install_class_name_constants() -> bool:
    """Let fxlora's compiles read a torch class's module and name as constants (idempotent).
    False when this torch has no such hook (PEFT's DoRA layers then graph-break; the report names it)."""
    try:
        from torch._dynamo.variables import ConstantVariable
        from torch._dynamo.variables.builtin import GetAttrBuiltinVariable
        from torch._dynamo.variables.torch import BaseTorchVariable
    except ImportError:
        return False

    def make(original):
        def _call_getattr(self, tx, args, kwargs):
            if len(args) == 2 and isinstance(args[0], BaseTorchVariable) and isinstance(args[0].value, type):
                name = args[1].as_python_constant() if args[1].is_python_constant() else None
                if name in CLASS_NAMES and fxlora_options(_compiler_fn(tx))[0]:
                    return ConstantVariable.create(getattr(args[0].value, name))
            return original(self, tx, args, kwargs)
        return _call_getattr

    return wrap_once(GetAttrBuiltinVariable, "_call_getattr", make)


def install_forward_parameters() -> bool:
    """Let fxlora's compiles trace `nn.Parameter(frozen weight's view)` inside forward as the view (idempotent)."""
    try:
        from torch._dynamo.variables.torch import TorchInGraphFunctionVariable
    except ImportError:
        return False

    def make(original):
        def call_nn_parameter(cls, tx, data=None, requires_grad=True):
            if data is not None and data.is_tensor() and not data.source and fxlora_options(_compiler_fn(tx))[0]:
                if _frozen_input_view(data.as_proxy().node):
                    return data
            return original(cls, tx, data, requires_grad)
        return call_nn_parameter

    return wrap_once(TorchInGraphFunctionVariable, "call_nn_parameter", make)


_VIEWS = ("t", "T", "mT", "transpose", "permute", "view", "reshape", "to", "float", "contiguous", "detach")


def _frozen_input_view(node: Any) -> bool:
    """`node` is a chain of views and casts (`.T`, `.t()`, `.to(dtype)`, ...) of a graph input that needs no grad."""
    for _ in range(8):
        fake = node.meta.get("example_value")
        if fake is None or getattr(fake, "requires_grad", True):
            return False
        if node.op in ("placeholder", "get_attr"):
            return True
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
            name = node.args[1]
        if name not in _VIEWS or not node.args or not hasattr(node.args[0], "meta"):
            return False
        node = node.args[0]
    return False


def _compiler_fn(tx: Any) -> Optional[Any]:
    output = getattr(tx, "output", None)
    return getattr(output, "compiler_fn", None)


def traced_frame(tx: Any = None) -> tuple[Optional[Any], str]:
    """(the nn.Module whose method Dynamo is tracing, "file:line name" of that method's code) for
    `tx` or the current translator. The module is the frame's `self`, else its first module
    argument (a hook's `module`): module paths in a graph's nn_module_stack are relative to it.
    (None, "") outside Dynamo; (None, code) in a plain function."""
    import torch

    if tx is None:
        try:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            tx = InstructionTranslator.current_tx()
        except Exception:  # noqa: BLE001 - an older torch, or not tracing
            return None, ""
    f_locals = getattr(tx, "f_locals", None) or {}
    candidates = [f_locals.get("self"), *f_locals.values()]
    module = next((m for m in candidates if isinstance(m, torch.nn.Module)), None)
    code = getattr(tx, "f_code", None)
    return module, f"{code.co_filename}:{code.co_firstlineno} {code.co_name}" if code is not None else ""


def frame_module(tx: Any = None) -> Optional[Any]:
    """The module of `traced_frame`."""
    return traced_frame(tx)[0]
