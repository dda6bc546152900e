"""Noising for masked diffusion: per-example timesteps and masks from keyed generators.

Every draw of a step comes from a generator seeded by data, never by history: (seed,
phase, optimizer step) plus where the example sits in the global batch (its row and, in
a packed row, its segment). The same global batch gets the same noise whatever the
process count, gradient accumulation or padding width, and a resumed run draws exactly
what the uninterrupted one would have. `NoiseKeys` is the one place that makes keys:
the noise's, the strata's and the dropout's.

Two optional estimators reduce the variance of the loss and keep it unbiased:
- stratified timesteps: the global batch's rows take the strata [k/R, (k+1)/R) of the
  unit interval in a random order (a keyed permutation, so the strata are independent of
  the data); a packed row splits its stratum among its examples in a random order.
- complementary masking: each example is noised twice, once at t and once with the
  complementary mask (exactly the maskable positions the first draw kept), so every
  maskable token is scored once per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..rng import keyed_generator, keyed_seed
from .schedules import NoiseSchedule

TRAIN, EVAL = 0, 1  # the phase part of a noise key
TIMESTEP_SAMPLING = ("uniform", "stratified")


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


# ---- keys -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseKeys:
    """The keys of one step's draws: (seed, phase, optimizer step) plus where.

    An example's generator is keyed by its row in the global batch (the key padded
    batches have always used) and, in a packed row, by its segment as well.
    """

    seed: int
    phase: int
    step: int

    def example(self, row: int, segment: int | None = None) -> torch.Generator:
        where = (row,) if segment is None else (row, segment)
        return keyed_generator(self.seed, self.phase, self.step, *where)

    def row_strata(self, rows: int) -> Tensor:
        """Stratum of each row of the global batch: a keyed permutation of 0..rows-1."""
        gen = keyed_generator(self.seed, self.phase, self.step, "strata")
        return torch.randperm(rows, generator=gen)

    def segment_strata(self, row: int, segments: int) -> Tensor:
        """Sub-stratum of each example of a packed row: a keyed permutation."""
        gen = keyed_generator(self.seed, self.phase, self.step, "strata", row)
        return torch.randperm(segments, generator=gen)

    def dropout_seed(self, first_row: int) -> int:
        """The seed of the dropout draws of the micro-batch whose first global row is given."""
        return keyed_seed(self.seed, self.phase, self.step, "dropout", first_row)


@dataclass(frozen=True)
class ExampleSlot:
    """Where an example sits in the global batch: its row and, in a packed row, its
    segment and the number of examples in that row."""

    row: int
    segment: int | None = None
    segments: int = 1


@dataclass(frozen=True)
class NoiseOptions:
    schedule: NoiseSchedule
    eps: float
    sampling: str = "uniform"  # or "stratified"
    complementary: bool = False
    strata: int = 1  # rows of the global batch (stratified sampling)

    def __post_init__(self) -> None:
        top = 0.5 if self.complementary else 1.0  # complementary: t in [eps, 1 - eps]
        if not 0.0 <= self.eps < top:
            raise ValueError(f"time epsilon must be in [0, {top}), got {self.eps}")
        if self.sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling {self.sampling!r}: expected one of {TIMESTEP_SAMPLING}"
            )
        if self.strata < 1:
            raise ValueError(f"strata must be >= 1, got {self.strata}")


@dataclass(frozen=True)
class NoiseDraw:
    """Timesteps and masks of the noised copies of a batch's examples.

    `copies` is 1, or 2 with complementary masking: rows [:n] are the draws at t, rows
    [n:] their complements. `ratio` is each copy's importance weight (1 except for the
    complements under a non-linear schedule, see NoiseSchedule.complement).
    """

    t: Tensor  # [copies * n]
    masked: Tensor  # [copies * n, l]
    ratio: Tensor  # [copies * n]
    copies: int


def _unit_time(
    u: Tensor, slot: ExampleSlot, keys: NoiseKeys, opts: NoiseOptions, strata: Tensor | None
) -> Tensor:
    """The example's position in [0, 1): u itself, or u inside its stratum."""
    if strata is None:
        return u
    stratum = strata[slot.row % opts.strata]
    if slot.segment is not None and slot.segments > 1:
        sub = keys.segment_strata(slot.row, slot.segments)[slot.segment]
        u = (sub + u) / slot.segments
    return (stratum + u) / opts.strata


def draw_noise(
    maskable: Tensor, slots: Sequence[ExampleSlot], keys: NoiseKeys, opts: NoiseOptions
) -> NoiseDraw:
    """(t, masks) for the examples `maskable` [n, l] (one example per row).

    Per example, from its own generator: one uniform u (its time: t = eps + (1 - eps) u,
    or within [eps, 1 - eps] with complementary masking, where 1 - t must stay away from
    0 as well), then the mask uniforms over the row's whole width (a prefix of the same
    stream whatever the width, so padding never changes a draw).
    """
    if len(slots) != maskable.shape[0]:
        raise ValueError(f"{len(slots)} example slots for {maskable.shape[0]} rows")
    cpu_maskable = maskable.cpu()
    top = 1.0 - opts.eps if opts.complementary else 1.0
    strata = keys.row_strata(opts.strata) if opts.sampling == "stratified" else None
    times, masks = [], []
    for i, slot in enumerate(slots):
        gen = keys.example(slot.row, slot.segment)
        u = _draw_uniform((1,), "cpu", gen)
        t = opts.eps + (top - opts.eps) * _unit_time(u, slot, keys, opts, strata)
        masks.append(sample_masks(cpu_maskable[i : i + 1], opts.schedule.mask_prob(t), gen))
        times.append(t)
    t = torch.cat(times) if times else torch.zeros(0)
    masked = torch.cat(masks) if masks else torch.zeros_like(cpu_maskable)
    ratio = torch.ones_like(t)
    copies = 1
    if opts.complementary:
        t_copy, ratio_copy = opts.schedule.complement(t)
        t, ratio = torch.cat([t, t_copy]), torch.cat([ratio, ratio_copy])
        masked = torch.cat([masked, cpu_maskable.bool() & ~masked])
        copies = 2
    device = maskable.device
    return NoiseDraw(t.to(device), masked.to(device), ratio.to(device), copies)


@dataclass(frozen=True)
class CanvasNoise:
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


def draw_canvas_noise(
    num_blocks: Tensor,
    block_size: int,
    vocab_size: int,
    eps: float,
    self_condition_prob: float,
    seed: int,
    phase: int,
    step: int,
    first_row: int,
) -> CanvasNoise:
    """DiffusionGemma's canvas noise for rows `first_row`, `first_row + 1`, ... of a global batch.

    Per row, from its keyed generator and always in this order and amount (so a row's
    draws never depend on the other rows, the padding width or its own length beyond
    its number of blocks): t ~ U[eps, 1); u -> block floor(u * num_blocks); the
    self-conditioning coin (u < prob); block_size uniforms (corrupted where u < t);
    block_size replacement ids ~ U{0..vocab_size-1}. A row without blocks gets block 0.
    """
    keys = NoiseKeys(seed, phase, step)
    blocks, coins, times, corrupt, tokens = [], [], [], [], []
    for row, n in enumerate(num_blocks.tolist()):
        gen = keys.example(first_row + row)
        t = sample_timesteps(1, eps, torch.device("cpu"), gen)
        u_block, u_coin = torch.rand(2, generator=gen).tolist()
        times.append(t)
        blocks.append(min(int(u_block * n), max(int(n) - 1, 0)))
        coins.append(u_coin < self_condition_prob)
        corrupt.append(torch.rand(block_size, generator=gen) < t)
        tokens.append(torch.randint(0, vocab_size, (block_size,), generator=gen))
    device = num_blocks.device
    return CanvasNoise(
        t=torch.cat(times).to(device),
        block=torch.tensor(blocks, dtype=torch.long, device=device),
        self_condition=torch.tensor(coins, dtype=torch.bool, device=device),
        corrupt=torch.stack(corrupt).to(device),
        tokens=torch.stack(tokens).to(device),
    )
