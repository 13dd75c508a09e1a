"""examples/distributed.py under torchrun, as the docs launch it (aot_eager, a few steps)."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrun_ddp_example_trains_and_reports():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "distributed.py"), "--engine", "ddp", "--inner", "aot_eager",
           "--steps", "2", "--seq", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean loss over ranks" in done.stdout
    assert "DDP split the rewritten graph into 1 bucket sub-graph(s)" in done.stdout
    assert "sub-graph 0: 14" in done.stdout
