"""The masked-diffusion loss: weights per masked position and their normalisation.

The loss of a batch is sum over masked positions of scale_i * CE_i, where the scale is
the position's weight (the ELBO weight of its row's timestep, a uniform 1, or Dream's
CART weight) divided by the normaliser (`token`, `sequence` or `batch`). The trainers
compute the scale here and the CE either from full logits (`full_logits_cross_entropy`)
or with the chunked head (chunked_ce.py); the tests check exactly these functions.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from .cart import block_cart_weights, cart_weights
from .schedules import NoiseSchedule

IGNORE_INDEX = -100
"""Label value that is never masked and never scored (prompt tokens)."""

LOSS_WEIGHT_FORMS = ("scheduler", "uniform", "cart[geo_p:P] with 0 < P < 1")
NORM_TYPES = ("token", "sequence", "batch")


_CART_RE = re.compile(r"cart\[geo_p:([^\]]*)\]")


def parse_loss_weight_type(value: str) -> tuple[str, float | None]:
    """Parse the `loss_weight_type` option into (kind, geo_p).

    Strict on purpose: a typo such as "cart[geo:0.3]" must fail loudly instead of
    silently training with another weighting.
    """
    forms = ", ".join(repr(f) for f in LOSS_WEIGHT_FORMS)
    if not isinstance(value, str):
        raise ValueError(f"loss_weight_type must be one of {forms}; got {value!r}")
    text = value.strip()
    if text in ("scheduler", "uniform"):
        return text, None
    match = _CART_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"loss_weight_type must be one of {forms}; got {value!r}")
    try:
        geo_p = float(match.group(1))
    except ValueError:
        raise ValueError(
            f"loss_weight_type {value!r}: geo_p must be a number in (0, 1); accepted: {forms}"
        ) from None
    if not 0.0 < geo_p < 1.0 or not math.isfinite(geo_p):
        raise ValueError(
            f"loss_weight_type {value!r}: geo_p must be in (0, 1), got {geo_p}; accepted: {forms}"
        )
    return "cart", geo_p


def loss_weights(
    kind: str,
    t: Tensor,
    masked: Tensor,
    schedule: NoiseSchedule,
    geo_p: float | None = None,
    present: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Per-position fp32 loss weights [b, l]; zero wherever the position is not masked.

    `t` is one time per row [b], or per position [b, l] (block diffusion: one per block).
    `present` [b, l] marks the positions that belong to the row's example (None: all);
    CART counts only those as clean context (a packed example's view row ends early).
    With `block_size`, CART counts only the context a block sees (block_cart_weights).
    """
    masked = masked.bool()
    if kind == "scheduler":
        weight = schedule.weight(t.to(torch.float32))
        return (weight[:, None] if weight.dim() == 1 else weight) * masked
    if kind == "uniform":
        return masked.to(torch.float32)
    if kind == "cart" and block_size:
        return block_cart_weights(masked, geo_p, block_size)
    if kind == "cart":
        if present is None:
            return cart_weights(masked, geo_p)
        return cart_weights(masked | ~present.bool(), geo_p) * masked
    raise ValueError(f"unknown loss weight kind {kind!r}; accepted: 'scheduler', 'uniform', 'cart'")


def normaliser(
    norm_type: str,
    maskable: Tensor,
    *,
    global_items: Tensor | int | None = None,
    global_rows: Tensor | int | None = None,
    processes: int = 1,
    accumulation: int = 1,
) -> Tensor:
    """1 / the normaliser, per row [b, 1]: loss = sum(weights * normaliser * CE).

    One row is one example (the trainer works on the examples of packed rows one per
    row). In training the Trainer gives the global counts of the optimizer step over all
    processes and accumulation steps: maskable tokens (`global_items`) and examples
    (`global_rows`); DDP averages gradients over processes, so the local loss is
    multiplied by `processes` to cancel it. Without them (evaluation), the local counts
    times `accumulation`.
    token: the number of maskable tokens.
    sequence: each example's maskable count times the number of examples.
    batch: the number of examples. Examples with nothing maskable add 0.
    """
    maskable = maskable.bool()
    rows = maskable.shape[0]
    ones = torch.ones(rows, 1, dtype=torch.float32, device=maskable.device)
    if norm_type not in NORM_TYPES:
        accepted = ", ".join(repr(n) for n in NORM_TYPES)
        raise ValueError(f"unknown loss normalisation {norm_type!r}; accepted: {accepted}")
    if norm_type == "token":
        if global_items is not None:
            return ones * processes / _count(global_items, maskable.device)
        return ones / (maskable.sum().float().clamp(min=1) * accumulation)
    if global_rows is not None:
        examples = _count(global_rows, maskable.device) / processes
    else:
        examples = torch.tensor(float(rows * accumulation), device=maskable.device)
    if norm_type == "sequence":
        per_row = maskable.sum(dim=1, keepdim=True).float().clamp(min=1)
        return ones / (per_row * examples)
    return ones / examples


def _count(value: Tensor | int, device: torch.device) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=device).clamp(min=1)


def full_logits_cross_entropy(
    logits: Tensor, targets: Tensor, token_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """(sum_i w_i CE_i, detached fp32 CE [n]) from materialised logits [n, V] (the
    full-logits path, and the reference the chunked head is tested against)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return (token_weights.float() * ce).sum(), ce.detach()
