"""fxlora's start-up hook: `torch_compile_backend="fxlora"` in a script that never imports fxlora.

Hugging Face Trainer, TRL and plain accelerate scripts reach `torch.compile` through
accelerate's `TorchDynamoPlugin`, which first checks the backend name against its fixed
enum `DynamoBackend` and refuses "fxlora" (`ValueError: 'FXLORA' is not a valid
DynamoBackend`). The package installs `fxlora_startup.pth`, which Python's `site` runs at
start-up: it imports this module, which only puts a finder on `sys.meta_path` that waits
for `accelerate.utils.dataclasses`. When that module has run, the finder adds the member
FXLORA to the enum and removes itself. Nothing else happens, and neither torch nor fxlora
is imported: a process that never imports accelerate pays one small module import.

FXLORA_NO_STARTUP_HOOK=1 turns the hook off (then `import fxlora` still registers).
"""

from __future__ import annotations

import os
import sys

DISABLE_ENV = "FXLORA_NO_STARTUP_HOOK"
ACCELERATE_MODULE = "accelerate.utils.dataclasses"
BACKEND_NAME = "FXLORA"


def add_accelerate_backend(module=None) -> bool:
    """Make accelerate's `DynamoBackend("FXLORA")` valid; True when the member exists afterwards."""
    module = module or sys.modules.get(ACCELERATE_MODULE)
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
    return True


class AfterImport:
    """A meta-path finder that finds nothing itself: it wraps one module's real loader to run a callback after it.

    Written against the finder/loader protocol without importing importlib.abc, to keep start-up cheap."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self.loader = name, callback, None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        try:
            sys.meta_path.remove(self)  # one shot, and lets the real finders answer below
        except ValueError:
            pass
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
            import logging

            logging.getLogger("fxlora").warning(
                "fxlora: could not register with accelerate (%s: %s); add `import fxlora` to the script",
                type(err).__name__, err,
            )


def install_accelerate_hook() -> None:
    """Register now if accelerate is loaded, else when it is (idempotent)."""
    if ACCELERATE_MODULE in sys.modules:
        add_accelerate_backend()
    elif not any(isinstance(f, AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(ACCELERATE_MODULE, add_accelerate_backend))


if os.environ.get(DISABLE_ENV, "") in ("", "0"):
    install_accelerate_hook()
