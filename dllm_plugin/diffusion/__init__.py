"""Masked-diffusion math: noise schedules, noising, loss weights and the chunked CE head."""

from .loss import (
    IGNORE_INDEX,
    cart_weights,
    chunked_linear_cross_entropy,
    full_logits_cross_entropy,
    loss_weights,
    normalise_loss,
    parse_loss_weight_type,
    sample_masks,
    sample_timesteps,
)
from .schedules import CosineSchedule, LinearSchedule, NoiseSchedule, get_schedule

__all__ = [
    "IGNORE_INDEX",
    "CosineSchedule",
    "LinearSchedule",
    "NoiseSchedule",
    "cart_weights",
    "chunked_linear_cross_entropy",
    "full_logits_cross_entropy",
    "get_schedule",
    "loss_weights",
    "normalise_loss",
    "parse_loss_weight_type",
    "sample_masks",
    "sample_timesteps",
]
