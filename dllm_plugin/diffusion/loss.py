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
    block_size: int | None = None,
) -> Tensor:
    """Per-position fp32 loss weights [b, l]; zero wherever the position is not masked.

    `t` is one time per row [b], or per position [b, l] (block diffusion: one per block).
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
        return cart_weights(masked, geo_p)
    raise ValueError(f"unknown loss weight kind {kind!r}; accepted: 'scheduler', 'uniform', 'cart'")


def normaliser(
    norm_type: str,
    maskable: Tensor,
    *,
    global_items: Tensor | int | None = None,
    processes: int = 1,
    accumulation: int = 1,
) -> Tensor:
    """1 / the normaliser, per row [b, 1]: loss = sum(weights * normaliser * CE).

    token: the number of maskable tokens. In training the Trainer gives the global count
    over all processes and accumulation steps (`global_items`); DDP averages gradients
    over processes, so the local loss is multiplied by `processes` to cancel it. Without
    it (evaluation), the local count times `accumulation`.
    sequence: each row's maskable count times the rows, times `accumulation`.
    batch: the rows times `accumulation`. Rows with nothing maskable add 0.
    """
    maskable = maskable.bool()
    rows = maskable.shape[0]
    ones = torch.ones(rows, 1, dtype=torch.float32, device=maskable.device)
    if norm_type == "token":
        if global_items is not None:
            total = torch.as_tensor(global_items, dtype=torch.float32, device=maskable.device)
            return ones * processes / total.clamp(min=1)
        return ones / (maskable.sum().float().clamp(min=1) * accumulation)
    if norm_type == "sequence":
        per_row = maskable.sum(dim=1, keepdim=True).float().clamp(min=1)
        return ones / (per_row * rows * accumulation)
    if norm_type == "batch":
        return ones / (rows * accumulation)
    accepted = ", ".join(repr(n) for n in NORM_TYPES)
    raise ValueError(f"unknown loss normalisation {norm_type!r}; accepted: {accepted}")


def full_logits_cross_entropy(
    logits: Tensor, targets: Tensor, token_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """(sum_i w_i CE_i, detached fp32 CE [n]) from materialised logits [n, V] (the
    full-logits path, and the reference the chunked head is tested against)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return (token_weights.float() * ce).sum(), ce.detach()
