"""The held-out ELBO: a reproducible, low-variance estimate of the NLL bound per answer token.

Each scored row gets `mc_samples` noise draws. Draw d falls in stratum d // 2 of
mc_samples / 2 equal strata of [0, 1): two independent draws per stratum. The stratified
position u becomes the method's noise level (for masked diffusion: how many answer tokens
are masked), so most of the spread that comes from the noise level is gone, and the pairs
give an unbiased estimate of the variance that is left, hence a standard error. Every draw
comes from a generator keyed by (seed, the row's tokens, draw index): the same at every
evaluation and for every job with the same seed and data, so curves compare across
checkpoints and jobs, and a row's estimate does not depend on its neighbours.

The method supplies the per-row bound (`nll_bound` on its Trainer class, built from the
loss code it trains with); this module only draws, batches and averages.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..diffusion.loss import IGNORE_INDEX
from ..diffusion.masked_head import HeadVerdict
from ..models.families import TokenIds
from ..rng import keyed_generator
from ..sampling import eval_mode

PHASE = "heldout-elbo"  # the key part that separates these draws from the training noise


class BoundScorer(Protocol):
    """What a method's Trainer class provides to score a bound (see trainers.py)."""

    def model_view(
        self, input_ids: torch.Tensor, labels: torch.Tensor, bos_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def nll_bound(
        self,
        model: nn.Module,
        head: nn.Linear | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        u: torch.Tensor,
        generators: Sequence[torch.Generator],
        ids: TokenIds,
    ) -> torch.Tensor: ...


def has_bound(scorer: Any) -> bool:
    """Whether a method's Trainer class scores a masked-diffusion NLL bound. DiffusionGemma's
    (uniform-token corruption, self-conditioning, an encoder loss) does not: there is no
    masked-diffusion ELBO of it to estimate."""
    return callable(getattr(scorer, "nll_bound", None))


@dataclass(frozen=True)
class Row:
    """A sequence and its scored positions (labels -100 elsewhere)."""

    input_ids: list[int]
    labels: list[int]


def rows_of(features: Any) -> list[Row]:
    """The rows of a tokenised dataset (data/sft.py: input_ids, labels)."""
    return [
        Row(list(x), list(y))
        for x, y in zip(features["input_ids"], features["labels"], strict=True)
    ]


@dataclass(frozen=True)
class RowBound:
    """One row's estimate: the negative ELBO of its scored tokens (nats), the Monte-Carlo
    variance of that estimate, and the number of scored tokens."""

    nll: float
    variance: float
    tokens: int


@dataclass(frozen=True)
class ElboEstimate:
    """The held-out NLL bound per scored token and its Monte-Carlo standard error."""

    nll_per_token: float
    standard_error: float
    tokens: int
    rows: int
    mc_samples: int

    def metrics(self) -> dict[str, float]:
        return {"nll_bound": self.nll_per_token, "nll_bound_se": self.standard_error}

    def describe(self) -> str:
        return (
            f"NLL bound {self.nll_per_token:.4f} ± {self.standard_error:.4f} nats per answer "
            f"token ({self.rows} rows, {self.tokens} tokens, {self.mc_samples} draws per row)"
        )


def check_mc_samples(mc_samples: int) -> None:
    if mc_samples < 2 or mc_samples % 2:
        raise ValueError(f"mc_samples must be an even number >= 2, got {mc_samples}")


def stratified_draw(seed: int, key: object, draw: int, mc_samples: int) -> tuple[float, Any]:
    """(u, generator) of one draw: u uniform in stratum draw // 2; the generator, keyed by
    (seed, key, draw), then serves the method's other choices (which tokens to mask)."""
    generator = keyed_generator(seed, PHASE, key, draw)
    strata = mc_samples // 2
    u = (draw // 2 + float(torch.rand((), generator=generator, dtype=torch.float64))) / strata
    return min(u, math.nextafter(1.0, 0.0)), generator


def estimate_rows(
    model: nn.Module,
    scorer: BoundScorer,
    rows: Sequence[Row],
    ids: TokenIds,
    *,
    mc_samples: int,
    seed: int,
    batch_size: int,
    keys: Sequence[object] | None = None,
    verdict: HeadVerdict | None = None,
) -> list[RowBound]:
    """Each row's bound estimate. Draws of rows of equal length share forwards, without
    padding, so a row's value does not depend on what it is batched with. `keys` name the
    rows' draws (default: their token ids)."""
    check_mc_samples(mc_samples)
    device = _device(model)
    views = [_model_view(scorer, row, ids) for row in rows]
    keys = keys if keys is not None else [tuple(row.input_ids) for row in rows]
    values: dict[int, list[float]] = defaultdict(lambda: [0.0] * mc_samples)
    width = [len(view[0]) for view in views]
    work = sorted(
        ((i, d) for i, view in enumerate(views) if _scored(view) for d in range(mc_samples)),
        key=lambda item: width[item[0]],
    )
    with torch.no_grad(), eval_mode(model):
        for batch in _equal_length_batches(work, lambda item: width[item[0]], batch_size):
            draws = [stratified_draw(seed, keys[i], d, mc_samples) for i, d in batch]
            input_ids = torch.tensor([views[i][0] for i, _ in batch], device=device)
            labels = torch.tensor([views[i][1] for i, _ in batch], device=device)
            head = verdict.head(model, input_ids) if verdict is not None else None
            bound = scorer.nll_bound(
                model,
                head,
                input_ids,
                labels,
                torch.tensor([u for u, _ in draws], dtype=torch.float64),
                [g for _, g in draws],
                ids,
            )
            for (i, d), value in zip(batch, bound.tolist(), strict=True):
                values[i][d] = value
    return [_row_bound(values[i], _scored(view)) for i, view in enumerate(views)]


def heldout_elbo(
    model: nn.Module,
    scorer: BoundScorer,
    rows: Sequence[Row],
    ids: TokenIds,
    *,
    mc_samples: int,
    seed: int,
    batch_size: int,
    verdict: HeadVerdict | None = None,
) -> ElboEstimate:
    """The NLL bound per scored token over all rows, and its standard error."""
    bounds = estimate_rows(
        model, scorer, rows, ids, mc_samples=mc_samples, seed=seed, batch_size=batch_size,
        verdict=verdict,
    )  # fmt: skip
    return combine(bounds, mc_samples)


def combine(bounds: Iterable[RowBound], mc_samples: int) -> ElboEstimate:
    """Sum of the rows' bounds over the sum of their tokens; rows are independent, so
    their variances add."""
    bounds = [b for b in bounds if b.tokens]
    tokens = sum(b.tokens for b in bounds)
    if not tokens:
        raise ValueError("no scored tokens in the held-out rows")
    nll = sum(b.nll for b in bounds) / tokens
    se = math.sqrt(sum(b.variance for b in bounds)) / tokens
    return ElboEstimate(nll, se, tokens, len(bounds), mc_samples)


def _row_bound(values: list[float], tokens: int) -> RowBound:
    """Mean of the draws; variance from the pairs: (a - b)^2 / 4 estimates the variance of
    a stratum's mean without bias, and the strata are independent."""
    if not tokens:
        return RowBound(0.0, 0.0, 0)
    strata = len(values) // 2
    pairs = [(values[2 * s], values[2 * s + 1]) for s in range(strata)]
    variance = sum((a - b) ** 2 / 4 for a, b in pairs) / strata**2
    return RowBound(sum(values) / len(values), variance, tokens)


def _model_view(scorer: BoundScorer, row: Row, ids: TokenIds) -> tuple[list[int], list[int]]:
    if len(row.input_ids) != len(row.labels):
        raise ValueError("a row's input_ids and labels differ in length")
    input_ids, labels = scorer.model_view(
        torch.tensor([row.input_ids]), torch.tensor([row.labels]), ids.bos_id
    )
    return input_ids[0].tolist(), labels[0].tolist()


def _scored(view: tuple[list[int], list[int]]) -> int:
    return sum(1 for label in view[1] if label != IGNORE_INDEX)


def _equal_length_batches(items: list, length, batch_size: int) -> Iterable[list]:
    """Consecutive runs of (already length-sorted) items of one length, cut at batch_size."""
    batch: list = []
    for item in items:
        if batch and (len(batch) == batch_size or length(item) != length(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
