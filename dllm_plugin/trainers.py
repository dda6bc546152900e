"""MDLMTrainer, DreamTrainer and their block-diffusion (BD3LM) forms: transformers.Trainer
subclasses with the diffusion losses.

Only `compute_loss` (and the evaluation step and metrics) are ours, so checkpoints,
resume, DDP/FSDP/DeepSpeed and trackers come from the Trainer unchanged. The loss math
lives in diffusion/ (noise.py, loss.py, masked_head.py); `compute_loss` reads as the
recipe of docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .data.collators import DreamCollator, MDLMCollator
from .diffusion.blocks import (
    attention_mask_for,
    bd3lm_keep_mask,
    bd3lm_position_ids,
    draw_block_noise,
    source_columns,
)
from .diffusion.loss import (
    IGNORE_INDEX,
    NORM_TYPES,
    loss_weights,
    normaliser,
    parse_loss_weight_type,
)
from .diffusion.masked_head import HeadVerdict, score_masked
from .diffusion.noise import EVAL, TRAIN, draw_row_noise
from .diffusion.schedules import get_schedule

logger = logging.getLogger(__name__)


@dataclass
class MDLMTrainingArguments(TrainingArguments):
    """TrainingArguments plus the masked-diffusion loss options."""

    time_epsilon: float = field(
        default=1e-3, metadata={"help": "t ~ U[time_epsilon, 1): avoids 1/t blowing up."}
    )
    noise_schedule: str = field(default="linear", metadata={"help": "alpha(t): linear or cosine."})
    loss_weight_type: str = field(
        default="scheduler",
        metadata={"help": "scheduler (-alpha'/(1-alpha)), uniform, or cart[geo_p:P] (Dream)."},
    )
    loss_norm_type: str = field(
        default="token", metadata={"help": "token, sequence or batch normalisation."}
    )
    score_masked_only: bool = field(
        default=True,
        metadata={"help": "Run the vocabulary head and CE only at masked positions, in chunks."},
    )
    head_chunk_size: int = field(
        default=2048, metadata={"help": "Masked positions per head/CE chunk."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Collators need prompt_len."}
    )


@dataclass
class DreamTrainingArguments(MDLMTrainingArguments):
    """Dream SFT: CART weights by default; the batch collator does the response cutoff."""

    loss_weight_type: str = field(
        default="cart[geo_p:0.3]", metadata={"help": "cart[geo_p:P] or scheduler."}
    )
    perbatch_cutoff: bool = field(
        default=True, metadata={"help": "Trim responses to one sampled length per batch."}
    )
    resp_cutoff_ratio: float = field(
        default=0.0, metadata={"help": "Only with perbatch_cutoff off: tail-cut probability."}
    )


class MDLMTrainer(Trainer):
    """Masked-diffusion SFT (MDLM/LLaDA recipe) as a Trainer.

    The loss: per sequence t ~ U[eps, 1); mask each maskable position with probability
    1 - alpha(t); one forward on the noised ids; cross-entropy against the clean ids at
    masked positions, weighted (1/t for linear) and normalised.
    """

    arguments_class = MDLMTrainingArguments
    shift_logits = False
    # compute_loss scales for gradient accumulation and world size itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self, *args: Any, mask_token_id: int, bos_token_id: int | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.mask_token_id = mask_token_id
        self.bos_token_id = bos_token_id
        # Ask the Trainer for the global maskable-token count of each optimizer step.
        self.model_accepts_loss_kwargs = True
        self.schedule = get_schedule(self.args.noise_schedule)
        self.weight_kind, self.geo_p = parse_loss_weight_type(self.args.loss_weight_type)
        if self.args.loss_norm_type not in NORM_TYPES:
            raise ValueError(
                f"loss_norm_type {self.args.loss_norm_type!r}: expected one of {NORM_TYPES}"
            )
        self.head_verdict = HeadVerdict(
            self.accelerator.unwrap_model, lambda: bool(self.is_fsdp_enabled)
        )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._micro_step = (-1, 0)  # (global_step, micro-batches seen in it)
        self._eval_batches = 0

    @classmethod
    def collator(cls, pad_token_id: int, cfg: Any) -> MDLMCollator:
        """The batch collator this method trains with."""
        return MDLMCollator(pad_token_id=pad_token_id)

    # ---- the loss ----------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        training = model.training
        input_ids, labels = self.model_inputs(inputs["input_ids"], inputs["labels"])
        maskable = labels != IGNORE_INDEX
        # 1-2. a timestep per row (per block for block diffusion) and its mask
        t, masked = self.draw_noise(maskable, self._first_row_key(training))
        # 5-6. per-position weight over the normaliser: loss = sum(scale * CE)
        scale = self.loss_scale(t, masked, maskable, num_items_in_batch, training)
        # 3-4. the noised ids, one forward, cross-entropy at masked positions only
        loss, ce = self.score(model, input_ids, masked, scale)
        self._add_metrics(training, ce, masked, maskable)
        return (loss, None) if return_outputs else loss

    def score(
        self, model: nn.Module, input_ids: torch.Tensor, masked: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, one forward, and (sum of scale * CE, the CE of each masked position in the
        order of masked.nonzero())."""
        noised = torch.where(masked, torch.full_like(input_ids, self.mask_token_id), input_ids)
        head = self.head_verdict.head(model, noised) if self.args.score_masked_only else None
        inputs, forward = self.forward_inputs(model, noised, input_ids)
        return score_masked(
            model, head, inputs, input_ids, masked, scale,
            lambda cols: self.source_columns(cols, input_ids.shape[1]),
            self.args.head_chunk_size, **forward,
        )  # fmt: skip

    def forward_inputs(
        self, model: nn.Module, noised: torch.Tensor, clean: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """What the model reads, and its other forward kwargs: MDLM reads the noised ids
        alone (no attention mask: the padding EOS it is trained on must be visible)."""
        return noised, {}

    def source_columns(self, cols: torch.Tensor, length: int) -> torch.Tensor:
        """Output columns that score columns `cols` (one to the left when shifted)."""
        return cols - 1 if self.shift_logits else cols

    def position_weights(self, t: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The loss weight of every position [b, l] (0 where not masked)."""
        return loss_weights(self.weight_kind, t, masked, self.schedule, self.geo_p)

    def model_inputs(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as the model sees it (Dream prepends BOS); MDLM uses it as it is."""
        return input_ids, labels

    def draw_noise(
        self, maskable: torch.Tensor, key: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [b], masked [b, l]) keyed by (seed, phase, step, global row), where `key` is
        (phase, step, global index of the first row).

        Block diffusion overrides it: one t per block, returned per position [b, l]."""
        phase, step, first_row = key
        return draw_row_noise(
            maskable, self.schedule, self.args.time_epsilon, self.args.seed, phase, step, first_row
        )

    def _first_row_key(self, training: bool) -> tuple[int, int, int]:
        """(phase, step, index of this micro-batch's first row in the global batch).

        Micro-batch `m` of an optimizer step on process `p` holds global rows
        (m * world_size + p) * batch_size + i: the same rows whether they are spread over
        processes or over accumulation steps.
        """
        if training:
            step, seen = self._micro_step
            seen = seen + 1 if step == self.state.global_step else 0
            self._micro_step = (self.state.global_step, seen)
            slot = seen * self.args.world_size + self.args.process_index
            return TRAIN, self.state.global_step, slot * self.args.per_device_train_batch_size
        slot = self._eval_batches * self.args.world_size + self.args.process_index
        self._eval_batches += 1
        return EVAL, 0, slot * self.args.per_device_eval_batch_size

    def loss_scale(
        self,
        t: torch.Tensor,
        masked: torch.Tensor,
        maskable: torch.Tensor,
        num_items: torch.Tensor | int | None,
        training: bool,
    ) -> torch.Tensor:
        """Per-position weight times 1/normaliser [b, l] (zero where not masked)."""
        weights = self.position_weights(t, masked)
        accumulation = (
            getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            if training
            else 1
        )
        norm = normaliser(
            self.args.loss_norm_type,
            maskable,
            global_items=num_items if training else None,
            processes=self.accelerator.num_processes,
            accumulation=accumulation,
        )
        return weights * norm

    @torch.no_grad()
    def example_losses(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        key: tuple[int, int, int] = (EVAL, 0, 0),
    ) -> torch.Tensor:
        """Each row's loss [b]: the weighted CE over its masked positions divided by its
        maskable count, for the noise drawn under `key` (phase, step, first row's global
        index), so every call with the same key scores the same draws.

        The per-example form of this method's loss for evaluation (held-out ELBO): with
        `loss_norm_type` sequence, compute_loss is their mean under the training key.
        """
        input_ids, labels = self.model_inputs(input_ids, labels)
        maskable = labels != IGNORE_INDEX
        t, masked = self.draw_noise(maskable, key)
        weights = self.position_weights(t, masked)
        _, ce = self.score(model, input_ids, masked, weights)
        rows, cols = masked.nonzero(as_tuple=True)
        totals = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=ce.device)
        totals.index_add_(0, rows, (weights[rows, cols] * ce).double())
        return totals / maskable.sum(dim=1).clamp(min=1)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._eval_batches = 0  # every evaluation sees the same noise: comparable eval losses
        return super().evaluate(*args, **kwargs)

    # ---- metrics -----------------------------------------------------------------
    def _add_metrics(
        self, training: bool, ce: torch.Tensor, masked: torch.Tensor, maskable: torch.Tensor
    ) -> None:
        bucket = self._metrics["train" if training else "eval"]
        bucket["ce_sum"].append(float(ce.sum()))
        bucket["masked_tokens"].append(float(masked.sum()))
        bucket["maskable_tokens"].append(float(maskable.sum()))

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add NLL (unweighted CE per masked token), perplexity and mask ratio to the logs."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        bucket = self._metrics[mode]
        if bucket["masked_tokens"]:
            totals = torch.tensor(
                [
                    sum(bucket["ce_sum"]),
                    sum(bucket["masked_tokens"]),
                    sum(bucket["maskable_tokens"]),
                ],
                device=self.args.device,
            )
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            ce_sum, n_masked, n_maskable = totals.tolist()
            prefix = "eval_" if mode == "eval" else ""
            nll = ce_sum / max(n_masked, 1)
            logs[f"{prefix}nll"] = round(nll, 4)
            logs[f"{prefix}ppl"] = round(math.exp(min(nll, 50.0)), 4)
            logs[f"{prefix}mask_ratio"] = round(n_masked / max(n_maskable, 1), 4)
            bucket.clear()
        super().log(logs, start_time)


class DreamTrainer(MDLMTrainer):
    """Dream SFT: right-shifted logits (position i scored by the output at i-1), BOS
    prepended when needed, CART weights by default."""

    arguments_class = DreamTrainingArguments
    shift_logits = True

    @classmethod
    def collator(cls, pad_token_id: int, cfg: Any) -> DreamCollator:
        return DreamCollator(
            pad_token_id=pad_token_id,
            perbatch_cutoff=cfg.perbatch_cutoff,
            resp_cutoff_ratio=cfg.resp_cutoff_ratio,
            seed=cfg.seed,
        )

    def model_inputs(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend BOS unless every row's first label is already ignored.

        With the shift, position 0 has no predecessor: it must never be scored.
        """
        if bool((labels[:, 0] == IGNORE_INDEX).all()):
            return input_ids, labels
        if self.bos_token_id is None:
            raise ValueError(
                "Dream training needs a BOS token id to prepend (the tokenizer has none)"
            )
        bos = torch.full_like(input_ids[:, :1], self.bos_token_id)
        ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
        return torch.cat([bos, input_ids], dim=1), torch.cat([ignore, labels], dim=1)


# ---- block diffusion (BD3LM) ---------------------------------------------------------


@dataclass
class BD3LMTrainingArguments(MDLMTrainingArguments):
    """MDLM options plus the block length."""

    block_size: int = field(
        default=32, metadata={"help": "Tokens per block, in training and in sampling."}
    )


@dataclass
class DreamBD3LMTrainingArguments(DreamTrainingArguments):
    """Dream options plus the block length."""

    block_size: int = field(
        default=32, metadata={"help": "Tokens per block, in training and in sampling."}
    )


class BlockDiffusion:
    """Block diffusion (BD3LM) on top of a masked-diffusion Trainer (first in its bases).

    The recipe (diffusion/blocks.py): rows are whole blocks (the collator pads each
    answer with EOS to a whole block); one t per block; the model reads the noised copy
    followed by the clean copy under the block attention mask, both at positions
    0..L-1; the cross-entropy is taken at the masked positions of the noised copy,
    weighted and normalised as in MDLM. Right-shifted models score a block's first token
    from the clean copy's previous token (the sampler's cached prefix).
    """

    args: Any
    shift_logits: bool

    @classmethod
    def collator(cls, pad_token_id: int, cfg: Any) -> MDLMCollator:
        """The base method's collator, filling each row to whole blocks; shifted models
        never score column 0 (nothing precedes it; no BOS is prepended, so the block grid
        starts at the prompt's first token as in the sampler)."""
        base = super().collator(pad_token_id, cfg)
        return replace(base, block_size=cfg.block_size, ignore_first_token=cls.shift_logits)

    def model_inputs(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as collated: whole blocks, nothing prepended."""
        if input_ids.shape[1] % self.args.block_size:
            raise ValueError(
                f"a block-diffusion batch of width {input_ids.shape[1]} is not whole blocks of "
                f"{self.args.block_size}: use the method's collator"
            )
        if self.shift_logits and not bool((labels[:, 0] == IGNORE_INDEX).all()):
            raise ValueError("a right-shifted model cannot score column 0: its label must be -100")
        return input_ids, labels

    def draw_noise(
        self, maskable: torch.Tensor, key: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        phase, step, first_row = key
        return draw_block_noise(
            maskable, self.args.block_size, self.schedule, self.args.time_epsilon,
            self.args.seed, phase, step, first_row,
        )  # fmt: skip

    def forward_inputs(
        self, model: nn.Module, noised: torch.Tensor, clean: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """[noised ; clean] with the block mask and both copies at positions 0..L-1.

        The mask depends only on the width: it is built once per width and device (a
        [2L, 2L] mask is 67 MB at L = 4096, four times that as an additive float mask).
        """
        rows, length = clean.shape
        key = (length, clean.device)
        cached = getattr(self, "_block_mask", None)
        if cached is None or cached[0] != key:
            keep = bd3lm_keep_mask(length, self.args.block_size, clean.device)
            unwrapped = self.accelerator.unwrap_model(model)
            self._block_mask = (key, attention_mask_for(unwrapped, keep))
        positions = bd3lm_position_ids(length, clean.device).expand(rows, -1)
        return torch.cat([noised, clean], dim=1), {
            "attention_mask": self._block_mask[1],
            "position_ids": positions,
        }

    def source_columns(self, cols: torch.Tensor, length: int) -> torch.Tensor:
        return source_columns(cols, length, self.args.block_size, self.shift_logits)

    def position_weights(self, t: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        return loss_weights(
            self.weight_kind, t, masked, self.schedule, self.geo_p, self.args.block_size
        )


class BD3LMTrainer(BlockDiffusion, MDLMTrainer):
    """Block-diffusion SFT of unshifted models (BERT family, LLaDA, a2d)."""

    arguments_class = BD3LMTrainingArguments


class DreamBD3LMTrainer(BlockDiffusion, DreamTrainer):
    """Block-diffusion SFT of Dream: right-shifted logits, block-wise CART weights."""

    arguments_class = DreamBD3LMTrainingArguments
