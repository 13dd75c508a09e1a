"""Glue for training stacks that check backend names themselves (Hugging Face `Trainer` via `accelerate`).

`TrainingArguments(torch_compile_backend="fxlora")` reaches `torch.compile` through
accelerate's `TorchDynamoPlugin`, which first validates the name against its fixed enum
`DynamoBackend` and raises `ValueError: 'FXLORA' is not a valid DynamoBackend`. The
start-up hook the package installs (`fxlora_startup.pth` -> `fxlora_startup`) adds the one
member that enum lacks when accelerate is imported, so scripts need no `import fxlora`;
`import fxlora` does the same (for installs without the hook, or with it turned off).
The code lives in the top-level module `fxlora_startup`, which imports neither torch nor fxlora.
"""

from __future__ import annotations

from fxlora_startup import ACCELERATE_MODULE as _ACCELERATE_MODULE  # noqa: F401
from fxlora_startup import BACKEND_NAME, add_accelerate_backend, install_accelerate_hook

__all__ = ["BACKEND_NAME", "add_accelerate_backend", "install_accelerate_hook"]
