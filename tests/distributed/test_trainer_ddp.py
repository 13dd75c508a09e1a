"""HF Trainer, 2 CPU ranks (DDP over gloo), torch_compile_backend="fxlora" == one eager process on the full batch."""


import pytest
import torch

from tests.distributed.ranks import lora_llama, run_ranks
from tests.distributed.trainer_ranks import adapters, train, trainer_worker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


SITES = 14  # 7 linears x 2 layers


def _assert_adapters_close(got, ref, who):
    assert got.keys() == ref.keys() and ref, who
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{who} {name}: {m}")


def test_trainer_ddp_fxlora_equals_one_eager_process(tmp_path, clean_environ):
    """accelerate wraps DDP then torch.compile; its adapters (under 1 MiB) fit DDPOptimizer's first bucket: one piece."""
    ranks = run_ranks(trainer_worker, tmp_path, output_dir=str(tmp_path / "ddp"))
    ref = train(str(tmp_path / "ref"))  # eager, no compile, per_device_train_batch_size = 2 x the ranks'

    initial = adapters(lora_llama())
    assert any(not torch.allclose(ref["adapters"][n], initial[n]) for n in initial), "training changed nothing"
    for rank, got in enumerate(ranks):
        who = f"rank {rank}"
        assert got["world"] == 2, who
        assert got["wrapped"] == ["OptimizedModule", "DistributedDataParallel", "PeftModel"], who
        _assert_adapters_close(got["adapters"], ref["adapters"], who)
        assert got["fallbacks"] == [], who
        assert (got["sites"], got["rewritten"]) == (SITES, SITES), got["text"]  # one graph, no recompile
        assert [len(p) for p in got["pieces"]] == [SITES], got["pieces"]
    # training_loss is each rank's own (no logging step gathers it): their mean is the global mean
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, ref["loss"], rtol=1e-5, atol=1e-6)
    for name, weight in ranks[0]["adapters"].items():  # DDP all-reduces gradients: ranks agree bit for bit
        assert torch.equal(ranks[1]["adapters"][name], weight), name
