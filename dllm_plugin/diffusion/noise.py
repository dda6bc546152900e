"""Noising for masked diffusion: per-row timesteps and masks, drawn from keyed generators.

Noise is drawn per row from a generator seeded by (seed, phase, optimizer step, the
row's index in the global batch) rather than from the process RNG: the same global
batch gets the same noise whatever the process count, gradient accumulation or padding
width, and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..rng import keyed_generator
from .schedules import NoiseSchedule

TRAIN, EVAL = 0, 1  # the phase part of a noise key


def row_generator(seed: int, phase: int, step: int, row: int) -> torch.Generator:
    """The generator of one row's noise: the one place that says what a noise key is."""
    return keyed_generator(seed, phase, step, row)


def _draw_uniform(shape: tuple[int, ...], device, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) on `device`; drawn on the generator's own device so a CPU generator works
    for CUDA batches (torch refuses a generator on another device)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is None or generator.device == device:
        return torch.rand(shape, generator=generator, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def sample_timesteps(
    batch_size: int, eps: float, device, generator: torch.Generator | None = None
) -> Tensor:
    """One diffusion time per sequence, t ~ U[eps, 1).

    eps > 0 keeps t away from 0, where the ELBO weight 1/t (linear) blows up.
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"time epsilon must be in [0, 1), got {eps}")
    return eps + (1.0 - eps) * _draw_uniform((batch_size,), device, generator)


def sample_masks(
    maskable: Tensor, mask_prob: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Mask each maskable position independently with its row's probability.

    The uniform draw always covers the full [b, l] shape so the random stream consumed
    does not depend on which positions are maskable (reproducible across label choices).
    """
    if maskable.dim() != 2:
        raise ValueError(f"maskable must be [batch, length], got shape {tuple(maskable.shape)}")
    if mask_prob.shape != maskable.shape[:1]:
        raise ValueError(
            f"mask_prob must be [batch] = [{maskable.shape[0]}], got {tuple(mask_prob.shape)}"
        )
    u = _draw_uniform(tuple(maskable.shape), maskable.device, generator)
    return (u < mask_prob.to(u.dtype)[:, None]) & maskable.bool()


def draw_row_noise(
    maskable: Tensor,
    schedule: NoiseSchedule,
    eps: float,
    seed: int,
    phase: int,
    step: int,
    first_row: int,
) -> tuple[Tensor, Tensor]:
    """(t [b], masked [b, l]) for rows `first_row`, `first_row + 1`, ... of a global batch.

    One generator per row keyed by (seed, phase, step, global row): independent of how
    the global batch is split over processes and accumulation steps, and of padding
    width (the mask draw covers the row's full width, masks beyond it are never used).
    """
    cpu_maskable = maskable.cpu()
    times, masks = [], []
    for row in range(maskable.shape[0]):
        gen = row_generator(seed, phase, step, first_row + row)
        t = sample_timesteps(1, eps, torch.device("cpu"), gen)
        masks.append(sample_masks(cpu_maskable[row : row + 1], schedule.mask_prob(t), gen))
        times.append(t)
    return torch.cat(times).to(maskable.device), torch.cat(masks).to(maskable.device)


@dataclass(frozen=True)
class BlockNoise:
    """The draws of block diffusion with uniform-token corruption (DiffusionGemma), per row.

    t [b]: the row's corruption probability; block [b]: the response block that is
    scored; self_condition [b] (bool): whether pass 1's prediction feeds pass 2;
    corrupt [b, block_size] (bool) and tokens [b, block_size]: which positions of the
    scored block are replaced, and by which uniformly drawn vocabulary ids.
    """

    t: Tensor
    block: Tensor
    self_condition: Tensor
    corrupt: Tensor
    tokens: Tensor


def draw_block_noise(
    num_blocks: Tensor,
    block_size: int,
    vocab_size: int,
    eps: float,
    self_condition_prob: float,
    seed: int,
    phase: int,
    step: int,
    first_row: int,
) -> BlockNoise:
    """Block-diffusion noise for rows `first_row`, `first_row + 1`, ... of a global batch.

    Per row, from its keyed generator and always in this order and amount (so a row's
    draws never depend on the other rows, the padding width or its own length beyond
    its number of blocks): t ~ U[eps, 1); u -> block floor(u * num_blocks); the
    self-conditioning coin (u < prob); block_size uniforms (corrupted where u < t);
    block_size replacement ids ~ U{0..vocab_size-1}. A row without blocks gets block 0.
    """
    blocks, coins, times, corrupt, tokens = [], [], [], [], []
    for row, n in enumerate(num_blocks.tolist()):
        gen = row_generator(seed, phase, step, first_row + row)
        t = sample_timesteps(1, eps, torch.device("cpu"), gen)
        u_block, u_coin = torch.rand(2, generator=gen).tolist()
        times.append(t)
        blocks.append(min(int(u_block * n), max(int(n) - 1, 0)))
        coins.append(u_coin < self_condition_prob)
        corrupt.append(torch.rand(block_size, generator=gen) < t)
        tokens.append(torch.randint(0, vocab_size, (block_size,), generator=gen))
    device = num_blocks.device
    return BlockNoise(
        t=torch.cat(times).to(device),
        block=torch.tensor(blocks, dtype=torch.long, device=device),
        self_condition=torch.tensor(coins, dtype=torch.bool, device=device),
        corrupt=torch.stack(corrupt).to(device),
        tokens=torch.stack(tokens).to(device),
    )
