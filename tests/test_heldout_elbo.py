"""The held-out ELBO (evaluation/elbo.py) on a trained tiny LLaDA: reproducible, unbiased
against the plain Monte-Carlo estimator (and against the exact bound, by enumeration),
a deliberately biased variant caught by the same test, and a lower standard error than
plain draws at equal cost."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from helpers import PAIRS, one_torch_thread

from dllm_plugin.data.sft import TokenizeOptions, tokenize_messages
from dllm_plugin.diffusion.loss import IGNORE_INDEX
from dllm_plugin.evaluation.elbo import Row, combine, estimate_rows, heldout_elbo
from dllm_plugin.generate import load_for_generation

K = 8  # draws per row of our estimator
SEEDS = 20  # independent repetitions of it
PLAIN_DRAWS = 800  # plain Monte-Carlo draws per row


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(trained_llada):
    """The merged model; the trained answers and, as held-out-like rows, wrong answers."""
    model, tokenizer, ids, method = load_for_generation(str(trained_llada["merged"]), None, "cpu")
    answers = [c for _, c in PAIRS]
    pairs = PAIRS + [(p, answers[(i + 1) % len(PAIRS)]) for i, (p, _) in enumerate(PAIRS)]
    opts = TokenizeOptions(64, "right", True)
    rows = []
    for prompt, completion in pairs:
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        features = tokenize_messages(messages, tokenizer, opts)
        rows.append(Row(features["input_ids"], features["labels"]))
    return model, ids, method.trainer_class(), rows


def estimates(setup, scorer=None) -> list:
    """Our estimator with SEEDS different seeds."""
    model, ids, own, rows = setup
    return [
        heldout_elbo(model, scorer or own, rows, ids, mc_samples=K, seed=seed, batch_size=16)
        for seed in range(SEEDS)
    ]


@pytest.fixture(scope="module")
def ours(setup) -> list:
    return estimates(setup)


def masked_ce(model, ids, scorer, input_ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [b, l] of the clean tokens at masked positions (zero elsewhere), from
    full logits: written here, independently of the code under test."""
    noised = torch.where(masked, torch.full_like(input_ids, ids.mask_id), input_ids)
    with torch.no_grad():
        logits = model(input_ids=noised).logits.float()
    if scorer.shift_logits:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")
    return ce * masked


@pytest.fixture(scope="module")
def plain(setup) -> list[list[float]]:
    """Per row, PLAIN_DRAWS draws of the plain estimator, as the loss draws its noise:
    t ~ U[eps, 1), each answer token masked with probability t, weight 1/t. (eps = 1e-3
    keeps its variance finite; the part of the bound below eps that it leaves out is
    about eps times the bound: far below its standard error.)"""
    model, ids, scorer, rows = setup
    eps = 1e-3
    gen = torch.Generator().manual_seed(0)
    draws = []
    for row in rows:
        x = torch.tensor([row.input_ids])
        scored = torch.tensor([row.labels]) != IGNORE_INDEX
        values: list[float] = []
        for start in range(0, PLAIN_DRAWS, 250):
            n = min(250, PLAIN_DRAWS - start)
            t = eps + (1 - eps) * torch.rand(n, generator=gen, dtype=torch.float64)
            u = torch.rand(n, x.shape[1], generator=gen, dtype=torch.float64)
            masked = (u < t[:, None]) & scored
            ce = masked_ce(model, ids, scorer, x.repeat(n, 1), masked)
            values += (ce.sum(1).double() / t).tolist()
        draws.append(values)
    return draws


def tokens(rows) -> int:
    return sum(sum(1 for y in r.labels if y != IGNORE_INDEX) for r in rows)


def plain_mean_and_se(plain, rows) -> tuple[float, float]:
    n = tokens(rows)
    mean = sum(statistics.mean(d) for d in plain) / n
    se = math.sqrt(sum(statistics.variance(d) / len(d) for d in plain)) / n
    return mean, se


def z_against_plain(values: list[float], plain, rows) -> float:
    """(mean of the repeated estimates - plain mean) in standard errors of the difference."""
    plain_mean, plain_se = plain_mean_and_se(plain, rows)
    se = statistics.stdev(values) / math.sqrt(len(values))
    return (statistics.mean(values) - plain_mean) / math.hypot(se, plain_se)


def test_identical_across_evaluations_and_batchings(setup):
    model, ids, scorer, rows = setup
    first = heldout_elbo(model, scorer, rows, ids, mc_samples=K, seed=7, batch_size=16)
    again = heldout_elbo(model, scorer, rows, ids, mc_samples=K, seed=7, batch_size=16)
    assert first == again
    other_batches = heldout_elbo(model, scorer, rows, ids, mc_samples=K, seed=7, batch_size=3)
    assert other_batches.nll_per_token == pytest.approx(first.nll_per_token, rel=1e-5)
    # a row's value does not depend on which rows are evaluated with it
    alone = estimate_rows(model, scorer, rows[:1], ids, mc_samples=K, seed=7, batch_size=16)
    together = estimate_rows(model, scorer, rows, ids, mc_samples=K, seed=7, batch_size=16)
    assert alone[0].nll == pytest.approx(together[0].nll, rel=1e-5)
    assert first.tokens == tokens(rows) and first.rows == len(rows)


class BernoulliMasks:
    """A deliberately biased variant: each answer token masked with probability u (the
    time form's masks) but weighted L / l by the realised count (the count form's weight).
    Its expectation is L / (L + 1) times the bound."""

    def __init__(self, scorer):
        self.scorer = scorer

    def model_view(self, *args):
        return self.scorer.model_view(*args)

    def nll_bound(self, model, head, input_ids, labels, u, generators, ids):
        scored = labels != IGNORE_INDEX
        masked = torch.zeros_like(scored)
        for row, gen in enumerate(generators):
            draw = torch.rand(scored.shape[1], generator=gen, dtype=torch.float64)
            masked[row] = (draw < float(u[row])) & scored[row]
        weight = scored.sum(1, keepdim=True) / masked.sum(1, keepdim=True).clamp_min(1)
        ce = masked_ce(model, ids, self.scorer, input_ids, masked)
        return (ce * weight).sum(1)


def test_unbiased_against_the_plain_estimator_and_a_biased_variant_fails(setup, plain, ours):
    rows = setup[3]
    z = z_against_plain([e.nll_per_token for e in ours], plain, rows)
    biased = estimates(setup, BernoulliMasks(setup[2]))
    z_biased = z_against_plain([e.nll_per_token for e in biased], plain, rows)
    print(f"plain {plain_mean_and_se(plain, rows)}, z ours {z:.2f}, z biased {z_biased:.2f}")
    assert abs(z) < 4
    assert abs(z_biased) > 4


def exact_bound(model, ids, scorer, row: Row) -> float:
    """The bound by enumeration: sum over l of 1/l times the mean over all l-subsets S of
    the answer of sum_{i in S} CE_i (equal to the time form for every schedule)."""
    x = torch.tensor([row.input_ids])
    positions = [i for i, y in enumerate(row.labels) if y != IGNORE_INDEX]
    total = 0.0
    for count in range(1, len(positions) + 1):
        subsets = list(itertools.combinations(positions, count))
        masked = torch.zeros(len(subsets), x.shape[1], dtype=torch.bool)
        for j, subset in enumerate(subsets):
            masked[j, list(subset)] = True
        ce = masked_ce(model, ids, scorer, x.repeat(len(subsets), 1), masked)
        total += float(ce.sum()) / len(subsets) / count
    return total


def test_mean_equals_the_exact_bound_by_enumeration(setup, plain, ours):
    model, ids, scorer, rows = setup
    exact = sum(exact_bound(model, ids, scorer, row) for row in rows) / tokens(rows)
    values = [e.nll_per_token for e in ours]
    se = statistics.stdev(values) / math.sqrt(len(values))
    assert abs(statistics.mean(values) - exact) < 4 * se
    plain_mean, plain_se = plain_mean_and_se(plain, rows)
    assert abs(plain_mean - exact) < 4 * plain_se  # the plain reference agrees too


def test_lower_standard_error_than_plain_draws_at_equal_cost(setup, plain, ours):
    """K stratified draws per row against K plain draws per row (the same forwards)."""
    rows = setup[3]
    ours_sd = statistics.stdev(e.nll_per_token for e in ours)
    plain_sd = math.sqrt(sum(statistics.variance(d) for d in plain) / K) / tokens(rows)
    rms_reported = math.sqrt(statistics.mean(e.standard_error**2 for e in ours))
    print(f"sd ours {ours_sd:.4f}, plain {plain_sd:.4f}, reported se {rms_reported:.4f}")
    assert ours_sd < plain_sd / 2
    # the reported standard error estimates the spread it claims
    assert 0.5 < rms_reported / ours_sd < 2.0


def test_combine_adds_row_variances():
    from dllm_plugin.evaluation.elbo import RowBound

    estimate = combine([RowBound(2.0, 0.04, 4), RowBound(6.0, 0.05, 4), RowBound(0, 0, 0)], 8)
    assert estimate.nll_per_token == pytest.approx(1.0)
    assert estimate.standard_error == pytest.approx(math.sqrt(0.09) / 8)
    assert estimate.rows == 2 and estimate.tokens == 8
