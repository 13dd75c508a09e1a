"""fxlora: a torch.compile backend that finds adapter sites (LoRA, ...) by their math and compiles them lean.

    model = torch.compile(peft_model, backend="fxlora")
    print(fxlora.last_report())
"""

from fxlora.accounting import account
from fxlora.backend import fxlora_backend
from fxlora.breaks import install_break_records
from fxlora.config import Config
from fxlora.distributed import install_ddp_split_after_rewrite
from fxlora.explain import explain
from fxlora.integrations import install_accelerate_hook
from fxlora.logs import configure_from_env, set_logs
from fxlora.report import Report, clear_reports, last_report
from fxlora.tracing import install_checkpoint_side_effects, install_class_name_constants, install_forward_parameters
from fxlora.verify import VerificationError
from fxlora import velora
from fxlora.velora import freeze_lora_A

__all__ = ["Config", "Report", "account", "clear_reports", "explain", "freeze_lora_A", "fxlora_backend", "last_report", "set_logs", "velora", "VerificationError"]
__version__ = "0.1.0"

configure_from_env()  # FXLORA_LOG=info|debug
install_ddp_split_after_rewrite()  # under DDP, fxlora rewrites whole graphs before Dynamo splits them into buckets
install_class_name_constants()  # PEFT's DoRA layers trace whole under fxlora (fxlora/tracing.py)
install_forward_parameters()  # and GPT-2's (PEFT's transpose builds a Parameter in forward)
install_checkpoint_side_effects()  # checkpointed layers with Python side effects trace under fxlora (fxlora/tracing.py)
install_break_records()  # Dynamo's graph breaks in fxlora's compiles, with where they cut (fxlora/breaks.py)
install_accelerate_hook()  # TrainingArguments(torch_compile_backend="fxlora") passes accelerate's name check
