"""FSDP2 (fully_shard) under backend="fxlora": exact, and no unsharded weight copy outlives forward."""

import pytest
import torch

from tests.distributed.ranks import fsdp_worker, run_ranks, single_process_step
from tests.helpers import assert_same_step

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

SITES = 14
HIDDEN, INTERMEDIATE = 32, 64
WEIGHTS = {(HIDDEN, HIDDEN), (16, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)}  # k/v: 2 of 4 heads
WEIGHT_SHAPES = WEIGHTS | {shape[::-1] for shape in WEIGHTS}  # a transposed copy counts too


@pytest.mark.parametrize("form,inner", [
    ("auto", "aot_eager"), pytest.param("merged", "aot_eager", marks=pytest.mark.slow),
    pytest.param("auto", "inductor", marks=[pytest.mark.inductor, pytest.mark.slow]),  # slow: `make test` under 15 min
])
def test_fsdp2_step_equals_one_process_and_frees_weights(tmp_path, form, inner):
    """`merged` forces forward 2 / backward 4, which build W + s B A: it must be rebuilt, never kept."""
    options = {"inner": inner, **({"force_form": "f2/b4"} if form == "merged" else {})}
    ranks = run_ranks(fsdp_worker, tmp_path, options=options, probe_saved=True)
    ref = single_process_step()
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), rtol=1e-4, atol=1e-5)
        assert got["fallbacks"] == []
        assert (got["sites"], got["rewritten"]) == (SITES, SITES)
        kept = [(shape, nbytes) for shape, nbytes in got["alive_saved"] if shape in WEIGHT_SHAPES and nbytes]
        assert kept == [], f"weight-sized tensors still allocated after forward: {kept}"

