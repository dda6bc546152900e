"""DiffusionGemmaTrainer: block-diffusion SFT of DiffusionGemma as a transformers.Trainer.

The recipe (diffusion/diffusion_gemma_recipe.py) reads step by step in `compute_loss`; its draws
come from diffusion/noise.py, keyed by (seed, phase, step, global row) like every other
method's, and its normalisers are the global counts of scored tokens of each optimizer
step, so neither gradient accumulation nor the process count changes the loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from .data.collators import CanvasCollator
from .diffusion.diffusion_gemma_recipe import (
    CanvasRecipe,
    canvas_losses,
    num_blocks,
    scored_counts,
)
from .diffusion.masked_head import HeadVerdict
from .diffusion.noise import draw_canvas_noise
from .errors import ModelError
from .models.families import TokenIds
from .trainers import DiffusionTrainer

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # the ones the 4-D training masks suit


@dataclass
class DiffusionGemmaTrainingArguments(TrainingArguments):
    """TrainingArguments plus the block-diffusion recipe's options (manifest defaults)."""

    time_epsilon: float = field(
        default=1e-3, metadata={"help": "t ~ U[time_epsilon, 1): corruption probability."}
    )
    canvas_length: int = field(
        default=0, metadata={"help": "Block (canvas) size; 0 = the model's canvas_length."}
    )
    encoder_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the encoder's causal-LM loss."}
    )
    encoder_loss_scope: str = field(
        default="sequence", metadata={"help": "sequence (every token) or response."}
    )
    self_conditioning_prob: float = field(
        default=0.5, metadata={"help": "Per row: probability that pass 1 feeds pass 2."}
    )
    score_masked_only: bool = field(
        default=True,
        metadata={"help": "Chunked head/CE and self-conditioning instead of full logits."},
    )
    head_chunk_size: int = field(default=2048, metadata={"help": "Rows per head/CE chunk."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "The collator's prompt/response lengths are needed."}
    )


def block_size(canvas_length: int, model_config: dict[str, Any]) -> int:
    """The block (canvas) size: the option, or with 0 the model's own canvas_length."""
    size = canvas_length or model_config.get("canvas_length")
    if not isinstance(size, int) or size < 1:
        raise ModelError(
            "canvas_length: 0 takes the model's canvas_length, but its config has none; "
            "set canvas_length"
        )
    return size


def base_model(model: nn.Module, unwrap: Any) -> nn.Module:
    """The DiffusionGemmaForBlockDiffusion inside DDP/peft wrappers."""
    unwrapped = unwrap(model)
    return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped


class DiffusionGemmaTrainer(DiffusionTrainer):
    """Block-diffusion SFT with uniform-token noise and two-pass self-conditioning."""

    arguments_class = DiffusionGemmaTrainingArguments

    def __init__(
        self,
        *args: Any,
        mask_token_id: int | None = None,  # the run passes every method's ids; no mask here
        bos_token_id: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        base = base_model(self.model, self.accelerator.unwrap_model)
        self.recipe = CanvasRecipe(
            block_size(self.args.canvas_length, base.config.to_dict()),
            self.args.encoder_loss_weight,
            self.args.encoder_loss_scope,
        )
        if not 0.0 <= self.args.self_conditioning_prob <= 1.0:
            raise ValueError(
                f"self_conditioning_prob must be in [0, 1], got {self.args.self_conditioning_prob}"
            )
        attention = base.config.get_text_config()._attn_implementation
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ModelError(
                f"DiffusionGemma training needs attention {' or '.join(ATTENTION_IMPLEMENTATIONS)}, "
                f"the model uses {attention!r}"
            )
        if base.config.canvas_length != self.recipe.block_size:
            logger.info(
                "canvas_length %d (the model's was %s): the saved model generates %d-token canvases",
                self.recipe.block_size,
                base.config.canvas_length,
                self.recipe.block_size,
            )
            base.config.canvas_length = self.recipe.block_size
        self.vocab_size = base.config.get_text_config().vocab_size
        self.head_verdict = HeadVerdict(
            self.accelerator.unwrap_model, lambda: bool(self.is_fsdp_enabled), probe=False
        )

    @classmethod
    def collator(cls, ids: TokenIds, cfg: Any, model_config: dict[str, Any]) -> CanvasCollator:
        return CanvasCollator(
            pad_token_id=ids.pad_id,
            eos_token_id=ids.eos_id,
            block_size=block_size(cfg.canvas_length, model_config),
        )

    # ---- the loss ----------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        training = model.training
        # 1. per row: t, the scored block, the self-conditioning coin, the corruption
        phase, step, first_row = self._first_row_key(training)
        noise = draw_canvas_noise(
            num_blocks(inputs, self.recipe.block_size), self.recipe.block_size,
            self.vocab_size, self.args.time_epsilon, self.args.self_conditioning_prob,
            self.args.seed, phase, step, first_row,
        )  # fmt: skip
        # 2-6. encoder on the clean sequence, two decoder passes on the block, the CE sums
        head = self.head_verdict.head(model, None) if self.args.score_masked_only else None
        base = base_model(model, self.accelerator.unwrap_model)
        losses = canvas_losses(
            model, base, head, inputs, noise, self.recipe, self.args.head_chunk_size
        )
        # token normalisation over the global batch
        n_diffusion, n_encoder = self.normalisers(inputs, num_items_in_batch, training)
        loss = losses.diffusion / n_diffusion
        if self.recipe.encoder_loss_weight:
            loss = loss + self.recipe.encoder_loss_weight * losses.encoder / n_encoder
        self._record(
            training,
            diffusion_ce=losses.diffusion_rows,
            diffusion_tokens=losses.diffusion_counts,
            corrupted_tokens=losses.corrupted,
            encoder_ce=losses.encoder_rows,
            encoder_tokens=losses.encoder_counts,
        )
        return (loss, None) if return_outputs else loss

    def normalisers(
        self, inputs: dict[str, torch.Tensor], global_counts: torch.Tensor | None, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_diffusion, N_encoder) dividing this micro-batch's sums.

        Training: the optimizer step's global counts (all processes and accumulation
        steps) over the process count, which DDP's gradient averaging multiplies back.
        Without them (evaluation): this batch's own counts.
        """
        if training and global_counts is not None:
            counts = global_counts / self.accelerator.num_processes
        else:
            counts = scored_counts(inputs, self.recipe)
            if training:
                counts = counts * getattr(
                    self,
                    "current_gradient_accumulation_steps",
                    self.args.gradient_accumulation_steps,
                )
        counts = counts.to(inputs["input_ids"].device).clamp(min=1)
        return counts[0], counts[1]

    def _get_num_items_in_batch(
        self, batch_samples: list, device: torch.device
    ) -> torch.Tensor | None:
        """[N_diffusion, N_encoder] of the whole optimizer step (every process): the
        Trainer passes it to compute_loss as `num_items_in_batch`."""
        if not batch_samples:
            return None
        counts = sum(scored_counts(batch, self.recipe) for batch in batch_samples).to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return counts

    def metrics_from(self, totals: dict[str, float]) -> dict[str, float]:
        """nll/ppl: diffusion CE per scored canvas token; encoder_nll: the encoder's
        next-token CE per scored token; corrupt_ratio: replaced share of scored tokens."""
        nll = totals["diffusion_ce"] / max(totals["diffusion_tokens"], 1)
        encoder_nll = totals["encoder_ce"] / max(totals["encoder_tokens"], 1)
        return {
            "nll": round(nll, 4),
            "ppl": round(math.exp(min(nll, 50.0)), 4),
            "encoder_nll": round(encoder_nll, 4),
            "corrupt_ratio": round(
                totals["corrupted_tokens"] / max(totals["diffusion_tokens"], 1), 4
            ),
        }
