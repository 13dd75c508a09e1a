"""fxlora::lora_linear alone against the autograd reference, every form."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fxlora.ops.lora import BACKWARD_FORMS, FORWARD_FORMS, MERGED_DX, MERGED_FORWARD, lora_linear, lora_linear_backward

FORMS = [(f, b) for f, b in itertools.product(FORWARD_FORMS, BACKWARD_FORMS)]


def _reference(x, W, bias, A, B, s, p, conv1d):
    d = F.dropout(x, p, True) if p else x
    base = x @ W + bias if conv1d else F.linear(x, W, bias)
    return base + F.linear(F.linear(d, A), B) * s


@pytest.mark.parametrize("forward, backward", FORMS)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("a_trainable", [True, False])
def test_every_form_matches_autograd(forward, backward, p, conv1d, a_trainable):
    if p and (forward in MERGED_FORWARD or BACKWARD_FORMS[backward][2] in MERGED_DX):
        pytest.skip("illegal with dropout; the cost model never picks it")
    gen = torch.Generator().manual_seed(0)
    i, o, r = 24, 20, 4
    x = torch.randn(3, 5, i, generator=gen, requires_grad=True)
    W = torch.randn(i, o, generator=gen) if conv1d else torch.randn(o, i, generator=gen)
    bias = torch.randn(o, generator=gen, requires_grad=True)
    A = torch.randn(r, i, generator=gen).requires_grad_(a_trainable)
    B = torch.randn(o, r, generator=gen, requires_grad=True)
    grad_out = torch.randn(3, 5, o, generator=gen)
    wrt = [t for t in (x, bias, A, B) if t.requires_grad]

    torch.manual_seed(7)
    ref = _reference(x, W, bias, A, B, 1.5, p, conv1d)
    ref_grads = torch.autograd.grad(ref, wrt, grad_out)
    torch.manual_seed(7)
    y, xa, rng = lora_linear(
        x, W, bias, A, B, torch.tensor(1.5), p, torch.float32, torch.float32, torch.float32,
        forward, backward, conv1d, not a_trainable,
    )
    got_grads = torch.autograd.grad(y, wrt, grad_out)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g, want in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-4)
    assert xa.numel() == (0 if a_trainable and forward not in (3, 4) else 15 * r)
    assert (rng.numel() > 0) == (p > 0)


def test_dropout_replay_leaves_the_callers_rng_alone():
    x = torch.randn(4, 8, requires_grad=True)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    y, _, _ = lora_linear(x, torch.randn(8, 8), None, A, B, torch.tensor(1.0), 0.5, torch.float32,
                          torch.float32, torch.float32, 1, 1, False, False)
    torch.manual_seed(3)
    y.sum().backward()
    after_backward = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), after_backward)


@pytest.mark.parametrize("forward, backward", [(1, 5), (3, 9), (2, 10)])
def test_opcheck(forward, backward):
    x = torch.randn(2, 3, 8, requires_grad=True)
    args = (x, torch.randn(6, 8), torch.randn(6), torch.randn(2, 8, requires_grad=True),
            torch.randn(6, 2, requires_grad=True), torch.tensor(2.0), 0.0, torch.float32,
            torch.float32, torch.float32, forward, backward, False, False)
    torch.library.opcheck(lora_linear, args)


def test_concatenated_forms_return_the_strided_views_their_fakes_describe():
    """Forward 3's y and backward 9's dX come out of one GEMM with r more columns; slicing
    them contiguous would be a full-size copy, so the fakes say the real strides."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    y, xa, _ = lora_linear(x, torch.randn(6, 8), None, A, B, torch.tensor(2.0), 0.0, torch.float32,
                           torch.float32, torch.float32, 3, 9, False, False)
    assert y.shape == (2, 3, 6) and y.stride() == (3 * 8, 8, 1) and xa.shape == (2, 3, 2)
    (dx,) = torch.autograd.grad(y, x, torch.randn(2, 3, 6))
    assert dx.shape == (2, 3, 8) and dx.stride() == (3 * 10, 10, 1)


@pytest.mark.parametrize("needs", [[True, True, True, True], [True, False, False, True], [False, False, True, False]])
@pytest.mark.parametrize("backward", [1, 4, 9, 10])
def test_opcheck_backward(needs, backward):
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 8, generator=gen), torch.randn(6, 8, generator=gen),
            torch.randn(2, 8, generator=gen), torch.randn(6, 2, generator=gen), torch.tensor(2.0), None, None,
            0.0, torch.float32, torch.float32, torch.float32, backward, False, False, torch.float32, needs)
    torch.library.opcheck(lora_linear_backward, args)


def test_after_only_orders_the_draws():
    """`after` is a data dependency and nothing else: the result does not depend on it."""
    x = torch.randn(4, 8)
    args = (x, torch.randn(8, 8), None, torch.randn(2, 8), torch.randn(8, 2), torch.tensor(1.0), 0.5,
            torch.float32, torch.float32, torch.float32, 1, 1, False, False)
    torch.manual_seed(0)
    plain = lora_linear(*args)[0]
    torch.manual_seed(0)
    ordered = lora_linear(*args, after=torch.zeros(3))[0]
    assert torch.equal(plain, ordered)


def _dropout_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    i, o, r = 24, 20, 4
    x = torch.randn(3, 5, i, generator=gen, requires_grad=True)
    W = torch.randn(o, i, generator=gen)
    A = torch.randn(r, i, generator=gen, requires_grad=True)
    B = torch.randn(o, r, generator=gen, requires_grad=True)
    return x, W, A, B, torch.randn(3, 5, o, generator=gen)


@pytest.mark.parametrize("fast_rng", [False, True])
@pytest.mark.parametrize("packed_mask", [False, True])
@pytest.mark.parametrize("backward", [1, 2, 3, 6])
def test_dropout_masks_replayed_or_packed_are_the_forwards(fast_rng, packed_mask, backward):
    """Given the mask it drew, the op computes what autograd computes on x * noise; with the
    eager generator that noise is eager dropout's own (same seed, same mask); fast masks are
    hashed from a seed."""
    from fxlora.ops.lora import _draw_keep, hashed_keep

    x, W, A, B, grad_out = _dropout_case()
    p = 0.25
    seed = torch.tensor(2**33 + 5, dtype=torch.int64) if fast_rng else None
    torch.manual_seed(11)
    noise = (hashed_keep(seed, x.shape, p) if fast_rng else _draw_keep(x.shape, p, torch.float32, x.device, False)) / (1 - p)
    if not fast_rng:
        torch.manual_seed(11)
        assert torch.equal(F.dropout(torch.ones_like(x), p, True), noise)
    ref = F.linear(x, W) + F.linear(F.linear(x * noise, A), B) * 1.5
    ref_grads = torch.autograd.grad(ref, (x, A, B), grad_out)
    torch.manual_seed(11)
    y, _, record = lora_linear(x, W, None, A, B, torch.tensor(1.5), p, torch.float32, torch.float32, torch.float32,
                               1, backward, False, False, fast_rng=fast_rng, packed_mask=packed_mask, seed=seed)
    assert record.numel() == ((x.numel() + 7) // 8 if packed_mask else 1 if fast_rng else torch.get_rng_state().numel())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g, want in zip(torch.autograd.grad(y, (x, A, B), grad_out), ref_grads):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.001, 0.1])
def test_hashed_masks_keep_one_minus_p_independently(p):
    """Counter-based masks: rate 1 - p (to 2^-31), neighbours independent, random seeds (as the graph
    draws them) independent, a pure function of (seed, index): the same mask again from the same seed,
    whatever the global RNG."""
    from fxlora.ops.lora import hashed_keep

    n = 1 << 20
    # Seeds as the graph draws them (torch.randint(0, 2**62)): each site, layer and step its own random seed.
    gen = torch.Generator().manual_seed(p.as_integer_ratio()[1])
    seeds = list(torch.randint(0, 2**62, (4,), dtype=torch.int64, generator=gen))
    keeps = [hashed_keep(s, (n,), p).double() for s in seeds]
    sigma = (p * (1 - p) / n) ** 0.5
    for keep in keeps:
        assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
        for k in (1, 2, 7):  # neighbours at distance k
            both = (keep[:-k] * keep[k:]).mean().item()
            assert abs(both - (1 - p) ** 2) < 6 * (1 / n) ** 0.5
    for a in range(len(keeps)):  # across seeds (sites, layers, steps)
        for b in range(a + 1, len(keeps)):
            assert abs((keeps[a] * keeps[b]).mean().item() - (1 - p) ** 2) < 6 * (1 / n) ** 0.5
    torch.manual_seed(3)
    assert torch.equal(hashed_keep(seeds[3], (n,), p).double(), keeps[3])


def test_hashed_mask_is_the_same_compiled():
    """Inductor's kernel computes the eager body's mask bit for bit (integer arithmetic only)."""
    from fxlora.ops.lora import hashed_keep

    seed = torch.tensor(2**45 + 99, dtype=torch.int64)
    compiled = torch.compile(lambda s: hashed_keep(s, (3, 1000, 7), 0.1), backend="inductor", fullgraph=True)
    assert torch.equal(compiled(seed), hashed_keep(seed, (3, 1000, 7), 0.1))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.001])  # 16 bits per element; 0.001: 31 bits
def test_fast_generator_keeps_one_minus_p(p):
    """The seedless fast generator (DoRA's sparse-mask op)."""
    from fxlora.ops.lora import _draw_keep

    torch.manual_seed(0)
    n = 1 << 20
    keep = _draw_keep((n,), p, torch.float32, torch.device("cpu"), fast=True).double()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # neighbours (the parts of one int64 draw) are independent, each of the four int16 lanes keeps at 1 - p
    for k in (2, 4):
        both = (keep[0::k] * keep[1::k]).mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * (1 / (n / k)) ** 0.5
    lanes = keep.view(-1, 4).mean(0)
    assert ((lanes - (1 - p)).abs() < 5 * (p * (1 - p) / (n / 4)) ** 0.5).all()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 1000])
def test_packed_mask_round_trip(n):
    from fxlora.ops.lora import _pack_mask, _unpacked_keep

    torch.manual_seed(n)
    keep = torch.rand(3, n) < 0.5
    bits = _pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == (3 * n + 7) // 8
    assert torch.equal(_unpacked_keep(bits, (3, n)), keep)


def test_opcheck_packed_fast():
    x = torch.randn(2, 3, 8, requires_grad=True)
    args = (x, torch.randn(6, 8), None, torch.randn(2, 8, requires_grad=True),
            torch.randn(6, 2, requires_grad=True), torch.tensor(2.0), 0.3, torch.float32,
            torch.float32, torch.float32, 1, 1, False, False)
    torch.library.opcheck(lora_linear, args, {"fast_rng": True, "packed_mask": True, "seed": torch.tensor(3)},
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


TRACED_MASK_FORMS = [(f, b) for f, b in FORMS
                     if f not in MERGED_FORWARD and BACKWARD_FORMS[b][2] not in (*MERGED_DX, "split_cat")]


@pytest.mark.parametrize("forward, backward", TRACED_MASK_FORMS)
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("a_trainable", [True, False])
def test_x_adapter_reads_the_traced_dropout(forward, backward, conv1d, a_trainable):
    """In a checkpointed region the op reads the traced drop(x): gradients reach x through the
    base and through dropout's own backward, exactly as autograd's."""
    gen = torch.Generator().manual_seed(0)
    i, o, r = 24, 20, 4
    x = torch.randn(3, 5, i, generator=gen, requires_grad=True)
    W = torch.randn(i, o, generator=gen) if conv1d else torch.randn(o, i, generator=gen)
    bias = torch.randn(o, generator=gen, requires_grad=True)
    A = torch.randn(r, i, generator=gen).requires_grad_(a_trainable)
    B = torch.randn(o, r, generator=gen, requires_grad=True)
    grad_out = torch.randn(3, 5, o, generator=gen)
    wrt = [t for t in (x, bias, A, B) if t.requires_grad]
    torch.manual_seed(7)
    ref = _reference(x, W, bias, A, B, 1.5, 0.25, conv1d)
    ref_grads = torch.autograd.grad(ref, wrt, grad_out)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.25, True)
    y, _, record = lora_linear(x, W, bias, A, B, torch.tensor(1.5), 0.0, torch.float32, torch.float32, torch.float32,
                               forward, backward, conv1d, not a_trainable, x_adapter=dropped)
    got_grads = torch.autograd.grad(y, wrt, grad_out)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g, want in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-4)
    assert record.numel() == 0  # the op drew nothing


def test_opcheck_x_adapter():
    x = torch.randn(2, 3, 8, requires_grad=True)
    args = (x, torch.randn(6, 8), torch.randn(6), torch.randn(2, 8, requires_grad=True),
            torch.randn(6, 2, requires_grad=True), torch.tensor(2.0), 0.0, torch.float32,
            torch.float32, torch.float32, 1, 1, False, False)
    torch.library.opcheck(lora_linear, args, {"x_adapter": torch.randn(2, 3, 8, requires_grad=True)})


@pytest.mark.parametrize("forward, backward", [(1, 1), (1, 2), (4, 6), (1, 10)])
@pytest.mark.parametrize("packed", [False, True])
def test_seed_draws_the_same_mask_in_forward_backward_and_a_recompute(forward, backward, packed):
    """A graph-drawn seed: the op's mask is a function of it alone, so a checkpointed region's
    recompute (same seed) sees the forward's mask; gradients are autograd's for that mask."""
    from fxlora.ops.lora import hashed_keep

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=gen, requires_grad=True)
    W, bias = torch.randn(20, 24, generator=gen), torch.randn(20, generator=gen, requires_grad=True)
    A = torch.randn(4, 24, generator=gen, requires_grad=True)
    B = torch.randn(20, 4, generator=gen, requires_grad=True)
    grad_out = torch.randn(3, 5, 20, generator=gen)
    seed = torch.tensor(2**40 + 17, dtype=torch.int64)
    keep = hashed_keep(seed, x.shape, 0.25)
    ref = F.linear(x, W, bias) + F.linear(F.linear(x * keep / 0.75, A), B) * 1.5
    ref_grads = torch.autograd.grad(ref, (x, bias, A, B), grad_out)
    args = (x, W, bias, A, B, torch.tensor(1.5), 0.25, torch.float32, torch.float32, torch.float32,
            forward, backward, False, False)
    flags = {"fast_rng": True, "packed_mask": packed, "seed": seed}
    before = torch.get_rng_state()
    y, _, _ = lora_linear(*args, **flags)
    again, _, _ = lora_linear(*args, **flags)  # what a recompute would compute
    got_grads = torch.autograd.grad(y, (x, bias, A, B), grad_out)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, y, rtol=0, atol=0)
    for g, want in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-4)


def test_opcheck_seed():
    args = (torch.randn(2, 3, 8, requires_grad=True), torch.randn(6, 8), torch.randn(6),
            torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True), torch.tensor(2.0), 0.5,
            torch.float32, torch.float32, torch.float32, 1, 1, False, False)
    torch.library.opcheck(lora_linear, args, {"fast_rng": True, "seed": torch.tensor(5, dtype=torch.int64)})
