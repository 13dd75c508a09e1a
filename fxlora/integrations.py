"""Glue for training stacks that check backend names themselves (Hugging Face `Trainer` via `accelerate`).

`TrainingArguments(torch_compile_backend="fxlora")` reaches `torch.compile` through
accelerate's `TorchDynamoPlugin`, which first validates the name against its fixed enum
`DynamoBackend` and raises `ValueError: 'FXLORA' is not a valid DynamoBackend`. `import
fxlora` adds the one member that enum lacks, so the name passes through unchanged to
`torch.compile(model, backend="fxlora")`. accelerate is never imported by fxlora for
this: if it is not loaded yet, a one-shot import hook adds the member when it is.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

log = logging.getLogger("fxlora")

_ACCELERATE_MODULE = "accelerate.utils.dataclasses"
BACKEND_NAME = "FXLORA"


def add_accelerate_backend(module=None) -> bool:
    """Make accelerate's `DynamoBackend("FXLORA")` valid; True when the member exists afterwards."""
    module = module or sys.modules.get(_ACCELERATE_MODULE)
    enum_cls = getattr(module, "DynamoBackend", None)
    if enum_cls is None:
        return False
    if BACKEND_NAME in enum_cls._value2member_map_:
        return True
    # A str-valued member built the way Enum builds its own; `DynamoBackend("FXLORA")` looks
    # values up in _value2member_map_, and `.value.lower()` gives torch.compile "fxlora".
    member = str.__new__(enum_cls, BACKEND_NAME)
    member._name_ = BACKEND_NAME
    member._value_ = BACKEND_NAME
    member.__objclass__ = enum_cls
    enum_cls._value2member_map_[BACKEND_NAME] = member
    enum_cls._member_map_[BACKEND_NAME] = member
    enum_cls._member_names_.append(BACKEND_NAME)
    log.debug("fxlora: added FXLORA to accelerate's DynamoBackend")
    return True


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds nothing itself; wraps the real loader of one module to run a callback once it is executed."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self.loader = name, callback, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot, and lets the real finders answer below
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            self.callback(module)
        except Exception as err:  # never break the user's import
            log.warning("fxlora: could not register with accelerate (%s: %s)", type(err).__name__, err)


def install_accelerate_hook() -> None:
    """Register now if accelerate is loaded, else when it is (called by `import fxlora`)."""
    if _ACCELERATE_MODULE in sys.modules:
        add_accelerate_backend()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_ACCELERATE_MODULE, add_accelerate_backend))
