"""Opt-in compressed-activation forms: LoRA-FA (exact once A is frozen) and VeLoRA (lossy), end to end."""

import pytest
import torch

import fxlora
from fxlora.bench.run import SavedBytes
from fxlora.testing.models import tiny_model, token_batch, with_lora
from tests.helpers import FP32, assert_same_step, compiled, loss_and_grads



def _model(**kw):
    return with_lora(tiny_model("llama", layers=1, hidden=64), "llama", r=4, **kw)



def _decisions():
    return [d for g in fxlora.last_report().graphs for d in g.decisions]


def _saved_bytes(model, batch):
    storages = frozenset(t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()))
    counter = SavedBytes(storages)
    with counter:
        loss = model(**batch).loss
    loss.backward()
    return counter.activation_bytes


# --- LoRA-FA ------------------------------------------------------------------------


def test_freeze_lora_A_is_exact_and_saves_only_xa():
    model = _model()
    assert fxlora.freeze_lora_A(model) == 7
    batch = token_batch(2, 32)
    torch.manual_seed(1)
    ref = loss_and_grads(model, batch)
    assert all("lora_B" in n for n in ref[1])
    fxlora.clear_reports()
    fast = compiled(model)
    torch.manual_seed(1)
    assert_same_step(ref, loss_and_grads(fast, batch), **FP32)
    decisions = _decisions()
    assert len(decisions) == 7 and all(d.rewritten and not d.shape.a_trainable for d in decisions)
    assert all(int(d.chosen.saved_bytes) == 2 * 32 * 4 * 4 for d in decisions)  # T r fp32 per site, never T i


def test_lora_fa_drops_the_shared_x_from_what_is_saved():
    """q/k/v (and gate/up) share x; with every A frozen nothing of x is saved for the adapters:
    the rewritten step saves the no-adapter floor's bytes plus one x A^T per site."""
    batch = token_batch(2, 32)
    floor = tiny_model("llama", layers=1, hidden=64)
    floor.requires_grad_(False)
    floor.get_input_embeddings().weight.requires_grad_(True)
    floor_bytes = _saved_bytes(torch.compile(floor, backend="aot_eager"), batch)
    model = _model()
    fxlora.freeze_lora_A(model)
    got = _saved_bytes(compiled(model), batch)
    xa = 7 * 2 * 32 * 4 * 4
    # (Below, not equal: the rewritten graph also lets AOTAutograd save a little less elsewhere.)
    assert got <= floor_bytes + xa
    # Exact fxlora with A trained keeps at least the attention block's shared x (T x 64, fp32) more.
    trained = _saved_bytes(compiled(_model()), batch)
    assert trained - got >= 2 * 32 * 64 * 4


# --- VeLoRA ---------------------------------------------------------------------------


def test_velora_with_sub_token_1_is_exact():
    """M = 1: v = [+-1], z_p v^T = x. The plumbing (buffer found, op wired) must change nothing."""
    model = _model()
    batch = token_batch(2, 16)
    compress = {"sub_token": 1, "targets": "all"}
    fxlora.velora.prepare(model, batch, compress)
    torch.manual_seed(1)
    ref = loss_and_grads(model, batch)
    fxlora.clear_reports()
    torch.manual_seed(1)
    got = loss_and_grads(compiled(model, compress=compress), batch)
    assert_same_step(ref, got, **FP32)
    assert all(d.chosen.form.lossy == "velora(M=1)" for d in _decisions())


def test_velora_default_targets_value_and_down_projections_and_b_stays_exact():
    model = _model()
    batch = token_batch(2, 16)
    compress = {"method": "velora"}  # D/32, v_proj + down_proj
    vs = fxlora.velora.prepare(model, batch, compress)
    assert sorted(k.rsplit(".", 1)[-1] for k in vs) == ["down_proj", "v_proj"]
    assert {tuple(v.shape) for v in vs.values()} == {(2,), (4,)}  # 64/32, 128/32
    assert all(torch.isclose(v.norm(), torch.tensor(1.0)) for v in vs.values())
    torch.manual_seed(1)
    ref_loss, ref = loss_and_grads(model, batch)
    fxlora.clear_reports()
    torch.manual_seed(1)
    loss, got = loss_and_grads(compiled(model, compress=compress), batch)
    torch.testing.assert_close(loss, ref_loss, **FP32)  # forward is exact
    lossy = {n for n in ref if ("v_proj.lora_A" in n or "down_proj.lora_A" in n)}
    for name in ref:
        if name in lossy:
            assert not torch.allclose(got[name], ref[name], **FP32), name
            assert torch.nn.functional.cosine_similarity(got[name].flatten(), ref[name].flatten(), dim=0) > 0
        else:
            torch.testing.assert_close(got[name], ref[name], **FP32, msg=name)
    forms = [d.chosen.form.name for d in _decisions()]
    assert sum("velora" in f for f in forms) == 2
    text = str(fxlora.last_report())
    assert "LOSSY sites" in text and "LOSSY, opted in: VeLoRA" in text


def test_velora_vector_survives_state_dict_and_the_compiled_graph_reads_it():
    batch = token_batch(2, 16)
    compress = {"targets": "all", "sub_token": 8}
    trained = _model()
    fxlora.velora.prepare(trained, batch, compress)
    state = trained.state_dict()
    keys = [k for k in state if k.endswith("velora_v")]
    assert len(keys) == 7
    fresh = _model()
    fxlora.velora.prepare(fresh, token_batch(2, 16, seed=5), compress)  # another batch: another v
    assert not all(torch.equal(fresh.state_dict()[k], state[k]) for k in keys)
    fast = compiled(fresh, compress=compress)
    before = loss_and_grads(fast, batch)[1]
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in keys)
    after = loss_and_grads(fast, batch)[1]
    want = loss_and_grads(compiled(trained, compress=compress), batch)[1]
    for name in want:
        torch.testing.assert_close(after[name], want[name], **FP32)
    assert any(not torch.allclose(before[n], want[n]) for n in want if "lora_A" in n)


def test_velora_composes_with_lora_fa_and_with_exact_sites():
    model = _model()
    batch = token_batch(2, 16)
    compress = {"targets": "all"}
    fxlora.velora.prepare(model, batch, compress)
    fxlora.freeze_lora_A(model)
    torch.manual_seed(1)
    ref = loss_and_grads(model, batch)
    fxlora.clear_reports()
    torch.manual_seed(1)
    got = loss_and_grads(compiled(model, compress=compress), batch)
    assert_same_step(ref, got, **FP32)  # A frozen: nothing lossy remains
    assert all(not d.chosen.form.lossy and "nothing to compress" in d.reason for d in _decisions())


def test_velora_without_prepare_stays_exact_and_says_why():
    model = _model()
    batch = token_batch(2, 16)
    fxlora.clear_reports()
    loss_and_grads(compiled(model, compress={"targets": "all"}), batch)
    assert all(not d.chosen.form.lossy and "fxlora.velora.prepare" in d.reason for d in _decisions())


@pytest.mark.parametrize("bad, words", [
    ({"method": "galore"}, "method"), ({"sub_token": "D/0"}, "sub_token"), ({"targets": []}, "targets"),
    ({"sub_tokens": 4}, "unknown keys"), ("velora", "must be a dict"),
])
def test_compress_option_is_validated(bad, words):
    with pytest.raises(ValueError, match=words):
        fxlora.Config.from_options({"compress": bad})
