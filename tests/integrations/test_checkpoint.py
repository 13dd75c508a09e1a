"""Adapter sites inside activation checkpointing (fxlora/checkpoint.py): found, rewritten, exact."""

import pytest
import torch

import fxlora
from fxlora.testing.models import tiny_model, token_batch, with_lora
from tests.helpers import assert_same_step, loss_and_grads


def _checkpointed(use_reentrant, dropout=0.0, layers=2):
    model = with_lora(tiny_model("llama", layers=layers), "llama", r=4, dropout=dropout)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:  # transformers 4.x: reentrant checkpointing of a frozen base gets no gradient without it
        model.enable_input_require_grads()
    model.train()
    return model


def _regions(report):
    return [r for g in report.graphs for r in g.regions]


@pytest.mark.parametrize("use_reentrant", [pytest.param(True, marks=pytest.mark.slow), False])  # slow: `make test` under 15 min
def test_sites_in_checkpointed_layers_are_rewritten_and_exact(use_reentrant):
    """HF gradient_checkpointing_enable(), both settings: Dynamo traces each layer as a checkpoint op."""
    model = _checkpointed(use_reentrant)
    batch = token_batch(2, 16)
    ref = loss_and_grads(model, batch)
    fxlora.clear_reports()
    got = loss_and_grads(torch.compile(model, backend="fxlora", options={"inner": "aot_eager"}), batch)
    assert_same_step(ref, got)
    report = fxlora.last_report()
    regions = _regions(report)
    assert len(regions) == 2 and all(r.use_reentrant is use_reentrant for r in regions)
    assert sum(len(r.sites) for r in regions) == 14 and sum(r.rewritten for r in regions) == 14
    assert len(report.sites) == 14
    text = str(report)
    assert f"2 activation-checkpointed region(s) (use_reentrant={use_reentrant}) searched: 14 sites, 14 rewritten" in text
    assert "forms chosen by measured time with the forward counted twice" in text
    verbose = report.format(verbose=True)
    assert "region wrap_body_0" in verbose and "candidates for sites" in verbose


def test_forms_in_regions_are_chosen_by_flops():
    """objective="flops" (and "saved_bytes", whose bytes buy nothing in a region): fewest FLOPs."""
    model = _checkpointed(False, layers=1)
    fxlora.clear_reports()
    loss_and_grads(torch.compile(model, backend="fxlora", options={"inner": "aot_eager", "objective": "saved_bytes"}),
                   token_batch(2, 16))
    for d in _regions(fxlora.last_report())[0].decisions:
        cheapest = min(c.flops for c in d.candidates if c.form.legal)
        assert d.chosen.flops == cheapest, d


def test_forms_in_regions_are_chosen_by_time_with_the_forward_twice():
    """objective="time" (default): the fastest measured form, its forward timed twice (it runs again in backward)."""
    model = _checkpointed(False, layers=1, dropout=0.1)
    fxlora.clear_reports()
    loss_and_grads(torch.compile(model, backend="fxlora", options={"inner": "aot_eager"}), token_batch(2, 16))
    decisions = _regions(fxlora.last_report())[0].decisions
    assert decisions and all(d.rewritten for d in decisions)
    for d in decisions:
        timed = [c for c in d.candidates if c.seconds is not None]
        # the fastest, unless its margin over the cost model's choice (fewest FLOPs) is within the noise
        fastest = min(c.seconds for c in timed) if timed else None
        assert timed and (d.chosen.seconds == fastest or "within noise" in d.reason), d
        assert "forward twice" in d.reason and d.chosen.form.name.endswith("+traced-mask")


@pytest.mark.parametrize("use_reentrant", [pytest.param(True, marks=pytest.mark.slow), False])  # slow: `make test` <= 15 min
def test_lora_dropout_in_a_region_is_rewritten_and_exact(use_reentrant):
    """peft#3020's failure (a recompute drawing another mask) cannot happen: the traced dropout stays,
    AOTAutograd replays its RNG in the recompute, and the rewritten op reads its output."""
    model = _checkpointed(use_reentrant, dropout=0.1)
    batch = token_batch(2, 16)
    torch.manual_seed(1)
    ref = loss_and_grads(model, batch)  # eager PEFT, eager checkpointing
    torch._dynamo.reset()
    fxlora.clear_reports()
    torch.manual_seed(1)
    got = loss_and_grads(torch.compile(model, backend="fxlora", options={"inner": "aot_eager"}), batch)
    assert_same_step(ref, got)
    regions = _regions(fxlora.last_report())
    decisions = [d for r in regions for d in r.decisions]
    assert len(decisions) == 14 and all(d.rewritten for d in decisions)
    assert all(d.chosen.form.spec.traced_dropout for d in decisions)
    assert "14 sites, 14 rewritten" in str(fxlora.last_report())


@pytest.mark.inductor
@pytest.mark.slow
def test_checkpointed_regions_under_inductor_are_exact():
    model = _checkpointed(True, layers=1)
    batch = token_batch(2, 16)
    ref = loss_and_grads(model, batch)
    fxlora.clear_reports()
    got = loss_and_grads(torch.compile(model, backend="fxlora"), batch)
    assert_same_step(ref, got)
    assert sum(r.rewritten for r in _regions(fxlora.last_report())) == 7


def _saved_bytes(compiled, batch) -> int:
    """Bytes (unique storages) the compiled step keeps for backward, as autograd's saved-tensor hooks see them."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch._subclasses.FakeTensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(**batch).loss
    loss.backward()
    return sum(seen.values())


@pytest.mark.slow  # `make test` under 15 min cold (issue 31: Inductor now also compiles the op bodies)
def test_rewritten_regions_save_no_more_than_the_reference():
    """A region keeps only its inputs, rewritten or not: fxlora's step saves what aot_eager's saves
    when aot_eager traces the same regions (transformers >= 5.25 needs Dynamo's switch for that,
    which fxlora turns on for itself: fxlora/tracing.py)."""
    model = _checkpointed(False, layers=1)
    batch = token_batch(2, 32)
    saved = {}
    for name, kwargs in (("reference", {"backend": "aot_eager"}),
                         ("fxlora", {"backend": "fxlora", "options": {"inner": "aot_eager"}})):
        torch._dynamo.reset()
        compiled = torch.compile(model, **kwargs)
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            _saved_bytes(compiled, batch)  # compiles
        saved[name] = _saved_bytes(compiled, batch)
    assert saved["fxlora"] <= saved["reference"], saved


def _traced_regions(backend, **kwargs) -> int:
    """Checkpoint ops in the graphs `backend` received for one step of a checkpointed model."""
    seen = []

    def spy(gm, example_inputs):
        seen.append(sum(n.target is torch.ops.higher_order.tag_activation_checkpoint for n in gm.graph.nodes))
        return backend(gm, example_inputs)

    fxlora.tracing.mark_backend(spy, **kwargs) if kwargs else None
    torch._dynamo.reset()
    loss_and_grads(torch.compile(_checkpointed(False, layers=1), backend=spy), token_batch(2, 16))
    return sum(seen)


def test_the_side_effect_switch_is_fxloras_alone():
    """Other backends in the same process keep Dynamo's default (fxlora/tracing.py); fxlora's own
    compiles trace the layers unless `skip_checkpoint_side_effects=False`."""
    from torch._dynamo.backends.registry import lookup_backend

    import transformers

    eager = lookup_backend("eager")
    fxlora_eager = lambda gm, ex: gm.forward  # noqa: E731
    assert _traced_regions(fxlora_eager, config=fxlora.Config(inner="eager")) == 1
    assert _traced_regions(fxlora_eager, config=fxlora.Config(inner="eager", skip_checkpoint_side_effects=False)) == 0
    side_effect_release = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 25)
    assert _traced_regions(eager) == (0 if side_effect_release else 1)


class _SeededDropout(torch.nn.Module):
    """PEFT's dropout as fxlora's "+seeded" forms draw it: a seed from the global RNG, then the mask hashed from it."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        from fxlora.ops.lora import hashed_keep

        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
        return x * hashed_keep(seed, x.shape, self.p) / (1 - self.p)


@pytest.mark.parametrize("form", ["f1/b1+seeded", pytest.param("f1/b10+seeded+bits", marks=pytest.mark.slow)])
def test_seeded_masks_in_a_region_are_exact(form):
    """A "+seeded" form's seed is a random op of the graph: the region's recompute reads the seed the
    forward drew (AOTAutograd keeps or replays it), never a new one. Against eager PEFT whose dropout
    draws the same seeds in the same order."""
    import copy

    model = _checkpointed(False, dropout=0.1, layers=1)
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, torch.nn.ModuleDict) and name.endswith("lora_dropout"):
            module["default"] = _SeededDropout(0.1)
    batch = token_batch(2, 16)
    torch.manual_seed(1)
    ref = loss_and_grads(reference, batch)
    fxlora.clear_reports()
    torch.manual_seed(1)
    got = loss_and_grads(torch.compile(model, backend="fxlora", options={"inner": "aot_eager", "force_form": form}), batch)
    assert_same_step(ref, got, rtol=1e-4, atol=1e-5)
    decisions = _regions(fxlora.last_report())[0].decisions
    assert [d.chosen.form.name for d in decisions] == [form] * 7


@pytest.mark.inductor
@pytest.mark.slow
@pytest.mark.parametrize("form", ["f1/b1+seeded", "f1/b1+traced-mask"])
def test_dropout_forms_in_a_region_under_inductor_match_finite_differences(form):
    """Under Inductor the masks are Inductor's (not eager's), so the check is the gradient itself:
    in float64 weights, the loss at a fixed RNG state is a function of the adapter weights, and the compiled
    backward (which recomputes the region) must be its derivative. A recompute that drew another
    mask than the forward would miss it by the size of the gradient."""
    model = _checkpointed(False, dropout=0.2, layers=1).double()
    batch = token_batch(2, 16)
    compiled = torch.compile(model, backend="fxlora", options={"force_form": form})
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]

    def loss():
        torch.manual_seed(3)
        return compiled(**batch).loss

    fxlora.clear_reports()
    grads = torch.autograd.grad(loss(), params)
    assert [d.chosen.form.name for d in _regions(fxlora.last_report())[0].decisions] == [form] * 7
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    eps = 1e-3  # the LM loss comes out in float32 (HF upcasts the logits): the difference needs a wide step

    def shift(k):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(k * eps * d)

    # the shifted losses with gradients enabled: the same graph (under no_grad Dynamo compiles another one)
    shift(1)
    up = loss().detach()
    shift(-2)
    down = loss().detach()
    shift(1)
    numeric = (up - down) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    torch.testing.assert_close(analytic, numeric.double(), rtol=1e-2, atol=1e-5)  # a wrong mask misses by ~100%
