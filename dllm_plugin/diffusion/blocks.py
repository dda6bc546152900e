"""Block diffusion (BD3LM, arXiv 2503.09573): the training layout and its block noise.

A row of length L (a whole number of blocks of size B) is trained as one sequence of
2L tokens: the noised copy x_t followed by the clean copy x_0, both at positions
0..L-1. Query q may attend to key k when

- both are in the same block of the same copy (block-diagonal, both halves),
- q is noised, k is clean and k's block is before q's (noised block b sees the clean
  blocks < b),
- both are clean and k's block is not after q's (the clean copy is block-causal).

So noised block b is denoised from itself and the clean prefix, exactly what the block
sampler shows it: the clean prefix (whose keys and values it caches) and the block.
Clean tokens never see noised ones. The block grid starts at the sequence's first token
(the prompt's) in training and in sampling alike: one alignment for both.

Right-shifted models (Dream) score token i with the output at i - 1. Inside a block that
is the noised i - 1; the first token of block b is scored by the clean copy's last token
of block b - 1, the output the sampler has for it (the cached prefix's last position).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rng import keyed_generator
from .noise import _draw_uniform, sample_timesteps
from .schedules import NoiseSchedule


def bd3lm_keep_mask(length: int, block_size: int, device=None) -> Tensor:
    """[2L, 2L] bool: True where query (row) may attend to key (column)."""
    if length % block_size:
        raise ValueError(f"length {length} is not a multiple of the block size {block_size}")
    index = torch.arange(2 * length, device=device)
    clean = index >= length
    block = (index - length * clean) // block_size
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    diagonal = (q_block == k_block) & (q_clean == k_clean)
    noised_sees_clean_prefix = ~q_clean & k_clean & (k_block < q_block)
    clean_block_causal = q_clean & k_clean & (k_block <= q_block)
    return diagonal | noised_sees_clean_prefix | clean_block_causal


def block_causal_keep_mask(length: int, block_size: int, device=None) -> Tensor:
    """[L, L] bool: a token sees every token of its own and earlier blocks (the clean half
    of the layout, and what the sampler's prefix computes)."""
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


def bd3lm_position_ids(length: int, device=None) -> Tensor:
    """[2L]: both copies at positions 0..L-1."""
    return torch.arange(length, device=device).repeat(2)


def layout_inputs(
    noised: Tensor, clean: Tensor, attention_mask: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """What the model reads in the 2L layout: [noised ; clean], and its forward kwargs (the
    block mask as the model takes it, attention_mask_for; both copies at 0..L-1)."""
    rows, length = clean.shape
    positions = bd3lm_position_ids(length, clean.device).expand(rows, -1)
    inputs = torch.cat([noised, clean], dim=1)
    return inputs, {"attention_mask": attention_mask, "position_ids": positions}


def fill_to_blocks(
    input_ids: Tensor, labels: Tensor, block_size: int, fill_id: int
) -> tuple[Tensor, Tensor]:
    """Rows [b, L] extended to whole blocks with `fill_id`, unscored (label -100).

    Evaluation fills with the mask id: positions after the scored text that the model
    never sees revealed, so the bound is the text's own (the sampler's view of a block
    whose end is not written yet), not that of the text followed by a chosen filler.
    """
    fill = -input_ids.shape[1] % block_size
    if not fill:
        return input_ids, labels
    pad = input_ids.new_full((input_ids.shape[0], fill), fill_id)
    return torch.cat([input_ids, pad], 1), torch.cat([labels, torch.full_like(pad, -100)], 1)


def source_columns(cols: Tensor, length: int, block_size: int, shift: bool) -> Tensor:
    """Output columns (in the 2L layout) that score the noised copy's columns `cols`.

    Unshifted: the column itself. Shifted: the previous noised column inside a block; for
    a block's first column the clean copy's previous column (its clean predecessor).
    Column 0 has no predecessor: shifted callers never score it.
    """
    if not shift:
        return cols
    starts_block = cols % block_size == 0
    return torch.where(starts_block, cols - 1 + length, cols - 1)


def draw_block_noise(
    maskable: Tensor,
    block_size: int,
    schedule: NoiseSchedule,
    eps: float,
    seed: int,
    phase: int,
    step: int,
    first_row: int,
) -> tuple[Tensor, Tensor]:
    """(t [b, L] per position, masked [b, L]): one timestep per block, as in BD3LM.

    Each block's tokens are masked independently with the probability of its own
    t ~ U[eps, 1), so every block is a sample of its own MDLM bound. Draws are keyed by
    (seed, phase, step, global row) with separate generators for the times and the masks:
    a row gets the same noise whatever its batch's width (its trailing padding blocks
    only add draws after its own).
    """
    rows, length = maskable.shape
    blocks = -(-length // block_size)
    times, masks = [], []
    for row in range(rows):
        key = (seed, phase, step, first_row + row)
        t_blocks = sample_timesteps(blocks, eps, torch.device("cpu"), keyed_generator(*key, "t"))
        t = t_blocks.repeat_interleave(block_size)[:length]
        u = _draw_uniform((length,), torch.device("cpu"), keyed_generator(*key, "mask"))
        times.append(t)
        masks.append(u < schedule.mask_prob(t))
    t = torch.stack(times).to(maskable.device)
    masked = torch.stack(masks).to(maskable.device) & maskable.bool()
    return t, masked


def attention_mask_for(model, keep: Tensor) -> Tensor:
    """The keep-mask [q, k] as the model's attention takes a 4-D mask, [1, 1, q, k].

    Our native LLaDA/Dream and transformers' sdpa/flex paths take a bool mask (True =
    attend); transformers' eager attention adds the mask to the scores, so it gets an
    additive one (a bool would be added as 0/1, silently wrong). Flash attention cannot
    take an arbitrary mask.
    """
    config = getattr(model, "config", None)
    implementation = str(getattr(config, "_attn_implementation", None) or "sdpa")
    keep = keep[None, None]
    if "flash" in implementation:
        raise ValueError(
            f"diffusion_type bd3lm needs a block attention mask, which attention "
            f"implementation {implementation!r} cannot take (use sdpa)"
        )
    if implementation != "eager":
        return keep
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    blocked = torch.full(keep.shape, torch.finfo(dtype).min, dtype=dtype, device=keep.device)
    return blocked.masked_fill(keep, 0.0)
