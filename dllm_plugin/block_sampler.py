"""The block-diffusion (BD3LM) sampler: the answer is written block by block.

The block grid is the one training used (diffusion/blocks.py): blocks of
``config.block_size`` counted from the prompt's first token. The prompt's whole blocks
are the clean prefix; the block holding the prompt's tail is the first one denoised, its
prompt tokens fixed and the rest masked. Each block is denoised like an MDLM block (the
masks split evenly over its steps, committing the most confident predictions, or random
ones, never remasking), conditioned on the clean prefix; then it joins the prefix.
Generation stops after a block that holds a stop id, or after ``max_new_tokens``.

Key/value reuse. Where the model takes a transformers ``Cache`` (our LLaDA and Dream,
a2d models), the prefix's keys and values are computed once, one block at a time as
blocks are committed, and every denoising forward reads only the block's B tokens
against them; the cache is cropped back after each denoising forward. Otherwise (BERT
family) each denoising forward reads the prefix and the block under the block-causal
mask: the same numbers (the tests compare the two), at the prefix's cost every step.

Right-shifted models (Dream) score a block position with the output one to the left;
for the block's first position that is the prefix's last output, which the commit
forward of the previous block (or the no-reuse forward) provides: the training rule.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion.blocks import attention_mask_for, block_causal_keep_mask
from .sampling import (
    MDLM_ALGORITHMS,
    SamplingConfig,
    _commit_top,
    _even_split,
    _gumbel_argmax,
    _make_generator,
    _model_device,
    clean_generation,
    eval_mode,
)


def supports_kv_cache(model: nn.Module) -> bool:
    """Whether the model's forward takes a transformers ``cache`` (peft unwrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" in inspect.signature(base.forward).parameters


class _BlockModel:
    """The model as the sampler calls it: fp32 logits of one sequence, mask id excluded."""

    def __init__(self, model: nn.Module, mask_id: int, block_size: int, reuse: bool):
        self.model, self.mask_id, self.block_size = model, mask_id, block_size
        self.cache: Any = None
        if reuse:
            from transformers import DynamicCache

            self.cache = DynamicCache()

    def _logits(self, ids: torch.Tensor, start: int, **kwargs: Any) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[0], device=ids.device)
        out = self.model(input_ids=ids[None], position_ids=positions[None], **kwargs)
        logits = out.logits[0].float()
        if 0 <= self.mask_id < logits.shape[-1]:
            logits[:, self.mask_id] = -torch.inf
        return logits

    def commit(self, block: torch.Tensor, start: int) -> torch.Tensor | None:
        """Add a clean block to the prefix; returns its last output (reuse only)."""
        if self.cache is None:
            return None
        return self._logits(block, start, cache=self.cache, use_cache=True)[-1]

    def denoise(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits of the block x[start:start+B], the prefix's last output or None)."""
        block = x[start : start + self.block_size]
        if self.cache is not None:
            logits = self._logits(block, start, cache=self.cache, use_cache=True)
            self.cache.crop(-self.block_size)
            return logits, None
        keep = block_causal_keep_mask(start + self.block_size, self.block_size, x.device)
        mask = attention_mask_for(self.model, keep)
        logits = self._logits(x[: start + self.block_size], 0, attention_mask=mask)
        return logits[start:], (logits[start - 1] if start > 0 else None)


def _block_predictions(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, confidence) as the MDLM sampler picks them."""
    x0 = _gumbel_argmax(logits, config.temperature, generator)
    if config.algorithm == "low_confidence":
        confidence = F.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    return x0, confidence.float()


def _generate_one(
    runner: _BlockModel,
    prompt: Sequence[int],
    *,
    stop_ids: Collection[int],
    config: SamplingConfig,
    shift: bool,
    generator: torch.Generator,
    device: torch.device,
) -> list[int]:
    """The raw generated tokens for one prompt (cut to max_new_tokens)."""
    size, n_prompt = config.block_size, len(prompt)
    first = (n_prompt // size) * size  # where the first denoised block starts
    end = n_prompt + config.max_new_tokens
    n_blocks = -(-(end - first) // size)
    total = first + n_blocks * size
    x = torch.full((total,), runner.mask_id, dtype=torch.long, device=device)
    x[:n_prompt] = torch.tensor(list(prompt), dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    steps_per_block = max(1, config.steps // n_blocks)
    last = None  # the prefix's last output (shifted models score a block's start with it)
    for start in range(0, first, size):
        last = runner.commit(x[start : start + size], start)
    for start in range(first, total, size):
        block = x[start : start + size]  # a view: committing into it writes into x
        masks = int((block == runner.mask_id).sum())
        for k in _even_split(masks, min(steps_per_block, masks)) if masks else ():
            logits, prefix_last = runner.denoise(x, start)
            if shift:
                previous = prefix_last if prefix_last is not None else last
                head = logits[:1] if previous is None else previous[None]
                logits = torch.cat([head, logits[:-1]], dim=0)
            x0, confidence = _block_predictions(logits, config, generator)
            _commit_top(block, x0, confidence, block == runner.mask_id, k)
        new = x[max(start, n_prompt) : min(start + size, end)]
        if start + size >= end or (stops.numel() and torch.isin(new, stops).any()):
            break
        last = runner.commit(block, start)
    return x[n_prompt:end].tolist()


def _generate(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    mask_id: int,
    stop_ids: Collection[int],
    pad_id: int | None,
    config: SamplingConfig,
    shift: bool,
    reuse_cache: bool | None,
) -> list[list[int]]:
    if config.algorithm not in MDLM_ALGORITHMS:
        raise ValueError(
            f"block sampler algorithm must be one of {MDLM_ALGORITHMS}, got {config.algorithm!r}"
        )
    if config.max_new_tokens == 0:
        return [[] for _ in prompts]
    reuse = supports_kv_cache(model) if reuse_cache is None else reuse_cache
    device = _model_device(model)
    generator = _make_generator(device, config.seed)
    outputs = []
    with eval_mode(model):
        for prompt in prompts:
            runner = _BlockModel(model, mask_id, config.block_size, reuse)
            raw = _generate_one(
                runner, prompt, stop_ids=stop_ids, config=config, shift=shift,
                generator=generator, device=device,
            )  # fmt: skip
            outputs.append(clean_generation(raw, mask_id=mask_id, stop_ids=stop_ids, pad_id=pad_id))
    return outputs


@torch.no_grad()
def generate_bd3lm(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    mask_id: int,
    stop_ids: Collection[int],
    pad_id: int | None,
    config: SamplingConfig,
    reuse_cache: bool | None = None,
) -> list[list[int]]:
    """Block-by-block sampling for unshifted models (BERT family, LLaDA, a2d).

    ``config.block_size`` must be the block size the model was trained with;
    ``config.steps`` are spread evenly over the blocks (at most one per masked token).
    ``reuse_cache`` None: reuse the prefix's keys and values where the model can.
    """
    return _generate(
        model, prompts, mask_id=mask_id, stop_ids=stop_ids, pad_id=pad_id, config=config,
        shift=False, reuse_cache=reuse_cache,
    )  # fmt: skip


@torch.no_grad()
def generate_bd3lm_shifted(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    mask_id: int,
    stop_ids: Collection[int],
    pad_id: int | None,
    config: SamplingConfig,
    reuse_cache: bool | None = None,
) -> list[list[int]]:
    """Block-by-block sampling for right-shifted models (Dream): as generate_bd3lm, with
    each position scored by the output one to the left."""
    return _generate(
        model, prompts, mask_id=mask_id, stop_ids=stop_ids, pad_id=pad_id, config=config,
        shift=True, reuse_cache=reuse_cache,
    )  # fmt: skip


generate_bd3lm.algorithms = MDLM_ALGORITHMS
generate_bd3lm_shifted.algorithms = MDLM_ALGORITHMS
