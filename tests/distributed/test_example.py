"""examples/distributed.py on 2 ranks, as torchrun launches it (aot_eager, a few steps)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # `make test` under 15 min cold; DDP/FSDP2 exactness stays in test_ddp.py / test_fsdp.py
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_example_on_two_ranks_trains_and_reports(engine):
    """The ranks torchrun would start (its environment variables), without its agent process."""
    args = ["--engine", engine, "--inner", "aot_eager", "--steps", "2", "--seq", "32"]
    stdout = _run_ranks(os.path.join(ROOT, "examples", "distributed.py"), args, world=2, timeout=240)
    assert "mean loss over ranks" in stdout
    if engine == "ddp":
        assert "DDP split the rewritten graph into 1 bucket sub-graph(s)" in stdout
        assert "sub-graph 0: 14" in stdout
    else:  # a graph per sharded layer: the first layer's (input needs no grad) and the others'
        assert stdout.count(": 7 LoRA sites on 7 linears") == 2


def _run_ranks(script: str, args: list[str], world: int, timeout: float) -> str:
    """Rank 0's stdout; every rank is killed if any is still running after `timeout` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} did not finish on {world} ranks in {timeout} s")
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    return outputs[0][0]
