"""MDLMTrainer and DreamTrainer: transformers.Trainer subclasses with the diffusion losses.

Only `compute_loss` (and the evaluation step and metrics) are ours, so checkpoints,
resume, DDP/FSDP/DeepSpeed and trackers come from the Trainer unchanged. The loss math
lives in diffusion/ (noise.py, loss.py, masked_head.py); `compute_loss` reads as the
recipe of docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .data.collators import DreamCollator, MDLMCollator
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
from .models.families import TokenIds

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


class DiffusionTrainer(Trainer):
    """What every diffusion method's Trainer shares: noise keyed by global row, the same
    noise at every evaluation, loss-only prediction steps, and per-token metrics summed
    over processes when they are logged (`metrics_from` names them)."""

    # compute_loss scales for gradient accumulation and world size itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._micro_step = (-1, 0)  # (global_step, micro-batches seen in it)
        self._eval_batches = 0

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

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._eval_batches = 0  # every evaluation sees the same noise: comparable eval losses
        return super().evaluate(*args, **kwargs)

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

    # ---- metrics -----------------------------------------------------------------
    def _record(self, training: bool, **sums: torch.Tensor) -> None:
        bucket = self._metrics["train" if training else "eval"]
        for name, value in sums.items():
            bucket[name].append(float(value.sum()))

    def metrics_from(self, totals: dict[str, float]) -> dict[str, float]:
        """Logged metrics from the summed buckets (names without the eval_ prefix)."""
        raise NotImplementedError

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the method's metrics (summed over processes since the last log) to the logs."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        bucket = self._metrics[mode]
        if bucket:
            names = sorted(bucket)
            totals = torch.tensor([sum(bucket[n]) for n in names], device=self.args.device)
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            prefix = "eval_" if mode == "eval" else ""
            metrics = self.metrics_from(dict(zip(names, totals.tolist(), strict=True)))
            logs.update({f"{prefix}{k}": v for k, v in metrics.items()})
            bucket.clear()
        super().log(logs, start_time)


class MDLMTrainer(DiffusionTrainer):
    """Masked-diffusion SFT (MDLM/LLaDA recipe) as a Trainer.

    The loss: per sequence t ~ U[eps, 1); mask each maskable position with probability
    1 - alpha(t); one forward on the noised ids; cross-entropy against the clean ids at
    masked positions, weighted (1/t for linear) and normalised.
    """

    arguments_class = MDLMTrainingArguments
    shift_logits = False

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

    @classmethod
    def collator(cls, ids: TokenIds, cfg: Any, model_config: dict[str, Any]) -> MDLMCollator:
        """The batch collator this method trains with."""
        return MDLMCollator(pad_token_id=ids.pad_id)

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
        # 1-3. a timestep per row, its mask, the noised ids
        t, masked = self.draw_noise(maskable, training)
        noised = torch.where(masked, torch.full_like(input_ids, self.mask_token_id), input_ids)
        # 5-6. per-position weight over the normaliser: loss = sum(scale * CE)
        scale = self.loss_scale(t, masked, maskable, num_items_in_batch, training)
        # 4. one forward; cross-entropy at masked positions only
        head = self.head_verdict.head(model, noised) if self.args.score_masked_only else None
        loss, ce = score_masked(
            model, head, noised, input_ids, masked, scale, self.shift_logits,
            self.args.head_chunk_size,
        )  # fmt: skip
        self._record(training, ce_sum=ce, masked_tokens=masked, maskable_tokens=maskable)
        return (loss, None) if return_outputs else loss

    def model_inputs(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as the model sees it (Dream prepends BOS); MDLM uses it as it is."""
        return input_ids, labels

    def draw_noise(
        self, maskable: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [b], masked [b, l]) keyed by (seed, phase, step, global row)."""
        phase, step, first_row = self._first_row_key(training)
        return draw_row_noise(
            maskable, self.schedule, self.args.time_epsilon, self.args.seed, phase, step, first_row
        )

    def loss_scale(
        self,
        t: torch.Tensor,
        masked: torch.Tensor,
        maskable: torch.Tensor,
        num_items: torch.Tensor | int | None,
        training: bool,
    ) -> torch.Tensor:
        """Per-position weight times 1/normaliser [b, l] (zero where not masked)."""
        weights = loss_weights(self.weight_kind, t, masked, self.schedule, self.geo_p)
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

    def metrics_from(self, totals: dict[str, float]) -> dict[str, float]:
        """NLL (unweighted CE per masked token), perplexity and mask ratio."""
        nll = totals["ce_sum"] / max(totals["masked_tokens"], 1)
        return {
            "nll": round(nll, 4),
            "ppl": round(math.exp(min(nll, 50.0)), 4),
            "mask_ratio": round(totals["masked_tokens"] / max(totals["maskable_tokens"], 1), 4),
        }


class DreamTrainer(MDLMTrainer):
    """Dream SFT: right-shifted logits (position i scored by the output at i-1), BOS
    prepended when needed, CART weights by default."""

    arguments_class = DreamTrainingArguments
    shift_logits = True

    @classmethod
    def collator(cls, ids: TokenIds, cfg: Any, model_config: dict[str, Any]) -> DreamCollator:
        return DreamCollator(
            pad_token_id=ids.pad_id,
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
