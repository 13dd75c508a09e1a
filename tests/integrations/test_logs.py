"""fxlora's decisions reach the `logging` module (pytest's own log capture is off in this project)."""

import io
import logging
import subprocess
import sys

import torch

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_lora


def test_set_logs_shows_decisions():
    stream = io.StringIO()
    fxlora.set_logs("debug", stream=stream)
    try:
        model = with_lora(tiny_model("llama", layers=1), "llama", r=4, targets="attention")
        torch.compile(model, backend="fxlora", options={"inner": "eager", "rewrite": False})(**token_batch(1, 8))
    finally:
        fxlora.set_logs(None)
    text = stream.getvalue()
    assert "4 LoRA sites on 8 linears, 0 rewritten, 0 rejected" in text  # INFO: the graph summary
    assert "site 0 not rewritten" in text  # INFO: each site left alone, with its reason
    assert "self_attn.q_proj [default]" in text  # DEBUG: the whole report
    assert logging.getLogger("fxlora").level == logging.NOTSET


def test_fxlora_log_environment_variable():
    script = (
        "import torch, fxlora\n"
        "torch.compile(torch.nn.Linear(4, 4), backend='fxlora', options={'inner': 'eager'})(torch.randn(2, 4))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "FXLORA_LOG": "info"})
    assert result.returncode == 0, result.stderr
    assert "INFO fxlora: graph 0/0: 0 adapter sites" in result.stderr


def test_report_is_short_by_default_and_verbose_on_request():
    """One summary line and the site table with chosen forms; candidate tables only with verbose=True."""
    model = with_lora(tiny_model("llama", layers=1), "llama", r=4)
    report = fxlora.explain(model, **token_batch(2, 16), options={"inner": "aot_eager"})
    short, verbose = str(report), report.format(verbose=True)
    assert "7 LoRA sites on 8 linears" in short and "7 rewritten" in short and "vs PEFT" in short
    assert any(line.lstrip().startswith("#") and "form" in line for line in short.splitlines()) and "candidates for" not in short
    assert "candidates for sites" in verbose and "FLOPs formula" in verbose
    assert "candidates for sites" in str(fxlora.explain(model, **token_batch(2, 16), options={"inner": "aot_eager"}, verbose=True))
