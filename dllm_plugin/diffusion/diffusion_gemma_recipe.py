"""Block diffusion with uniform-token noise and self-conditioning: DiffusionGemma's SFT loss.

The recipe (NVIDIA NeMo AutoModel's DiffusionGemma SFT), per example, on the clean
sequence prompt + answer + EOS fill to whole blocks (CanvasCollator):
 1. noise (diffusion/noise.py, keyed per row): t ~ U[eps, 1); one answer block; a
    self-conditioning coin; each position of that block replaced by a uniformly drawn
    vocabulary id with probability t (no mask token);
 2. the causal encoder reads the clean sequence, with gradients, into a fresh cache
    that keeps every key;
 3. the bidirectional decoder denoises the chosen block (the canvas) at its absolute
    positions, attending to the encoder keys before the block (the prompt and the
    earlier clean blocks; sliding-window layers only the last sliding_window - 1 of
    them, as the inference cache holds) and to the whole canvas;
 4. pass 1 without gradients; its prediction (soft embeddings of its logits) feeds
    pass 2 for the rows whose coin came up;
 5. diffusion CE over every position of the block (corrupted or not), no 1/t weight;
 6. encoder CE: next-token CE of the clean sequence (`sequence`: every pair of
    non-padding tokens, as NeMo; `response`: the answer's tokens as targets).
 loss = sum(diffusion CE) / N_diff + w * sum(encoder CE) / N_enc, token-normalised over
 the global batch (the Trainer gives the counts).

Decoding only the chosen block gives exactly the logits NeMo's whole-window decoder
gives there (canvas blocks never attend to each other), at 1/blocks of the decoder
cost. Pass 1 runs inside the model's one forward (a hook on the decoder), so DDP sees
a single forward and the encoder runs once.

`canvas_losses` computes the per-row sums for given draws: the trainer and an
evaluation (held-out ELBO-style loss on fixed draws) share it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunked_ce import chunked_linear_cross_entropy
from .masked_head import head_chunk_rows, swapped_head
from .noise import CanvasNoise
from .soft_embedding import soft_embeddings

ENCODER_LOSS_SCOPES = ("sequence", "response")


@dataclass(frozen=True)
class CanvasRecipe:
    """The loss's knobs (the noise's are in draw_canvas_noise)."""

    block_size: int
    encoder_loss_weight: float = 1.0
    encoder_loss_scope: str = "sequence"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.encoder_loss_scope not in ENCODER_LOSS_SCOPES:
            raise ValueError(
                f"encoder_loss_scope {self.encoder_loss_scope!r}: expected one of "
                f"{ENCODER_LOSS_SCOPES}"
            )
        if self.encoder_loss_weight < 0:
            raise ValueError(f"encoder_loss_weight must be >= 0, got {self.encoder_loss_weight}")


@dataclass
class Canvas:
    """The decoder's input for one batch: the chosen block of each row."""

    start: Tensor  # [b] absolute position of the block's first token
    positions: Tensor  # [b, block] absolute positions
    targets: Tensor  # [b, block] clean ids
    noised: Tensor  # [b, block] ids the decoder sees
    scored: Tensor  # [b, block] bool: answer (or EOS fill) positions


@dataclass
class RowLosses:
    """Sums for one batch: differentiable totals and detached per-row parts."""

    diffusion: Tensor  # scalar, sum of CE over scored canvas positions (with grad)
    encoder: Tensor  # scalar, sum of encoder next-token CE over scored pairs (with grad)
    diffusion_rows: Tensor  # [b] detached sums
    diffusion_counts: Tensor  # [b]
    encoder_rows: Tensor  # [b]
    encoder_counts: Tensor  # [b]
    corrupted: Tensor  # [b] scored positions that were replaced


def num_blocks(batch: dict[str, Tensor], block_size: int) -> Tensor:
    """Answer blocks per row [b] (the collator fills answers to whole blocks)."""
    response = batch["response_len"]
    if bool((response % block_size != 0).any()):
        raise ValueError(
            f"response_len must be a multiple of the block size {block_size}: "
            f"{response.tolist()} (use CanvasCollator)"
        )
    return response // block_size


def canvas(batch: dict[str, Tensor], noise: CanvasNoise, block_size: int) -> Canvas:
    """The chosen block of every row, clean and noised."""
    ids, prompt, response = batch["input_ids"], batch["prompt_len"], batch["response_len"]
    offsets = torch.arange(block_size, device=ids.device)
    start = prompt + noise.block * block_size
    positions = start[:, None] + offsets
    scored = offsets[None, :] < (response - noise.block * block_size)[:, None]
    targets = ids.gather(1, positions.clamp(max=ids.shape[1] - 1))
    noised = torch.where(noise.corrupt & scored, noise.tokens, targets)
    return Canvas(start, positions, targets, noised, scored)


def decoder_masks(
    attention_mask: Tensor,
    start: Tensor,
    block_size: int,
    sliding_window: int | None,
    additive: bool,
) -> dict[str, Tensor]:
    """Keep-masks [b, 1, 1, S + block] over (encoder keys, canvas keys), the same row for
    every canvas query: encoder keys before the block start (sliding layers: the last
    sliding_window - 1 of them, what the inference cache holds), every canvas key.
    `additive`: 0 / -inf floats for attention that adds its mask (eager)."""
    b, seq = attention_mask.shape
    keys = torch.arange(seq, device=attention_mask.device)
    before = (keys[None, :] < start[:, None]) & attention_mask.bool()
    canvas_keys = torch.ones(b, block_size, dtype=torch.bool, device=attention_mask.device)
    full = torch.cat([before, canvas_keys], dim=1)
    sliding = full.clone()
    if sliding_window is not None:
        sliding[:, :seq] &= keys[None, :] >= (start[:, None] - sliding_window + 1)
    masks = {
        "full_attention": full[:, None, None, :],
        "sliding_attention": sliding[:, None, None, :],
    }
    if additive:
        low = torch.finfo(torch.float32).min
        masks = {
            k: torch.zeros(m.shape, device=m.device).masked_fill(~m, low) for k, m in masks.items()
        }
    return masks


def encoder_pairs(batch: dict[str, Tensor], scope: str) -> Tensor:
    """[b, S-1] bool: position i's output is scored against token i + 1."""
    attention = batch["attention_mask"].bool()
    if scope == "sequence":
        return attention[:, :-1] & attention[:, 1:]
    prompt, response = batch["prompt_len"], batch["response_len"]
    target = torch.arange(1, attention.shape[1], device=attention.device)[None, :]
    return (target >= prompt[:, None]) & (target < (prompt + response)[:, None])


def scored_counts(batch: dict[str, Tensor], recipe: CanvasRecipe) -> Tensor:
    """[N_diff, N_enc] of a batch: what the loss is normalised by (the same for any draws:
    every position of a chosen block is scored)."""
    n_diff = recipe.block_size * (batch["response_len"] > 0).sum()
    n_enc = encoder_pairs(batch, recipe.encoder_loss_scope).sum()
    return torch.stack([n_diff, n_enc]).to(torch.float32)


def cache_argument(base: nn.Module) -> str:
    """The forward's name for the cache: `cache` (transformers >= 5.24), else the
    older `past_key_values`."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    logits = logits.float()
    return logits if cap is None else torch.tanh(logits / cap) * cap


class _SelfConditioning:
    """Runs pass 1 inside the model's forward and feeds pass 2 (hooks on the decoder).

    The decoder's pre-hook runs the decoder once without gradients on the same inputs
    (pass 1), then either hands its logits to the decoder (`materialise`: the model's
    own self-conditioning path) or computes the soft embeddings chunk by chunk and puts
    them where the model would put its own (a pre-hook on the self-conditioning MLP,
    which otherwise receives zeros). Rows whose coin is False get zeros, as the model's
    `self_conditioning_mask` gives them.
    """

    def __init__(self, base: nn.Module, rows: Tensor, head: nn.Linear, materialise: bool):
        self.base, self.rows, self.head, self.materialise = base, rows, head, materialise
        self.decoder = base.model.decoder
        self.cap = getattr(base, "final_logit_softcapping", None)
        self.signal: Tensor | None = None
        self.done = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = [
            self.decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True),
            self.decoder.self_conditioning.register_forward_pre_hook(self._before_mixer),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if not self.done:
            raise RuntimeError("the decoder never ran: self-conditioning pass 1 missing")

    def _before_decoder(self, module, args, kwargs):
        if self.done:
            return None
        self.done = True
        with torch.no_grad():
            hidden = module.forward(*args, **kwargs).last_hidden_state
            if self.materialise:
                logits = _softcap(self.head(hidden), self.cap)
                extra = {"self_conditioning_logits": logits, "self_conditioning_mask": self.rows}
                return args, {**kwargs, **extra}
        embed = self.decoder.embed_tokens
        flat = soft_embeddings(
            hidden.reshape(-1, hidden.shape[-1]),
            self.head.weight,
            embed.weight,
            embed.embed_scale.to(embed.weight.dtype),
            self.cap,
        )
        signal = flat.view(*hidden.shape[:2], -1)
        self.signal = signal * self.rows.to(signal.dtype)[:, None, None]
        return None

    def _before_mixer(self, module, args):
        if self.signal is None:
            return None
        embeds, _zeros = args
        signal, self.signal = self.signal, None
        return embeds, signal


def _per_row(values: Tensor, rows: Tensor, b: int) -> Tensor:
    return torch.zeros(b, dtype=torch.float32, device=values.device).index_add_(
        0, rows, values.float()
    )


def canvas_losses(
    model: nn.Module,
    base: nn.Module,
    head: nn.Linear | None,
    batch: dict[str, Tensor],
    noise: CanvasNoise,
    recipe: CanvasRecipe,
    chunk_rows: int = 2048,
) -> RowLosses:
    """The recipe's CE sums for one batch and fixed draws.

    `model` is what the forward goes through (DDP/peft wrappers included); `base` the
    DiffusionGemmaForBlockDiffusion inside it. `head` given: the chunked head + soft-
    capped CE on the scored rows only and chunked self-conditioning; None: the model's
    own full logits everywhere (pass 1's [b, block, V] logits, pass 2's, the encoder's
    [b, S, V]).
    """
    from transformers import DynamicCache

    ids, attention = batch["input_ids"], batch["attention_mask"]
    b, seq = ids.shape
    text = base.config.get_text_config()
    cap = getattr(base, "final_logit_softcapping", None)
    canvas_ = canvas(batch, noise, recipe.block_size)
    masks = decoder_masks(
        attention,
        canvas_.start,
        recipe.block_size,
        text.sliding_window if "sliding_attention" in text.layer_types else None,
        additive=text._attn_implementation == "eager",
    )
    inputs = {
        cache_argument(base): DynamicCache(),  # config-less: keeps every key of every layer
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": torch.arange(seq, device=ids.device).expand(b, seq),
        "decoder_input_ids": canvas_.noised,
        "decoder_attention_mask": masks,
        "decoder_position_ids": canvas_.positions,
    }
    two_pass = _SelfConditioning(base, noise.self_condition, head or base.lm_head, head is None)
    pairs = encoder_pairs(batch, recipe.encoder_loss_scope)
    pair_rows, pair_cols = pairs.nonzero(as_tuple=True)
    block_rows, block_cols = canvas_.scored.nonzero(as_tuple=True)
    targets = canvas_.targets[block_rows, block_cols]
    next_tokens = ids[pair_rows, pair_cols + 1]
    if head is None:
        with two_pass.installed():
            out = model(**inputs)
        picked = out.logits[block_rows, block_cols]
        diffusion_ce = F.cross_entropy(picked, targets, reduction="none")
        encoder_logits = _softcap(base.lm_head(out.encoder_last_hidden_state), cap)
        encoder_ce = F.cross_entropy(
            encoder_logits[pair_rows, pair_cols], next_tokens, reduction="none"
        )
        diffusion, encoder = diffusion_ce.sum(), encoder_ce.sum()
        diffusion_ce, encoder_ce = diffusion_ce.detach(), encoder_ce.detach()
    else:
        with two_pass.installed(), swapped_head(model, head, empty_output=True) as seen:
            out = model(**inputs)
        if len(seen) != 1:
            raise RuntimeError(f"the head ran {len(seen)} times in one forward, expected once")
        hidden, encoder_hidden = seen[0], out.encoder_last_hidden_state
        chunk_rows = head_chunk_rows(head, chunk_rows)
        diffusion, diffusion_ce = chunked_linear_cross_entropy(
            hidden[block_rows, block_cols], head.weight, head.bias, targets,
            torch.ones_like(targets, dtype=torch.float32), chunk_rows, softcap=cap,
        )  # fmt: skip
        encoder, encoder_ce = chunked_linear_cross_entropy(
            encoder_hidden[pair_rows, pair_cols], head.weight, head.bias, next_tokens,
            torch.ones_like(next_tokens, dtype=torch.float32), chunk_rows, softcap=cap,
        )  # fmt: skip
    return RowLosses(
        diffusion=diffusion,
        encoder=encoder,
        diffusion_rows=_per_row(diffusion_ce, block_rows, b),
        diffusion_counts=canvas_.scored.sum(1).float(),
        encoder_rows=_per_row(encoder_ce, pair_rows, b),
        encoder_counts=pairs.sum(1).float(),
        corrupted=(noise.corrupt & canvas_.scored).sum(1).float(),
    )
