"""Stratified timesteps and complementary masking: what they draw, and that the loss they
estimate is the uniform estimator's (checked against an exact expectation computed by
brute force here, over every mask pattern, with no project loss helper).
"""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import combinations

import pytest
import torch
from helpers import tiny_bert_mlm

from dllm_plugin.diffusion.noise import ExampleSlot, NoiseKeys, NoiseOptions, draw_noise
from dllm_plugin.diffusion.schedules import get_schedule
from dllm_plugin.trainers import MDLMTrainer, MDLMTrainingArguments

pytestmark = pytest.mark.usefixtures("single_thread")

V, MASK = 40, 39
EPS = 0.05  # t >= 0.05: weights <= 20, so 400 draws give a tight mean


def opts(**kw) -> NoiseOptions:
    return NoiseOptions(get_schedule(kw.pop("schedule", "linear")), EPS, **kw)


# ---- what the draws are -----------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_complementary_pairs_partition_the_maskable_tokens(schedule):
    g = torch.Generator().manual_seed(0)
    maskable = torch.rand(6, 40, generator=g) < 0.7
    slots = [ExampleSlot(r) for r in range(6)]
    draw = draw_noise(
        maskable, slots, NoiseKeys(3, 0, 7), opts(schedule=schedule, complementary=True)
    )
    first, second = draw.masked[:6], draw.masked[6:]
    assert draw.copies == 2 and draw.masked.shape == (12, 40)
    assert torch.equal(first | second, maskable) and not (first & second).any()
    t, t2 = draw.t[:6].double(), draw.t[6:].double()
    assert ((t >= EPS) & (t <= 1 - EPS)).all()
    sched = get_schedule(schedule)
    # the copy is a draw at the time whose mask probability is 1 - p(t)
    torch.testing.assert_close(sched.mask_prob(t2), 1 - sched.mask_prob(t))
    if schedule == "linear":
        torch.testing.assert_close(t2, 1 - t)
        assert (draw.ratio == 1).all()


def strata_of(t: torch.Tensor, rows: int) -> list[int]:
    return ((t.double() - EPS) / (1 - EPS) * rows).floor().long().tolist()


def test_stratified_timesteps_cover_each_stratum_once_per_global_batch():
    """8 global rows split over processes/accumulation in three ways: the same times,
    and the rows' strata are a permutation of 0..7, a different one each step."""
    rows, length = 8, 5
    maskable = torch.ones(rows, length, dtype=torch.bool)
    options = opts(sampling="stratified", strata=rows)
    perms = []
    for step in range(3):
        keys = NoiseKeys(11, 0, step)
        per_layout = []
        for micro in (8, 4, 2):  # micro-batch sizes: 1 x 8, 2 x 4, 4 x 2
            t = torch.cat(
                [
                    draw_noise(
                        maskable[first : first + micro],
                        [ExampleSlot(first + r) for r in range(micro)],
                        keys,
                        options,
                    ).t
                    for first in range(0, rows, micro)
                ]
            )
            per_layout.append(t)
        assert torch.equal(per_layout[0], per_layout[1]) and torch.equal(
            per_layout[0], per_layout[2]
        )
        strata = strata_of(per_layout[0], rows)
        assert sorted(strata) == list(range(rows))
        perms.append(strata)
    assert perms[0] != perms[1] != perms[2]


def test_stratified_packed_rows_split_their_stratum_among_their_examples():
    rows, per_row = 4, 3
    slots = [ExampleSlot(r, j, per_row) for r in range(rows) for j in range(per_row)]
    maskable = torch.ones(len(slots), 4, dtype=torch.bool)
    draw = draw_noise(maskable, slots, NoiseKeys(2, 0, 0), opts(sampling="stratified", strata=rows))
    fine = strata_of(draw.t, rows * per_row)  # 12 sub-strata, each once
    assert sorted(fine) == list(range(rows * per_row))
    coarse = strata_of(draw.t, rows)
    for r in range(rows):  # a row's examples share the row's stratum
        assert len({coarse[r * per_row + j] for j in range(per_row)}) == 1


# ---- unbiased: each estimator's mean loss is the uniform estimator's expectation ------------
ROWS = [  # (ids, labels): a prompt of -100, then 3 and 5 maskable tokens
    ([5, 6, 7, 8, 9, 10, 11, 12], [-100] * 5 + [9, 10, 11, 12][:3]),
    ([13, 14, 15, 16, 17, 18, 19, 20], [-100] * 3 + [16, 17, 18, 19, 20]),
]


def batch() -> dict[str, torch.Tensor]:
    labels = [lab + [-100] * (8 - len(lab)) for _, lab in ROWS]
    return {
        "input_ids": torch.tensor([ids for ids, _ in ROWS]),
        "labels": torch.tensor(labels),
    }


def s_integral(k: int, m: int, lo: float, hi: float) -> float:
    """integral from lo to hi of s^(k-1) (1-s)^m ds, exactly (binomial expansion)."""
    return sum(
        math.comb(m, j) * (-1) ** j * (hi ** (k + j) - lo ** (k + j)) / (k + j)
        for j in range(m + 1)
    )


def expected_loss(model, schedule: str, complementary: bool = False) -> float:
    """The exact expectation of (1/N) sum_rows sum_masked w(t) CE over t and the masks.

    A pattern S of k masked tokens out of a row's n has probability p^k (1-p)^(n-k) with
    p = mask_prob(t); with w = -alpha'/(1-alpha), w dt = dp / p, so a time range [a, b]
    contributes the integral of s^(k-1) (1-s)^(n-k) over [p(a), p(b)]. Uniform and
    stratified: t ~ U[eps, 1). Complementary: t ~ U[eps, 1 - eps] and its copy, whose mask
    probability is 1 - p(t), importance-weighted back to a uniform time: the mean of the
    two ranges [p(eps), p(1-eps)] and [1 - p(1-eps), 1 - p(eps)]; for small eps both are
    the uniform estimator's integral without a sliver of width ~eps at the end.
    Every pattern is run through the model.
    """
    sched = get_schedule(schedule)
    p_lo, p_hi = (
        float(sched.mask_prob(torch.tensor(x, dtype=torch.float64))) for x in (EPS, 1 - EPS)
    )
    total, n_total = 0.0, 0
    for ids, labels in ROWS:
        maskable = [i for i, lab in enumerate(labels) if lab != -100]
        n = len(maskable)
        n_total += n
        for k in range(1, n + 1):
            if complementary:
                weight = (
                    s_integral(k, n - k, p_lo, p_hi) + s_integral(k, n - k, 1 - p_hi, 1 - p_lo)
                ) / (2 * (1 - 2 * EPS))
            else:
                weight = s_integral(k, n - k, p_lo, 1.0) / (1 - EPS)
            for pattern in combinations(maskable, k):
                noised = [MASK if i in pattern else tok for i, tok in enumerate(ids)]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([noised])).logits[0].double()
                logp = torch.log_softmax(logits, -1)
                total += weight * sum(-logp[i, ids[i]].item() for i in pattern)
    return total / n_total


class CopyWithFirstWeight(MDLMTrainer):
    """A deliberately biased estimator: each complementary copy weighted with its
    original's ELBO weight 1/t instead of its own 1/(1 - t)."""

    def draw_noise(self, *args, **kwargs):
        draw = super().draw_noise(*args, **kwargs)
        n = draw.t.shape[0] // 2
        return replace(draw, t=torch.cat([draw.t[:n], draw.t[:n]]))


def sampled_losses(tmp_path, model, draws: int, cls=MDLMTrainer, **kw) -> torch.Tensor:
    args = MDLMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, seed=3,
                                 per_device_train_batch_size=2, time_epsilon=EPS, **kw)  # fmt: skip
    trainer = cls(model=model, args=args, mask_token_id=MASK)
    inputs = batch()
    out = []
    with torch.no_grad():
        for step in range(draws):
            trainer.state.global_step = step  # a new key per draw
            out.append(trainer.compute_loss(model, inputs).item())
    return torch.tensor(out, dtype=torch.float64)


def within_4_standard_errors(samples: torch.Tensor, expected: float) -> bool:
    se = samples.std().item() / math.sqrt(len(samples))
    print(f"mean {samples.mean().item():.4f} expected {expected:.4f} se {se:.4f}")
    return abs(samples.mean().item() - expected) < 4 * se


@pytest.fixture(scope="module")
def fixed_model():
    torch.manual_seed(0)
    return tiny_bert_mlm(V).train()  # dropout-free: train mode changes nothing


@pytest.mark.parametrize(
    ("schedule", "estimator"),
    [
        ("linear", {}),
        ("linear", {"timestep_sampling": "stratified"}),
        ("linear", {"complementary_masking": True}),
        ("cosine", {"complementary_masking": True, "timestep_sampling": "stratified"}),
    ],
)
def test_estimator_mean_matches_the_exact_expected_loss(tmp_path, fixed_model, schedule, estimator):
    expected = expected_loss(fixed_model, schedule, estimator.get("complementary_masking", False))
    uniform = expected_loss(fixed_model, schedule)
    assert expected == pytest.approx(uniform, rel=2 * EPS)  # the same integral, up to O(eps)
    losses = sampled_losses(tmp_path, fixed_model, 400, noise_schedule=schedule, **estimator)
    assert within_4_standard_errors(losses, expected)


def test_a_biased_estimator_fails_the_same_check(tmp_path, fixed_model):
    expected = expected_loss(fixed_model, "linear", complementary=True)
    losses = sampled_losses(
        tmp_path, fixed_model, 400, CopyWithFirstWeight, complementary_masking=True
    )
    assert not within_4_standard_errors(losses, expected)


def test_lower_variance_than_uniform(tmp_path, fixed_model):
    """Same mean, less spread: the point of both estimators."""
    uniform = sampled_losses(tmp_path, fixed_model, 400)
    stratified = sampled_losses(tmp_path, fixed_model, 400, timestep_sampling="stratified")
    complementary = sampled_losses(tmp_path, fixed_model, 400, complementary_masking=True)
    print(f"std uniform {uniform.std():.3f} stratified {stratified.std():.3f} "
          f"complementary {complementary.std():.3f}")  # fmt: skip
    assert stratified.std() < uniform.std() and complementary.std() < uniform.std()
