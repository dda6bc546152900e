"""Noise schedules for masked (absorbing-state) diffusion.

A schedule gives alpha(t), the probability that a token is still clean at time t in
[0, 1] (alpha(0) = 1, alpha(1) = 0). The MDLM continuous-time ELBO weights the
cross-entropy of a masked token by w(t) = -alpha'(t) / (1 - alpha(t)), so every schedule
exposes alpha, its derivative and that weight, and (for complementary masking) the time
of a given mask probability.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["CosineSchedule", "LinearSchedule", "NoiseSchedule", "get_schedule"]


class NoiseSchedule(ABC):
    """Keep-probability schedule alpha(t) with the ELBO weight derived from it."""

    name: str = "abstract"

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is kept (not masked) at time t."""

    @abstractmethod
    def alpha_prime(self, t: Tensor) -> Tensor:
        """d alpha / d t, needed by the ELBO weight."""

    def mask_prob(self, t: Tensor) -> Tensor:
        """Probability that a token is masked at time t."""
        return 1.0 - self.alpha(t)

    def weight(self, t: Tensor) -> Tensor:
        """ELBO weight -alpha'(t) / (1 - alpha(t)); infinite at t = 0, so sample t >= eps."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    @abstractmethod
    def time_of_mask_prob(self, p: Tensor) -> Tensor:
        """The inverse of mask_prob: the time at which a token is masked with probability p."""

    def complement(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(t', ratio) for the complementary copy of a draw at t (complementary masking).

        The copy masks exactly the positions the draw at t kept, so its mask probability
        is 1 - mask_prob(t): it is a draw at t' = mask_prob^-1(1 - mask_prob(t)). With
        t ~ U, t' is not uniform unless the schedule is symmetric; `ratio` is the
        importance weight U-density / density of t' = alpha'(t) / alpha'(t'), which makes
        the copy an unbiased draw at a uniform time (exactly 1 for the linear schedule).
        """
        t_copy = self.time_of_mask_prob(1.0 - self.mask_prob(t))
        return t_copy, self.alpha_prime(t) / self.alpha_prime(t_copy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(NoiseSchedule):
    """alpha(t) = 1 - t: the mask probability equals t and w(t) = 1 / t (LLaDA, MDLM)."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def alpha_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def weight(self, t: Tensor) -> Tensor:
        # Closed form: avoids the rounding of 1 - (1 - t) for small t.
        return 1.0 / t

    def time_of_mask_prob(self, p: Tensor) -> Tensor:
        return p

    def complement(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # Symmetric: the copy is a draw at exactly 1 - t, with importance weight 1.
        return 1.0 - t, torch.ones_like(t)


class CosineSchedule(NoiseSchedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)): masks slowly at first, fast near t = 1."""

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def weight(self, t: Tensor) -> Tensor:
        # -alpha' / (1 - alpha) = (pi/2) sin(x) / cos(x) with x = pi/2 (1 - t).
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * (1.0 - t))

    def time_of_mask_prob(self, p: Tensor) -> Tensor:
        # mask_prob = cos(pi/2 (1 - t))  =>  t = 1 - (2 / pi) acos(p)
        return 1.0 - (2.0 / math.pi) * torch.acos(p.clamp(0.0, 1.0))


_SCHEDULES: dict[str, type[NoiseSchedule]] = {
    LinearSchedule.name: LinearSchedule,
    CosineSchedule.name: CosineSchedule,
}


def get_schedule(name: str) -> NoiseSchedule:
    """Build a schedule from its config name ("linear" or "cosine")."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _SCHEDULES:
        accepted = ", ".join(repr(k) for k in _SCHEDULES)
        raise ValueError(f"unknown noise schedule {name!r}; accepted: {accepted}")
    return _SCHEDULES[key]()
