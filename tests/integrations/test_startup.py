"""The start-up hook (fxlora_startup.pth): `torch_compile_backend="fxlora"` with no `import fxlora` in the script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_trainer.py"


def _python(code_or_args, tmp_path, **env):
    """A fresh interpreter, started outside the repository so only the installed package can answer."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(map(str, code_or_args))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FXLORA_", "ACCELERATE_"))}
    environ.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=environ, timeout=600)


def test_startup_hook_is_lazy(tmp_path):
    """A process that never imports accelerate gets one finder on sys.meta_path and nothing else."""
    probe = ("import sys; print(sorted(m for m in ('torch', 'fxlora', 'accelerate') if m in sys.modules), "
             "[type(f).__name__ for f in sys.meta_path if type(f).__name__ == 'AfterImport'])")
    result = _python(probe, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] ['AfterImport']", "fxlora_startup.pth missing? reinstall with `pip install -e .`"
    off = _python(probe, tmp_path, FXLORA_NO_STARTUP_HOOK="1")
    assert off.stdout.strip() == "[] []"


def test_accelerate_accepts_the_name_without_import_fxlora(tmp_path):
    script = ("import sys\nfrom accelerate.utils import TorchDynamoPlugin\n"
              "plugin = TorchDynamoPlugin(backend='fxlora')\n"
              "print(plugin.to_kwargs()['backend'], 'fxlora' in sys.modules, 'torch' in sys.modules)")
    result = _python(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["fxlora", "False"]  # registered, fxlora itself not imported
    off = _python(script, tmp_path, FXLORA_NO_STARTUP_HOOK="1")  # what users hit without the hook
    assert off.returncode != 0 and "is not a valid DynamoBackend" in off.stderr


def test_unchanged_trainer_script_trains_and_rewrites(tmp_path):
    """examples/hf_trainer.py has no `import fxlora`; with HF's checkpointing on, its sites are rewritten (INFO log)."""
    imports = [line for line in EXAMPLE.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert imports and not any("fxlora" in line for line in imports), imports
    result = _python([EXAMPLE, "--steps", "2", "--checkpointing"], tmp_path,
                     FXLORA_OPTIONS='{"inner": "aot_eager"}', FXLORA_LOG="info")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 checkpointed region(s): 14 sites, 14 rewritten" in result.stderr, result.stderr[-4000:]
    assert "losses: [" in result.stdout


@pytest.mark.slow
def test_unchanged_trl_script_trains_and_rewrites(tmp_path):
    """examples/trl_sft.py: SFTTrainer with SFTConfig's defaults (checkpointing on), no `import fxlora`."""
    pytest.importorskip("trl")
    script = ROOT / "examples" / "trl_sft.py"
    imports = [line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert not any("fxlora" in line for line in imports), imports
    result = _python([script, "--steps", "2"], tmp_path, FXLORA_OPTIONS='{"inner": "aot_eager"}', FXLORA_LOG="info")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 checkpointed region(s): 14 sites, 14 rewritten" in result.stderr, result.stderr[-4000:]
