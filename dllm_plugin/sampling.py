"""Samplers for diffusion language models.

Two masked-diffusion families are covered, following their official releases (and
DiffusionGemma through its own transformers `generate`, at the end of this module):

* MDLM-style (BERT-family, LLaDA): no logit shift, semi-autoregressive blocks, per block an
  even split of its masks over its steps, committing the most confident predictions and
  never remasking (LLaDA's ``generate``).
* Dream: the model scores token ``i`` at raw position ``i - 1`` (it was initialised from an
  autoregressive model), so the logits are right-shifted first; one span, a linear timestep
  schedule from 1 to ``eps`` (Dream's ``diffusion_generate``).

The model is any module with ``model(input_ids=LongTensor[b, L]).logits -> [b, L, V]``.
No attention mask is passed: the training recipe trains without one, so the sampler shows
the model what it saw in training (the prompt followed by mask tokens).

Deliberate differences from the reference implementations, each output-preserving or a fix:

* The mask token is never predicted (its logit is set to ``-inf``). The references can
  commit the mask id as a "prediction", which leaves masks in the output.
* Gumbel-max is computed as ``argmax(logits / T + g)`` in float64, which is the same
  distribution as LLaDA's ``exp(logits) / (-log u) ** T`` but cannot overflow.
* An MDLM block never gets more steps than it has masks: the extra steps of the reference
  commit nothing, so they would only cost forward passes.
* MDLM stops after a completed block that contains a stop id (later blocks are cut anyway).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MDLM_ALGORITHMS = ("low_confidence", "random")
DREAM_ALGORITHMS = ("maskgit_plus", "topk_margin", "entropy", "origin")
# Dream's default config uses "low_confidence"-style naming elsewhere in the plugin; the
# meaning (commit the highest-probability predictions first) is Dream's "maskgit_plus".
_DREAM_ALIASES = {"low_confidence": "maskgit_plus"}
DREAM_EPS = 1e-3  # Dream's final timestep: the schedule never reaches t = 0 exactly.
_ENTROPY_EPS = 1e-10


@dataclass
class SamplingConfig:
    """Sampling knobs shared by both families (each family reads the ones it uses)."""

    max_new_tokens: int = 64
    steps: int = 64  # total denoising steps over all blocks (MDLM); Dream: number of timesteps
    block_size: int = 32  # MDLM semi-autoregressive block length (clipped to max_new_tokens)
    temperature: float = 0.0  # 0 = greedy, deterministic
    algorithm: str = "low_confidence"  # MDLM: low_confidence | random; Dream: see DREAM_ALGORITHMS
    seed: int = 0

    def __post_init__(self) -> None:
        """Fail at construction, not halfway through a generation run."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def clean_generation(
    tokens: Sequence[int], *, mask_id: int | None, stop_ids: Collection[int], pad_id: int | None
) -> list[int]:
    """Cut at the first stop id and drop mask/pad tokens, so callers can decode directly."""
    stops = set(stop_ids)
    out: list[int] = []
    for token in tokens:
        token = int(token)
        if token in stops:
            break
        if token in (mask_id, pad_id):
            continue
        out.append(token)
    return out


# --------------------------------------------------------------------------- helpers


def _model_device(model: nn.Module) -> torch.device:
    """Inputs must live where the weights are; parameter-free modules run on the CPU."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Sampling must not use dropout, and must not leave a training model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A private generator makes sampling reproducible without touching global RNG state."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _forward(model: nn.Module, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """One full forward of a single sequence; fp32 logits [L, V] that never pick the mask."""
    logits = model(input_ids=x.unsqueeze(0)).logits[0].float()
    if 0 <= mask_id < logits.shape[-1]:
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    return logits


def _shift_right(logits: torch.Tensor) -> torch.Tensor:
    """Dream scores token i at raw position i - 1; position 0 reuses its own row."""
    return torch.cat([logits[:1], logits[:-1]], dim=0)


def _gumbel_argmax(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Greedy at temperature 0, otherwise a sample from softmax(logits / temperature).

    float64 as in LLaDA: low-precision Gumbel noise is known to hurt generation quality.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def _even_split(num_masks: int, steps: int) -> list[int]:
    """Tokens to commit per step: an even split, the remainder on the first steps (LLaDA)."""
    base, remainder = divmod(num_masks, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


def _commit_top(
    x: torch.Tensor, x0: torch.Tensor, confidence: torch.Tensor, masked: torch.Tensor, k: int
) -> None:
    """Write the k most confident predictions at masked positions of x (in place)."""
    k = min(k, int(masked.sum()))
    if k <= 0:
        return
    scores = torch.where(masked, confidence, torch.full_like(confidence, -torch.inf))
    index = scores.topk(k).indices
    x[index] = x0[index]


# --------------------------------------------------------------------------- MDLM


def _block_bounds(length: int, block_size: int) -> list[tuple[int, int]]:
    """Half-open [lo, hi) spans of the generated region; the last block may be shorter."""
    size = min(block_size, length)
    return [(lo, min(lo + size, length)) for lo in range(0, length, size)]


def _mdlm_step(
    model: nn.Module,
    x: torch.Tensor,
    span: tuple[int, int],
    k: int,
    *,
    mask_id: int,
    config: SamplingConfig,
    generator: torch.Generator,
) -> None:
    """One forward over the whole sequence; commit k tokens inside the current block only."""
    lo, hi = span
    logits = _forward(model, x, mask_id)[lo:hi]
    x0 = _gumbel_argmax(logits, config.temperature, generator)
    if config.algorithm == "low_confidence":
        # LLaDA scores with the untempered probabilities even when sampling.
        confidence = F.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence = torch.rand(hi - lo, generator=generator, device=x.device)
    block = x[lo:hi]  # a view: committing into it writes into x
    _commit_top(block, x0, confidence.float(), block == mask_id, k)


def _mdlm_one(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    mask_id: int,
    stop_ids: Collection[int],
    config: SamplingConfig,
    generator: torch.Generator,
    device: torch.device,
) -> list[int]:
    """Generate for one prompt; returns the raw generated span (masks possible only if cut)."""
    start = len(prompt)
    x = torch.tensor([*prompt] + [mask_id] * config.max_new_tokens, device=device)
    blocks = _block_bounds(config.max_new_tokens, config.block_size)
    steps_per_block = max(1, config.steps // len(blocks))
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    for lo, hi in blocks:
        span = (start + lo, start + hi)
        for k in _even_split(hi - lo, min(steps_per_block, hi - lo)):
            _mdlm_step(model, x, span, k, mask_id=mask_id, config=config, generator=generator)
        if stops.numel() and torch.isin(x[span[0] : span[1]], stops).any():
            break
    return x[start:].tolist()


@torch.no_grad()
def generate_mdlm(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    mask_id: int,
    stop_ids: Collection[int],
    pad_id: int | None,
    config: SamplingConfig,
) -> list[list[int]]:
    """Block-wise low-confidence (or random) remasking sampler for BERT-family and LLaDA.

    Each block of ``block_size`` gets ``steps // num_blocks`` forward passes (at least 1,
    at most the block length); returns the cleaned generated tokens, without the prompt.
    """
    if config.algorithm not in MDLM_ALGORITHMS:
        raise ValueError(
            f"MDLM algorithm must be one of {MDLM_ALGORITHMS}, got {config.algorithm!r}"
        )
    if config.max_new_tokens == 0:
        return [[] for _ in prompts]
    device = _model_device(model)
    generator = _make_generator(device, config.seed)
    outputs = []
    with eval_mode(model):
        for prompt in prompts:
            raw = _mdlm_one(
                model,
                prompt,
                mask_id=mask_id,
                stop_ids=stop_ids,
                config=config,
                generator=generator,
                device=device,
            )
            outputs.append(clean_generation(raw, mask_id=mask_id, stop_ids=stop_ids, pad_id=pad_id))
    return outputs


generate_mdlm.algorithms = MDLM_ALGORITHMS


# --------------------------------------------------------------------------- Dream


def _dream_predict(
    logits: torch.Tensor, algorithm: str, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted tokens and their confidence under Dream's algorithm (tempered probs)."""
    if temperature > 0:
        logits = logits / temperature
    probs = F.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        top = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        top, x0 = probs.max(dim=-1)
    if algorithm == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return x0, top2[:, 0] - top2[:, 1]
    if algorithm == "entropy":
        return x0, (probs * torch.log(probs + _ENTROPY_EPS)).sum(dim=-1)
    return x0, top


def _dream_step(
    x: torch.Tensor,
    logits: torch.Tensor,
    masked: torch.Tensor,
    ratio: torch.Tensor,
    last: bool,
    *,
    config: SamplingConfig,
    algorithm: str,
    generator: torch.Generator,
) -> None:
    """Update the generated span x in place for one s -> t step (ratio = s / t)."""
    x0, confidence = _dream_predict(logits, algorithm, config.temperature, generator)
    if algorithm == "origin":
        p_transfer = 1.0 if last else float(1 - ratio)
        draw = torch.rand(x.shape[0], generator=generator, device=x.device)
        reveal = masked & (draw < p_transfer)
        x[reveal] = x0[reveal]
        return
    num_masks = int(masked.sum())
    # Computed on the float32 schedule tensor, like the reference, so counts match exactly.
    k = num_masks if last else int(num_masks * (1 - ratio))
    _commit_top(x, x0, confidence.float(), masked, k)


def _dream_one(
    model: nn.Module,
    prompt: Sequence[int],
    *,
    mask_id: int,
    config: SamplingConfig,
    algorithm: str,
    generator: torch.Generator,
    device: torch.device,
) -> list[int]:
    """Generate for one prompt over Dream's linear timestep schedule."""
    start = len(prompt)
    x = torch.tensor([*prompt] + [mask_id] * config.max_new_tokens, device=device)
    timesteps = torch.linspace(1, DREAM_EPS, config.steps + 1, device=device)
    for i in range(config.steps):
        gen = x[start:]  # a view: updates write into x
        masked = gen == mask_id
        if not masked.any():  # only "origin" can finish early; later forwards are no-ops
            break
        logits = _shift_right(_forward(model, x, mask_id))[start:]
        ratio = timesteps[i + 1] / timesteps[i]
        last = i == config.steps - 1
        _dream_step(
            gen,
            logits,
            masked,
            ratio,
            last,
            config=config,
            algorithm=algorithm,
            generator=generator,
        )
    return x[start:].tolist()


@torch.no_grad()
def generate_dream(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    mask_id: int,
    stop_ids: Collection[int],
    pad_id: int | None,
    config: SamplingConfig,
) -> list[list[int]]:
    """Dream's diffusion sampler (right-shifted logits); ``config.steps`` forward passes.

    ``block_size`` is unused: Dream denoises the whole span at once. ``"low_confidence"`` is
    accepted as an alias of ``"maskgit_plus"`` so one default config serves both families.
    """
    algorithm = _DREAM_ALIASES.get(config.algorithm, config.algorithm)
    if algorithm not in DREAM_ALGORITHMS:
        raise ValueError(
            f"Dream algorithm must be one of {DREAM_ALGORITHMS}, got {config.algorithm!r}"
        )
    if config.max_new_tokens == 0:
        return [[] for _ in prompts]
    device = _model_device(model)
    generator = _make_generator(device, config.seed)
    outputs = []
    with eval_mode(model):
        for prompt in prompts:
            raw = _dream_one(
                model,
                prompt,
                mask_id=mask_id,
                config=config,
                algorithm=algorithm,
                generator=generator,
                device=device,
            )
            outputs.append(clean_generation(raw, mask_id=mask_id, stop_ids=stop_ids, pad_id=pad_id))
    return outputs


generate_dream.algorithms = DREAM_ALGORITHMS + tuple(_DREAM_ALIASES)


# --------------------------------------------------------------------------- DiffusionGemma

DIFFUSION_GEMMA_ALGORITHMS = ("entropy_bound",)


@torch.no_grad()
def generate_diffusion_gemma(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    mask_id: int | None,
    stop_ids: Collection[int],
    pad_id: int | None,
    config: SamplingConfig,
) -> list[list[int]]:
    """DiffusionGemma's own generation (transformers' `generate`, peft models included).

    Canvases of the model's canvas_length tokens start as uniformly random ids; per
    canvas at most ``config.steps`` denoising steps (entropy-bound acceptance, the
    model's temperature schedule, self-conditioning on the previous step, early stop
    once stable); the argmax canvas is kept and the next one conditions on it.
    ``block_size``, ``temperature`` and ``algorithm`` do not apply (the model's
    generation config holds its sampler settings). The global RNG, which the model's
    sampler draws from, is seeded from ``config.seed`` inside a forked RNG state.
    """
    if config.max_new_tokens == 0:
        return [[] for _ in prompts]
    device = _model_device(model)
    outputs = []
    cuda = [device.index or 0] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        for prompt in prompts:
            sequences = model.generate(
                input_ids=torch.tensor([list(prompt)], device=device),
                max_new_tokens=config.max_new_tokens,
                max_denoising_steps=config.steps,
                eos_token_id=sorted(stop_ids),
                pad_token_id=pad_id,
                return_dict_in_generate=False,
            )
            raw = sequences[0, len(prompt) : len(prompt) + config.max_new_tokens].tolist()
            outputs.append(clean_generation(raw, mask_id=mask_id, stop_ids=stop_ids, pad_id=pad_id))
    return outputs


# generate.py's default algorithm name is accepted and means the model's own sampler.
generate_diffusion_gemma.algorithms = DIFFUSION_GEMMA_ALGORITHMS + ("low_confidence",)
