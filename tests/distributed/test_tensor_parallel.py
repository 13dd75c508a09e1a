"""What fxlora cannot do yet says so at compile time and leaves the graph untouched: DTensor weights."""

import pytest
import torch

from tests.distributed.ranks import run_ranks, tensor_parallel_worker
from tests.helpers import assert_same_step

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def test_tensor_parallel_base_is_left_untouched_and_explained(tmp_path):
    for got in run_ranks(tensor_parallel_worker, tmp_path):
        assert_same_step(got["eager"], got["compiled"], rtol=1e-5, atol=1e-6)
        assert got["rewritten"] == 0
        assert got["fallbacks"] and all("DTensor" in f for f in got["fallbacks"])
        assert "left untouched: DTensor inputs" in got["text"]
