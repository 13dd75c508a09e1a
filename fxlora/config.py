"""fxlora's options: one frozen, validated object.

Users pass them as `torch.compile(model, backend="fxlora", options={...})` or build
`fxlora.Config(...)` directly; either way a bad key or value fails at compile time
with a message that names it and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
OBJECTIVES = ("time", "saved_bytes", "flops")
SCALING_FORMS = (None, "act", "recompute", "weight")
OPTIONS_ENV = "FXLORA_OPTIONS"
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Config:
    """Options of the fxlora backend.

    inner: the compiler the graph goes to after fxlora's passes. "inductor" (default)
        is what users want; "aot_eager" runs AOTAutograd without codegen (fast to
        compile, used by most tests); "eager" runs the rewritten graph as Python.
    inductor: Inductor config patches (keys of `torch._inductor.config`), applied
        on top of what `mode=` implies, as `torch.compile(options=...)` would. Such keys
        may also be given at the top level of `options` (as for backend="inductor").
    dump_graphs: a directory; each compiled graph is written there before and after
        fxlora's passes (`<compile id>.before.txt` / `.after.txt`).
    rewrite: replace LoRA sites by the chosen exact form (False: match and report only).
    objective: "time" (default) picks the fastest form, measured once per shape on the
        device (cached on disk, fxlora/cost/timing.py), among forms within `saved_budget`
        of the fewest saved-for-backward bytes; kinds without a timing use "saved_bytes".
        "saved_bytes" picks the fewest saved bytes among forms within `flop_budget` of the
        cheapest FLOPs; "flops" picks the fewest FLOPs. None of them changes a result: every
        candidate is exact (lossy forms only with `compress`).
    flop_budget: the FLOP slack "saved_bytes" may spend, as a fraction (0.1 = 10%).
    saved_budget: the saved-bytes slack "time" may spend for speed, as a fraction (0.1 = 10%).
    force_form: "f<forward>/b<backward>" (e.g. "f1/b5"; "+bits" keeps a dropout mask packed
        instead of replaying it; in checkpointed regions "+traced-mask" reads the traced drop(x),
        "+seeded" draws from a graph-drawn seed) for every site where it is legal;
        for tests and experiments, the report says where it could not apply.
    rematerialize: on graphs fxlora rewrote, let Inductor's min-cut partitioner recompute
        in backward the values backward must materialize (each adapter's input x: a norm
        output, an activation) when that saves bytes, instead of always saving them
        (`torch._functorch.config.ban_recompute_materialized_backward=False`). Exact; costs
        a pointwise kernel per recomputed x in backward. Inductor only.
    verify: on the first call of each rewritten graph, also run the untouched graph and
        compare outputs and input gradients; a difference raises fxlora.VerificationError
        naming the graph and input (fxlora/verify.py). The first thing to try when in doubt.
    scaling_form: "act", "recompute" or "weight": the form of every IA3/VeRA site where it
        exists and is legal (docs/ia3-vera.md); for tests and experiments.
    form_guards: False (default): a choice between forms that depends on a dynamic size is
        made at the size Dynamo traced with and installs no guard, so fxlora compiles exactly
        the graphs Inductor would (no recompile storms under variable-length batches). True:
        each such choice guards, so a shape crossing a cost threshold recompiles into the other
        form (more graphs; Dynamo's recompile_limit still applies).
    compress: opt-in LOSSY compression of what backward keeps (docs/lossy.md), e.g.
        {"method": "velora", "sub_token": "D/32", "targets": ["v_proj", "down_proj"]}
        (the defaults, VeLoRA's). Needs `fxlora.velora.prepare(model, first_batch, compress)`
        first, which creates each targeted site's vector v. None (default): every form exact.
    skip_checkpoint_side_effects: True (default): Dynamo traces activation-checkpointed layers
        that have Python side effects (transformers >= 5.25: every decoder layer), applying the
        effects once in forward, not again in the recompute (fxlora/tracing.py,
        docs/checkpointing.md; gradients are exact). False: Dynamo's default, a graph break
        that runs each such layer uncompiled (the report names it).
    group_shared_input: True (default): LoRA sites that read the same x (q/k/v, gate/up) and
        have no dropout run as one op (`fxlora::lora_group_linear`): their rank-r GEMMs over x and
        their dX GEMMs are shared, each site keeps the form chosen for it. Exact. False: one op
        per site (for comparison; docs/lora-rewrite.md).
    inline_ops: True (default): Inductor compiles what runs inside fxlora's ops. After the
        partitioner has split forward from backward (the ops' boundaries decided what is saved),
        each op whose body is a pure function of its inputs is replaced by its traced body, which
        Inductor lowers and fuses with its neighbours (fxlora/ops/inline.py); the report counts
        them per graph and names any op left opaque and why. False: every op runs its eager
        body, as under "aot_eager" (for comparison). Inductor only; exact either way.
    memory_budget: the most bytes backward may keep from forward, as bytes (an int, or "512MiB",
        "2GiB") or as a fraction of what the step keeps without a budget (0.5, "50%"); None
        (default): no budget. fxlora then asks Inductor's min-cut partitioner for the least
        recomputation that fits: a knapsack over what it may recompute, priced by FLOPs with
        fxlora's ops counted by their bodies (fxlora/budget.py, docs/memory-budget.md). Bytes
        exclude the graph's inputs (parameters, the batch) and apply to each compiled graph.
        Exact: recomputing changes no result. "inductor" or "aot_eager" (min-cut) only.
    in_checkpoint: set by fxlora itself on the body of an activation-checkpointed region
        (fxlora/checkpoint.py), whose forward runs again in backward; not a user option.
    """

    inner: str = "inductor"
    inductor: Mapping[str, Any] = field(default_factory=dict)
    dump_graphs: Optional[str] = None
    rewrite: bool = True
    objective: str = "time"
    flop_budget: float = 0.1
    saved_budget: float = 0.1
    force_form: Optional[str] = None
    rematerialize: bool = True
    verify: bool = False
    scaling_form: Optional[str] = None
    compress: Optional[Mapping[str, Any]] = None
    form_guards: bool = False
    skip_checkpoint_side_effects: bool = True
    group_shared_input: bool = True
    inline_ops: bool = True
    memory_budget: Union[None, float, int, str] = None
    in_checkpoint: bool = False

    def __post_init__(self):
        _check_choice("inner", self.inner, INNER_COMPILERS)
        if not isinstance(self.inductor, Mapping):
            raise ValueError(
                f"fxlora option 'inductor' must be a dict of torch._inductor.config keys, got {type(self.inductor).__name__}"
            )
        unknown = sorted(set(self.inductor) - _inductor_keys())
        if unknown:
            raise ValueError(
                f"fxlora option 'inductor' has unknown Inductor config keys {unknown}; "
                "allowed: any key of torch._inductor.config (e.g. 'max_autotune', 'triton.cudagraphs')"
            )
        object.__setattr__(self, "inductor", types.MappingProxyType(dict(self.inductor)))
        for flag in ("rewrite", "rematerialize", "verify", "form_guards", "skip_checkpoint_side_effects",
                     "group_shared_input", "in_checkpoint"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"fxlora option {flag!r} must be True or False, got {getattr(self, flag)!r}")
        _check_choice("objective", self.objective, OBJECTIVES)
        for budget in ("flop_budget", "saved_budget"):
            v = getattr(self, budget)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"fxlora option {budget!r} must be a number >= 0 (0.1 = 10%), got {v!r}")
        if self.force_form is not None and self.forced_form() is None:
            raise ValueError(
                f"fxlora option 'force_form' must look like 'f1/b5' (forward 1-4, backward 1-10, '+bits' for a packed dropout mask), got {self.force_form!r}"
            )
        _check_choice("scaling_form", self.scaling_form, SCALING_FORMS)
        if self.compress is not None:
            object.__setattr__(self, "compress", types.MappingProxyType(normalize_compress(self.compress)))
        if self.memory_budget is not None:
            MemoryBudget.parse(self.memory_budget)  # raises with what is allowed
            if self.inner == "eager":
                raise ValueError("fxlora option 'memory_budget' needs a partitioner: use inner='inductor' (default) or 'aot_eager'")
        if self.dump_graphs is not None and not isinstance(self.dump_graphs, str):
            raise ValueError(
                f"fxlora option 'dump_graphs' must be a directory path (str) or None, got {self.dump_graphs!r}"
            )

    @classmethod
    def from_options(cls, options: Union[None, "Config", Mapping[str, Any]]) -> "Config":
        """Build from `torch.compile(options=...)`: None, a Config, or a dict of Config fields.

        With no options, the JSON object in the environment variable FXLORA_OPTIONS (if set)
        is used: the way to reach stacks that call torch.compile for you and pass no options
        (Hugging Face Trainer's `torch_compile_backend="fxlora"`).
        """
        if options is None:
            return cls.from_options(_env_options()) if os.environ.get(OPTIONS_ENV) else cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"fxlora options must be a dict or fxlora.Config, got {type(options).__name__}"
            )
        allowed = [f.name for f in fields(cls)]
        ours = {k: v for k, v in options.items() if k in allowed}
        theirs = {k: v for k, v in options.items() if k not in allowed}
        if theirs:  # options that were valid for Inductor stay valid when the backend becomes fxlora
            unknown = [k for k in theirs if k not in _inductor_keys()]
            if unknown:
                raise ValueError(
                    f"unknown fxlora option {unknown[0]!r}; allowed options: {', '.join(allowed)}, "
                    "or any key of torch._inductor.config (e.g. 'epilogue_fusion'), which goes to Inductor"
                )
            given = ours.get("inductor", {})
            nested = dict(given) if isinstance(given, Mapping) else None  # not a dict: __post_init__ says so
            if nested is not None:
                clash = sorted(k for k in theirs if k in nested and nested[k] != theirs[k])
                if clash:
                    raise ValueError(f"Inductor option(s) {clash} given twice with different values "
                                     "(at the top level and under 'inductor'); keep one")
                ours["inductor"] = {**theirs, **nested}
        return cls(**ours)

    def forced_form(self) -> Optional[tuple[int, int]]:
        found = (re.fullmatch(r"f([1-4])/b(10|[1-9])(\+seeded|\+traced-mask)?(\+bits)?", self.force_form)
                 if isinstance(self.force_form, str) else None)
        return (int(found[1]), int(found[2])) if found else None

    def eager_masks(self) -> bool:
        """Whether rewritten dropout must draw eager's masks. Inductor's own rule: compiled code
        matches eager's random numbers only under `fallback_random`; without Inductor (aot_eager,
        eager) PEFT's dropout runs as ATen's, so fxlora's does too."""
        if self.inner != "inductor":
            return True
        if "fallback_random" in self.inductor:
            return bool(self.inductor["fallback_random"])
        import torch._inductor.config as inductor_config

        return bool(inductor_config.fallback_random)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class MemoryBudget:
    """The `memory_budget` option, read: exactly one of a byte count and a fraction."""

    text: str  # as the user wrote it, for the report
    bytes: Optional[int] = None
    fraction: Optional[float] = None

    @classmethod
    def parse(cls, value: Union[float, int, str]) -> "MemoryBudget":
        what = (f"fxlora option 'memory_budget' must be bytes (an int, or a string such as '512MiB', '2GiB') "
                f"or a fraction of the unbudgeted step's saved bytes in [0, 1] (0.5 or '50%'); got {value!r}")
        if isinstance(value, bool):
            raise ValueError(what)
        if isinstance(value, int):
            if value < 0:
                raise ValueError(what)
            if 0 < value < 1024:  # memory_budget=1 meaning "all of it" would be 1 byte
                raise ValueError(what + f" ({value} would be {value} bytes: give a fraction as a float, e.g. 1.0, "
                                 "or bytes from 1 KiB up)")
            return cls(text=f"{value} bytes", bytes=value)
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(what + (" (a float is a fraction; give bytes as an int)" if value > 1 else ""))
            return cls(text=f"{value:g} of the unbudgeted step", fraction=value)
        if isinstance(value, str):
            text = value.strip().replace(" ", "")
            percent = re.fullmatch(r"([0-9]*\.?[0-9]+)%", text)
            if percent:
                return cls.parse(float(percent[1]) / 100)
            if re.fullmatch(r"[0-9]+", text):  # a number in a string reads as the number would
                return cls.parse(int(text))
            if re.fullmatch(r"[0-9]*\.[0-9]+", text):
                return cls.parse(float(text))
            sized = re.fullmatch(r"([0-9]*\.?[0-9]+)([A-Za-z]+)", text)
            if sized and sized[2].lower() in _UNITS:
                return cls(text=value.strip(), bytes=int(float(sized[1]) * _UNITS[sized[2].lower()]))
        raise ValueError(what)

    def target(self, unbudgeted_bytes: int) -> int:
        """The bytes a graph that keeps `unbudgeted_bytes` without a budget may keep."""
        return self.bytes if self.bytes is not None else int(self.fraction * unbudgeted_bytes)


COMPRESS_METHODS = ("velora",)
COMPRESS_DEFAULTS = {"method": "velora", "sub_token": "D/32", "targets": ("v_proj", "down_proj")}


def normalize_compress(spec: Any) -> dict[str, Any]:
    """The `compress` option with defaults filled in; a ValueError names what is wrong.

    sub_token: an int M (every targeted site's input width must be a multiple of it) or
    "D/<k>" (M = in_features / k per site). targets: module-path suffixes ("v_proj" matches
    "...self_attn.v_proj"), or "all" for every LoRA site.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"fxlora option 'compress' must be a dict such as {{'method': 'velora'}}, got {spec!r}")
    unknown = sorted(set(spec) - set(COMPRESS_DEFAULTS))
    if unknown:
        raise ValueError(f"fxlora option 'compress' has unknown keys {unknown}; allowed: {', '.join(COMPRESS_DEFAULTS)}")
    out = {**COMPRESS_DEFAULTS, **spec}
    if out["method"] not in COMPRESS_METHODS:
        raise ValueError(f"fxlora option 'compress' method must be one of {', '.join(map(repr, COMPRESS_METHODS))}; got {out['method']!r}")
    m = out["sub_token"]
    ok = (isinstance(m, int) and not isinstance(m, bool) and m > 0) or (
        isinstance(m, str) and re.fullmatch(r"D/[1-9][0-9]*", m.replace(" ", "")) is not None
    )
    if not ok:
        raise ValueError(f"fxlora option 'compress' sub_token must be an int > 0 or 'D/<k>' such as 'D/32'; got {m!r}")
    if isinstance(m, str):
        out["sub_token"] = m.replace(" ", "")
    targets = out["targets"]
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"fxlora option 'compress' targets must be a list of module-path suffixes or 'all'; got {out['targets']!r}")
    out["targets"] = tuple(targets)
    return out


def sub_token_size(sub_token: Any, in_features: int) -> Optional[int]:
    """M for a site of width `in_features`, or None when it does not divide it."""
    m = in_features // int(sub_token[2:]) if isinstance(sub_token, str) else int(sub_token)
    return m if m > 0 and in_features % m == 0 else None


def compress_targets(spec: Mapping[str, Any], module_path: Optional[str]) -> bool:
    """Does `compress` select the site at `module_path` (a user's configuration, so by name)?"""
    if "all" in spec["targets"]:
        return True
    if not module_path:
        return False
    return any(module_path == t or module_path.endswith("." + t) for t in spec["targets"])


def json_object(text: str, what: str) -> dict:
    """`text` parsed as a JSON object; a ValueError names `what` and says what it must look like."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} must be a JSON object, got {text!r} (not JSON: {err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object such as '{{\"inner\": \"aot_eager\"}}', got {text!r}")
    return value


def _env_options() -> Any:
    return json_object(os.environ[OPTIONS_ENV], OPTIONS_ENV)


def check_mode(mode: Optional[str]) -> None:
    if mode is not None:
        _check_choice("mode", mode, MODES)


def _check_choice(key: str, got: Any, allowed: tuple) -> None:
    if got not in allowed:
        raise ValueError(f"fxlora option {key!r} must be one of {', '.join(map(repr, allowed))}; got {got!r}")


def _inductor_keys() -> set[str]:
    import torch._inductor.config as inductor_config

    return set(inductor_config.get_config_copy())
