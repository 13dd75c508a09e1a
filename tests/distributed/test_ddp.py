"""DDP under backend="fxlora": 2 CPU ranks over gloo equal one process on the concatenated batch."""

import pytest
import torch

from tests.distributed.ranks import ddp_worker, run_ranks, single_process_step
from tests.helpers import assert_same_step

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

SITES = 14  # 7 linears x 2 layers


@pytest.mark.parametrize("order", ["ddp-then-compile", pytest.param("compile-then-ddp", marks=pytest.mark.slow)])
def test_ddp_split_graph_keeps_every_site_and_equals_one_process(tmp_path, order):
    """Tiny buckets make DDPOptimizer cut the graph between sites (and, before the rewrite, inside them)."""
    ranks = run_ranks(ddp_worker, tmp_path, order=order, bucket_mb=0.002, explain=order == "ddp-then-compile")
    ref = single_process_step()
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), rtol=1e-4, atol=1e-6)
        assert got["fallbacks"] == []
        assert (got["sites"], got["rewritten"]) == (SITES, SITES)
        assert len(got["pieces"]) > 1, "the buckets should have split the graph"
        assert sum(len(p) for p in got["pieces"]) == SITES
        assert "bucket sub-graph(s)" in got["text"] and "1.mlp.down_proj)" in got["text"]
        if "explain" in got:
            assert got["explain"].count("sub-graph ") == len(got["pieces"]) and "1.mlp.down_proj)" in got["explain"]


def test_ddp_one_bucket_is_one_piece(tmp_path):
    ranks = run_ranks(ddp_worker, tmp_path, bucket_mb=25.0)
    ref = single_process_step()
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), rtol=1e-4, atol=1e-6)
        assert [len(p) for p in got["pieces"]] == [SITES]


@pytest.mark.slow  # slow: keeps `make test` under 15 minutes cold (`make test-all` runs it)
def test_ddp_without_rewrite_is_stock(tmp_path):
    """rewrite=False: DDPOptimizer splits the untouched graph as it would for any backend."""
    ranks = run_ranks(ddp_worker, tmp_path, bucket_mb=0.002, options={"rewrite": False})
    ref = single_process_step()
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), rtol=1e-4, atol=1e-6)
        assert got["rewritten"] == 0
        assert len(got["pieces"]) > 1 and not any(got["pieces"])


@pytest.mark.slow  # slow: keeps `make test` under 15 minutes cold (`make test-all` runs it)
def test_stock_splitter_hides_cut_sites_and_says_so(tmp_path):
    """Why fxlora hooks DDPOptimizer: handed the pieces, it sees only the sites no boundary cut."""
    ranks = run_ranks(ddp_worker, tmp_path, bucket_mb=0.002, hook=False)
    ref = single_process_step()
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), rtol=1e-4, atol=1e-6)
        assert got["rewritten"] == got["sites"] < SITES
        assert got["notes"] and all("bucket's piece" in n for n in got["notes"])


@pytest.mark.slow  # slow: keeps `make test` under 15 minutes cold (`make test-all` runs it)
@pytest.mark.parametrize("order", ["python-reducer", "no-optimization"])
def test_unsplit_ddp_modes(tmp_path, order):
    """optimize_ddp="python_reducer" (compiled autograd traces fxlora's backward ops and DDP's
    all-reduces) and optimize_ddp=False: Dynamo never splits, fxlora sees whole graphs and says nothing of pieces."""
    ranks = run_ranks(ddp_worker, tmp_path, order=order, bucket_mb=0.002)
    ref = single_process_step()
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), rtol=1e-4, atol=1e-6)
        assert (got["sites"], got["rewritten"], got["pieces"], got["notes"]) == (SITES, SITES, [], [])


@pytest.mark.inductor
@pytest.mark.slow  # slow: keeps `make test` under 15 minutes cold (`make test-all` runs it)
def test_ddp_split_graph_under_inductor(tmp_path):
    """The pieces of the rewritten graph compile with Inductor (rematerialize on) and stay exact."""
    ranks = run_ranks(ddp_worker, tmp_path, bucket_mb=0.002, options={"inner": "inductor"})
    ref = single_process_step()
    for got in ranks:
        assert_same_step(ref, (got["loss"], got["grads"]), rtol=1e-4, atol=1e-5)
        assert (got["sites"], got["rewritten"]) == (SITES, SITES) and len(got["pieces"]) > 1
