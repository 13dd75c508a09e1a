"""fxlora: a torch.compile backend that finds adapter sites (LoRA, ...) by their math and compiles them lean.

    model = torch.compile(peft_model, backend="fxlora")
    print(fxlora.last_report())
"""

from fxlora.backend import fxlora_backend
from fxlora.config import Config
from fxlora.explain import Report, clear_reports, explain, last_report

__all__ = ["Config", "Report", "clear_reports", "explain", "fxlora_backend", "last_report"]
__version__ = "0.1.0"
