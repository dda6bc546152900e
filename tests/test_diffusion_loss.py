"""Exact checks of the diffusion loss math against dense / autograd references."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dllm_plugin.diffusion.cart import cart_weights
from dllm_plugin.diffusion.chunked_ce import chunked_linear_cross_entropy
from dllm_plugin.diffusion.loss import (
    full_logits_cross_entropy,
    loss_weights,
    normaliser,
    parse_loss_weight_type,
)
from dllm_plugin.diffusion.noise import sample_masks, sample_timesteps
from dllm_plugin.diffusion.schedules import CosineSchedule, LinearSchedule, get_schedule

# ------------------------------------------------------------------------- helpers


class OpRecorder(TorchDispatchMode):
    """Records the largest tensor any aten op produces and counts matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.matmuls += 1
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def dense_cart(masked: torch.Tensor, p: float) -> torch.Tensor:
    """The definition, with the quadratic l x l matrix, in float64."""
    length = masked.shape[1]
    idx = torch.arange(length, dtype=torch.float64)
    dist = (idx[None, :] - idx[:, None]).abs()
    geo = torch.where(dist > 0, 0.5 * p * (1 - p) ** (dist - 1), torch.zeros_like(dist))
    return ((~masked).double() @ geo) * masked


def cart_at(masked_row: torch.Tensor, i: int, p: float) -> float:
    """w_i for one position straight from the sum, in float64."""
    if not masked_row[i]:
        return 0.0
    j = torch.nonzero(~masked_row).flatten().double()
    return float((0.5 * p * (1 - p) ** ((j - i).abs() - 1)).sum())


# ---------------------------------------------------------------------------- CART


@pytest.mark.parametrize("length", [1, 2, 7, 64, 513])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_cart_matches_dense_definition(length: int, p: float) -> None:
    gen = torch.Generator().manual_seed(length * 31 + int(p * 100))
    masked = torch.rand(3, length, generator=gen) < 0.6
    got = cart_weights(masked, p)
    assert got.dtype == torch.float32 and got.shape == masked.shape
    want = dense_cart(masked, p).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30)


def test_cart_hand_computed() -> None:
    masked = torch.tensor([[True, False, True, True]])
    # p = 0.5: neighbour at distance 1 -> 0.25, distance 2 -> 0.125.
    assert cart_weights(masked, 0.5).tolist() == [[0.25, 0.0, 0.25, 0.125]]


@pytest.mark.parametrize("masked_value", [True, False])
@pytest.mark.parametrize("length", [1, 5, 300])
def test_cart_all_or_nothing_masked_is_zero(masked_value: bool, length: int) -> None:
    masked = torch.full((2, length), masked_value)
    assert torch.equal(cart_weights(masked, 0.3), torch.zeros(2, length))


def test_cart_rows_are_independent() -> None:
    masked = torch.rand(4, 700, generator=torch.Generator().manual_seed(1)) < 0.5
    batch = cart_weights(masked, 0.3)
    for row in range(4):
        torch.testing.assert_close(batch[row : row + 1], cart_weights(masked[row : row + 1], 0.3))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, None])
def test_cart_rejects_bad_p(bad) -> None:
    with pytest.raises(ValueError, match="geo_p"):
        cart_weights(torch.ones(1, 3, dtype=torch.bool), bad)


@pytest.mark.parametrize("p", [0.05, 0.9])
def test_cart_long_sequence_fast_stable_and_exact(p: float) -> None:
    length = 32768
    masked = torch.rand(2, length, generator=torch.Generator().manual_seed(7)) < 0.5
    masked[1, :] = True
    masked[1, 0] = False  # one clean token: w_i = 0.5 p (1-p)**(i-1), underflowing to 0
    start = time.perf_counter()
    got = cart_weights(masked, p)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"cart_weights took {elapsed:.2f}s at l=32768"
    assert torch.isfinite(got).all()
    for i in [0, 1, 2, 100, 4095, 4096, 16383, 20000, length - 2, length - 1]:
        want = cart_at(masked[0], i, p)
        assert got[0, i].item() == pytest.approx(want, rel=1e-5, abs=1e-30), i
    for i in [1, 2, 50, 300, 5000, length - 1]:
        want = 0.5 * p * (1 - p) ** (i - 1)
        assert got[1, i].item() == pytest.approx(want, rel=1e-5, abs=1e-38), i


def test_cart_memory_is_linear() -> None:
    length = 4096
    masked = torch.rand(2, length, generator=torch.Generator().manual_seed(3)) < 0.5
    with OpRecorder() as rec:
        cart_weights(masked, 0.3)
    assert rec.largest < 4 * 2 * length  # nothing close to l * l = 16.8M values


# ------------------------------------------------------------------ loss weight type


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("scheduler", ("scheduler", None)),
        ("uniform", ("uniform", None)),
        ("cart[geo_p:0.3]", ("cart", 0.3)),
        (" cart[geo_p:0.05] ", ("cart", 0.05)),
        ("cart[geo_p:.9]", ("cart", 0.9)),
    ],
)
def test_parse_loss_weight_type_good(value: str, expected) -> None:
    assert parse_loss_weight_type(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "cart",
        "cart[]",
        "cart[geo_p:]",
        "cart[geo_p:0]",
        "cart[geo_p:1]",
        "cart[geo_p:1.5]",
        "cart[geo_p:-0.3]",
        "cart[geo_p:abc]",
        "cart[geo_p:nan]",
        "cart[p:0.3]",
        "cart(geo_p:0.3)",
        "Scheduler",
        "mdlm",
        None,
    ],
)
def test_parse_loss_weight_type_bad(value) -> None:
    with pytest.raises(ValueError) as err:
        parse_loss_weight_type(value)
    message = str(err.value)
    for form in ("scheduler", "uniform", "cart[geo_p:P]", repr(value)):
        assert form in message


# ------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()])
def test_schedule_derivative_and_weight_by_finite_differences(schedule) -> None:
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.alpha_prime(t), numeric, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        schedule.weight(t), -numeric / (1 - schedule.alpha(t)), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(schedule.mask_prob(t), 1 - schedule.alpha(t))


def test_linear_schedule_values() -> None:
    s = get_schedule("linear")
    t = torch.tensor([0.25, 0.5, 1.0])
    assert s.alpha(t).tolist() == [0.75, 0.5, 0.0]
    assert s.mask_prob(t).tolist() == [0.25, 0.5, 1.0]
    assert s.weight(t).tolist() == [4.0, 2.0, 1.0]


def test_cosine_schedule_values() -> None:
    s = get_schedule("cosine")
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        s.alpha(t), torch.tensor([1.0, 1 - math.sqrt(0.5), 0.0], dtype=torch.float64)
    )
    assert s.weight(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(math.pi / 2)


def test_get_schedule_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        get_schedule("sigmoid")
    assert isinstance(get_schedule(" Cosine "), CosineSchedule)


# -------------------------------------------------------------------- loss weights


def test_loss_weights_kinds() -> None:
    masked = torch.tensor([[True, False, True], [False, True, True]])
    t = torch.tensor([0.5, 0.25])
    sched = LinearSchedule()
    assert loss_weights("scheduler", t, masked, sched).tolist() == [
        [2.0, 0.0, 2.0],
        [0.0, 4.0, 4.0],
    ]
    assert loss_weights("uniform", t, masked, sched).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    torch.testing.assert_close(
        loss_weights("cart", t, masked, sched, 0.3), cart_weights(masked, 0.3)
    )
    with pytest.raises(ValueError, match="geo_p"):
        loss_weights("cart", t, masked, sched, None)
    with pytest.raises(ValueError, match="accepted"):
        loss_weights("elbo", t, masked, sched)


# ------------------------------------------------------------------- normalisation

WEIGHTED = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
MASKABLE = torch.tensor(
    [[True, True, True, False], [True, False, False, False], [False, False, False, False]]
)


def normalised(weighted, maskable, kind, **kw):
    """The loss the trainers compute: sum(weights * normaliser * CE) with CE = 1."""
    return (weighted * normaliser(kind, maskable, **kw)).sum()


def test_normalise_token() -> None:
    assert normalised(WEIGHTED, MASKABLE, "token").item() == 1.5  # 6 / 4
    assert normalised(WEIGHTED, MASKABLE, "token", global_items=12).item() == 0.5
    assert normalised(WEIGHTED, MASKABLE, "token", global_items=torch.tensor(3)).item() == 2.0
    # DDP averages over processes: the local loss carries the process count
    assert normalised(WEIGHTED, MASKABLE, "token", global_items=12, processes=2).item() == 1.0
    # without the global count (evaluation), the local count times the accumulation steps
    assert normalised(WEIGHTED, MASKABLE, "token", accumulation=2).item() == 0.75


def test_normalise_sequence_and_batch() -> None:
    # rows: 3/3, 3/1, empty row contributes 0 -> (1 + 3 + 0) / 3
    assert normalised(WEIGHTED, MASKABLE, "sequence").item() == pytest.approx(4 / 3)
    assert normalised(WEIGHTED, MASKABLE, "batch").item() == 2.0  # 6 / 3
    assert normalised(WEIGHTED, MASKABLE, "batch", accumulation=4).item() == 0.5


def test_normalise_empty_is_zero_not_nan_and_differentiable() -> None:
    weighted = torch.zeros(2, 3, requires_grad=True)
    maskable = torch.zeros(2, 3, dtype=torch.bool)
    for kind in ("token", "sequence", "batch"):
        loss = normalised(weighted, maskable, kind)
        assert loss.item() == 0.0
        loss.backward()


def test_normalise_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="'token', 'sequence', 'batch'"):
        normaliser("mean", MASKABLE)


# ------------------------------------------------------------------------- noising


def test_sample_timesteps_range_and_reproducible() -> None:
    t = sample_timesteps(20000, 0.5, "cpu", torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert t.min() >= 0.5 and t.max() < 1.0
    assert abs(t.mean().item() - 0.75) < 0.01
    again = sample_timesteps(20000, 0.5, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(ValueError):
        sample_timesteps(2, 1.0, "cpu", None)


def test_sample_masks_respects_maskable_and_probability() -> None:
    gen = torch.Generator().manual_seed(0)
    maskable = torch.rand(4, 5000, generator=gen) < 0.7
    prob = torch.tensor([0.0, 0.25, 0.75, 1.0])
    masks = sample_masks(maskable, prob, torch.Generator().manual_seed(1))
    assert not (masks & ~maskable).any()
    assert not masks[0].any()
    assert torch.equal(masks[3], maskable[3])
    for row in (1, 2):
        rate = masks[row].sum().item() / maskable[row].sum().item()
        assert abs(rate - prob[row].item()) < 0.03


def test_sample_masks_reproducible_and_rng_independent_of_maskable() -> None:
    prob = torch.tensor([0.5, 0.5])
    a = torch.rand(2, 64, generator=torch.Generator().manual_seed(2)) < 0.5
    b = torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) < 0.5
    m1 = sample_masks(a, prob, torch.Generator().manual_seed(9))
    m2 = sample_masks(a, prob, torch.Generator().manual_seed(9))
    m3 = sample_masks(b, prob, torch.Generator().manual_seed(9))
    assert torch.equal(m1, m2)
    assert torch.equal(m1 & b, m3 & a)  # same draws, different maskable sets


# ------------------------------------------------------------- chunked cross-entropy


def _problem(n=64, d=8, vocab=200, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, d, generator=gen, requires_grad=True)
    b = torch.randn(vocab, generator=gen, requires_grad=True) if bias else None
    targets = torch.randint(vocab, (n,), generator=gen)
    if n > 3:
        targets[3] = -100
    token_weights = torch.rand(n, generator=gen) * 3
    return hidden, weight, b, targets, token_weights


def _grads(params):
    out = [None if p is None or p.grad is None else p.grad.clone() for p in params]
    for p in params:
        if p is not None:
            p.grad = None
    return out


def _reference(hidden, weight, bias, targets, token_weights, scale=2.0):
    total, ce = full_logits_cross_entropy(F.linear(hidden, weight, bias), targets, token_weights)
    (scale * total).backward()
    return total.detach(), ce, _grads([hidden, weight, bias])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_ce_matches_full_logits(chunk_size: int, bias: bool) -> None:
    hidden, weight, b, targets, tw = _problem(bias=bias)
    want_total, want_ce, want_grads = _reference(hidden, weight, b, targets, tw)
    total, ce = chunked_linear_cross_entropy(hidden, weight, b, targets, tw, chunk_size)
    (2.0 * total).backward()
    got_grads = _grads([hidden, weight, b])
    assert total.dim() == 0 and total.dtype == torch.float32
    assert ce.dtype == torch.float32 and not ce.requires_grad
    assert ce[3].item() == 0.0  # ignore_index
    torch.testing.assert_close(total.detach(), want_total, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ce, want_ce, rtol=1e-6, atol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_ce_empty() -> None:
    hidden, weight, b, _, _ = _problem(n=0)
    total, ce = chunked_linear_cross_entropy(
        hidden, weight, b, torch.zeros(0, dtype=torch.long), torch.zeros(0), 16
    )
    assert total.item() == 0.0 and ce.shape == (0,)
    total.backward()
    assert hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_chunked_ce_frozen_head_skips_weight_grad() -> None:
    hidden, weight, _, targets, tw = _problem(bias=False)
    weight.requires_grad_(False)
    _, _, (want_h, _, _) = _reference(hidden, weight, None, targets, tw)
    with OpRecorder() as rec:
        total, _ = chunked_linear_cross_entropy(hidden, weight, None, targets, tw, 16)
        (2.0 * total).backward()
    assert rec.matmuls == 2 * 4  # logits + grad_hidden per chunk, no grad_weight matmul
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, want_h, rtol=1e-5, atol=1e-5)


def test_chunked_ce_no_grad_does_no_gradient_work() -> None:
    hidden, weight, b, targets, tw = _problem()
    want_total, want_ce, _ = _reference(hidden, weight, b, targets, tw)
    with torch.no_grad(), OpRecorder() as rec:
        total, ce = chunked_linear_cross_entropy(hidden, weight, b, targets, tw, 16)
    assert rec.matmuls == 4
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ce, want_ce, rtol=1e-6, atol=1e-5)


def test_chunked_ce_never_materialises_full_logits() -> None:
    n, vocab, chunk = 64, 200, 16
    hidden, weight, b, targets, tw = _problem(n=n, vocab=vocab)
    with OpRecorder() as rec:
        total, _ = chunked_linear_cross_entropy(hidden, weight, b, targets, tw, chunk)
        total.backward()
    assert rec.largest <= chunk * vocab < n * vocab
    with OpRecorder() as ref:  # the recorder does see the reference's [n, V] logits
        full_logits_cross_entropy(F.linear(hidden, weight, b), targets, tw)[0].backward()
    assert ref.largest >= n * vocab


def test_chunked_ce_cpu_bf16_autocast_close_to_fp32() -> None:
    hidden, weight, b, targets, tw = _problem()
    want_total, _, want_grads = _reference(hidden, weight, b, targets, tw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, ce = chunked_linear_cross_entropy(hidden, weight, b, targets, tw, 16)
    (2.0 * total).backward()
    got_grads = _grads([hidden, weight, b])
    assert total.dtype == torch.float32 and ce.dtype == torch.float32
    torch.testing.assert_close(total.detach(), want_total, rtol=3e-2, atol=1e-2)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.1, atol=0.1)


def test_chunked_ce_bf16_inputs_give_bf16_grads() -> None:
    hidden, weight, _, targets, tw = _problem(bias=False)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    total, _ = chunked_linear_cross_entropy(hb, wb, None, targets, tw, 16)
    total.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    want_total, _, _ = _reference(hidden, weight, None, targets, tw)
    torch.testing.assert_close(total.detach(), want_total, rtol=3e-2, atol=1e-2)


def test_chunked_ce_rejects_bad_shapes() -> None:
    hidden, weight, b, targets, tw = _problem()
    with pytest.raises(ValueError, match="targets"):
        chunked_linear_cross_entropy(hidden, weight, b, targets[:-1], tw)
    with pytest.raises(ValueError, match="hidden"):
        chunked_linear_cross_entropy(hidden[:, :-1], weight, b, targets, tw)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_cross_entropy(hidden, weight, b, targets, tw, 0)
