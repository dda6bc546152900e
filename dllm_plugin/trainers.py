"""MDLMTrainer, DreamTrainer and their block-diffusion (BD3LM) forms: transformers.Trainer
subclasses with the diffusion losses.

Only `compute_loss` (and the evaluation step and metrics) are ours, so checkpoints,
resume, DDP/FSDP/DeepSpeed and trackers come from the Trainer unchanged. The loss math
lives in diffusion/ (noise.py, loss.py, masked_head.py); `compute_loss` reads as the
recipe of docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .data.collators import DreamCollator, MDLMCollator, PackedCollator
from .diffusion.blocks import (
    attention_mask_for,
    bd3lm_keep_mask,
    draw_block_noise,
    fill_to_blocks,
    layout_inputs,
    source_columns,
)
from .diffusion.layout import ExampleView, count_examples
from .diffusion.loss import (
    IGNORE_INDEX,
    NORM_TYPES,
    loss_weights,
    normaliser,
    parse_loss_weight_type,
)
from .diffusion.masked_head import HeadVerdict, score_masked
from .diffusion.noise import (
    EVAL,
    TIMESTEP_SAMPLING,
    TRAIN,
    ExampleSlot,
    NoiseDraw,
    NoiseKeys,
    NoiseOptions,
    draw_noise,
)
from .diffusion.schedules import get_schedule
from .models.families import TokenIds
from .models.packing import packed_inputs_for
from .rng import seeded_rng

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
    timestep_sampling: str = field(
        default="uniform",
        metadata={"help": "uniform, or stratified across the global batch (lower variance)."},
    )
    complementary_masking: bool = field(
        default=False,
        metadata={"help": "Noise each example twice, with complementary masks (t and 1-t)."},
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


def mask_by_count(
    masked: torch.Tensor,
    weight: torch.Tensor,
    row: int,
    positions: torch.Tensor,
    level: float,
    generator: torch.Generator,
) -> None:
    """One count-form ELBO draw over `positions` of row `row`, written into masked/weight:
    of their n, 1 + floor(level * n) are masked, chosen uniformly by the generator, each
    weighted n / count (LLaDA's Eq. 12)."""
    n = int(positions.numel())
    if n == 0:
        return
    count = min(n, 1 + int(level * n))
    picked = positions[torch.randperm(n, generator=generator)[:count].to(positions.device)]
    masked[row, picked] = True
    weight[row, picked] = n / count


class DiffusionTrainer(Trainer):
    """What every diffusion method's Trainer shares: noise keyed by global row, the same
    noise at every evaluation, loss-only prediction steps, and per-token metrics summed
    over processes when they are logged (`metrics_from` names them)."""

    # compute_loss scales for gradient accumulation and world size itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, held_out: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # evaluation/held_out.py: the held-out score (and accuracy) added to every evaluation
        self.held_out = held_out
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

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loop (eval_loss: one training-loss draw per row), plus the held-out
        ELBO and, when asked, answer accuracy, in the same log entry."""
        output = super().evaluation_loop(*args, **kwargs)
        if self.held_out is not None:
            prefix = kwargs.get("metric_key_prefix", "eval")
            extra = self.held_out.measure(self)
            output.metrics.update({f"{prefix}_{k}": v for k, v in extra.items()})
        return output

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


@dataclass(frozen=True)
class StepCounts:
    """Global counts of an optimizer step, over its micro-batches and all processes:
    maskable tokens and examples (the normalisers of `token`, `sequence`, `batch`).
    None: unknown (evaluation, or a caller that passes only a token count)."""

    tokens: torch.Tensor | int | None
    examples: torch.Tensor | int | None = None


@dataclass(frozen=True)
class ModelBatch:
    """The batch as the model sees it, and where its examples are (segment_ids and a
    packed view for packed rows; one example per row otherwise)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None
    view: ExampleView

    def repeated(self, copies: int) -> ModelBatch:
        """The batch stacked `copies` times (complementary masking noises each twice)."""
        if copies == 1:
            return self
        seg = None if self.segment_ids is None else self.segment_ids.repeat(copies, 1)
        return ModelBatch(
            self.input_ids.repeat(copies, 1),
            self.labels.repeat(copies, 1),
            seg,
            self.view.repeated(copies),
        )


class MDLMTrainer(DiffusionTrainer):
    """Masked-diffusion SFT (MDLM/LLaDA recipe) as a Trainer.

    The loss: per example t ~ U[eps, 1); mask each maskable position with probability
    1 - alpha(t); one forward on the noised ids; cross-entropy against the clean ids at
    masked positions, weighted (1/t for linear) and normalised. Batches are padded rows
    or packed rows (several examples per row, each attending only to itself).
    """

    arguments_class = MDLMTrainingArguments
    shift_logits = False

    def __init__(
        self,
        *args: Any,
        mask_token_id: int,
        bos_token_id: int | None = None,
        **kwargs: Any,
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
        if self.args.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling {self.args.timestep_sampling!r}: "
                f"expected one of {TIMESTEP_SAMPLING}"
            )
        self.head_verdict = HeadVerdict(
            self.accelerator.unwrap_model, lambda: bool(self.is_fsdp_enabled)
        )

    @classmethod
    def collator(
        cls, ids: TokenIds, cfg: Any, model_config: dict[str, Any]
    ) -> MDLMCollator | PackedCollator:
        """The batch collator: packed rows when the job packs, else the method's padding."""
        if getattr(cfg, "packing", False):
            return PackedCollator(pad_token_id=ids.pad_id)
        return cls.padded_collator(ids.pad_id, cfg)

    @classmethod
    def padded_collator(cls, pad_token_id: int, cfg: Any) -> MDLMCollator:
        return MDLMCollator(pad_token_id=pad_token_id)

    def autocast_smart_context_manager(
        self, cache_enabled: bool | None = True
    ) -> contextlib.AbstractContextManager:
        """The whole loss under the mixed-precision autocast, not only the model's forward.

        transformers 5 leaves autocast to accelerate, which wraps only `model.forward`.
        The loss runs the vocabulary head itself (masked rows, chunked CE) and the head
        probe compares that against the forward's logits: both must see the dtype the
        forward's head saw, or bf16/fp16 runs would fail the probe and fall back to full
        logits, and the chunked head would multiply in fp32.
        """
        return self.accelerator.autocast()

    # ---- the loss ----------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: StepCounts | torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        training = model.training
        batch = self.model_batch(inputs)
        phase, step, first_row = self._first_row_key(training)
        keys = NoiseKeys(self.args.seed, phase, step)
        # 1-2. per example a timestep (per block for block diffusion) and its mask
        # (twice with complementary masking)
        maskable = batch.view.to_examples(batch.labels != IGNORE_INDEX, False)
        draw = self.draw_noise(maskable, batch.view, keys, first_row, training)
        batch = batch.repeated(draw.copies)
        masked = batch.view.to_batch(draw.masked, False)
        # 5-6. per-position weight over the normaliser: loss = sum(scale * CE)
        example_scale = self.loss_scale(draw, maskable, batch.view, num_items_in_batch, training)
        scale = batch.view.to_batch(example_scale, 0.0)
        self._check_shift(masked, batch.view)
        # 3-4. the noised ids, one forward (dropout keyed like the noise), cross-entropy
        # at masked positions only
        dropout_seed = keys.dropout_seed(first_row) if training else None
        with seeded_rng(dropout_seed, batch.input_ids.device):
            loss, ce = self.score(model, batch, masked, scale)
        maskable_tokens = batch.labels != IGNORE_INDEX
        self._record(training, ce_sum=ce, masked_tokens=masked, maskable_tokens=maskable_tokens)
        return (loss, None) if return_outputs else loss

    def model_batch(self, inputs: dict[str, torch.Tensor]) -> ModelBatch:
        """Packed rows as they come; padded rows through `model_inputs` (Dream's BOS)."""
        if "segment_ids" in inputs:
            segment_ids = inputs["segment_ids"]
            view = ExampleView.from_segments(segment_ids)
            return ModelBatch(inputs["input_ids"], inputs["labels"], segment_ids, view)
        input_ids, labels = self.model_inputs(inputs["input_ids"], inputs["labels"])
        view = ExampleView.padded(input_ids.shape[0], input_ids.shape[1], input_ids.device)
        return ModelBatch(input_ids, labels, None, view)

    def score(
        self, model: nn.Module, batch: ModelBatch, masked: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, one forward, and (sum of scale * CE, the CE of each masked position in the
        order of masked.nonzero())."""
        clean = batch.input_ids
        noised = self.corrupt(clean, masked, self.mask_token_id)
        head = self.head_verdict.head(model, noised) if self.args.score_masked_only else None
        inputs, forward = self.forward_inputs(model, noised, batch)
        return score_masked(
            model, head, inputs, clean, masked, scale,
            lambda cols: self.source_columns(cols, clean.shape[1]),
            self.args.head_chunk_size, **forward,
        )  # fmt: skip

    def forward_inputs(
        self, model: nn.Module, noised: torch.Tensor, batch: ModelBatch
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """What the model reads, and its other forward kwargs: MDLM reads the noised ids
        alone (no attention mask: the padding EOS it is trained on must be visible);
        packed rows add per-example positions and attention (models/packing.py)."""
        if batch.segment_ids is None:
            return noised, {}
        config = self.accelerator.unwrap_model(model).config
        return noised, packed_inputs_for(config)(config, batch.segment_ids)

    def source_columns(self, cols: torch.Tensor, length: int) -> torch.Tensor:
        """Output columns that score columns `cols` (one to the left when shifted)."""
        return cols - 1 if self.shift_logits else cols

    def position_weights(
        self, t: torch.Tensor, masked: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss weight of every position [b, l] (0 where not masked); `present`: the
        positions of a packed example's view row that belong to it."""
        return loss_weights(self.weight_kind, t, masked, self.schedule, self.geo_p, present)

    def model_inputs(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as the model sees it (Dream prepends BOS); MDLM uses it as it is."""
        return self.model_view(input_ids, labels, self.bos_token_id)

    def draw_noise(
        self,
        maskable: torch.Tensor,
        view: ExampleView,
        keys: NoiseKeys,
        first_row: int,
        training: bool,
    ) -> NoiseDraw:
        """Timesteps and masks of the examples [E, Le], keyed by where each one sits.

        Evaluation always uses the plain estimator (uniform t, one mask), so held-out
        losses compare across timestep_sampling and complementary_masking settings.
        """
        args = self.args
        opts = NoiseOptions(
            self.schedule,
            args.time_epsilon,
            sampling=args.timestep_sampling if training else "uniform",
            complementary=bool(args.complementary_masking) and training,
            strata=args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * args.world_size,
        )
        slots = [ExampleSlot(first_row + row, seg, n) for row, seg, n in view.slots]
        return draw_noise(maskable, slots, keys, opts)

    def loss_scale(
        self,
        draw: NoiseDraw,
        maskable: torch.Tensor,
        view: ExampleView,
        counts: StepCounts | torch.Tensor | int | None,
        training: bool,
    ) -> torch.Tensor:
        """Per-position weight times 1/normaliser for the noised examples [copies*E, Le]
        (zero where not masked); the copies of complementary masking share the loss."""
        present = view.valid if view.packed else None
        weights = self.position_weights(draw.t, draw.masked, present)
        weights = weights * draw.ratio[:, None]
        if not isinstance(counts, StepCounts) or not training:
            counts = StepCounts(counts if training else None)
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
            global_items=counts.tokens,
            global_rows=counts.examples,
            processes=self.accelerator.num_processes,
            accumulation=accumulation,
        )
        return weights * norm.repeat(draw.copies, 1) / draw.copies

    def _check_shift(self, masked: torch.Tensor, view: ExampleView) -> None:
        """A right-shifted model must never score an example's first token (packed rows
        would score it from the previous example): packing puts BOS before such starts."""
        if self.shift_logits and view.packed and bool((masked & view.first_positions()).any()):
            raise ValueError(
                "a packed example's first token is scored by a right-shifted model; "
                "pack with the BOS id so that every scored start gets a BOS"
            )

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> StepCounts:
        """Maskable tokens and examples of the optimizer step, summed over processes.

        The Trainer passes this to compute_loss as `num_items_in_batch`; the examples
        count is what `sequence`/`batch` normalisation divides by (a packed micro-batch
        holds a varying number of examples).
        """
        local = torch.tensor(
            [
                sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batch_samples),
                sum(count_examples(b) for b in batch_samples),
            ],
            device=device,
        )
        if self.args.world_size > 1:
            local = self.accelerator.gather(local[None]).sum(dim=0)
        return StepCounts(tokens=local[0], examples=local[1])

    def metrics_from(self, totals: dict[str, float]) -> dict[str, float]:
        """NLL (unweighted CE per masked token), perplexity and mask ratio."""
        nll = totals["ce_sum"] / max(totals["masked_tokens"], 1)
        return {
            "nll": round(nll, 4),
            "ppl": round(math.exp(min(nll, 50.0)), 4),
            "mask_ratio": round(totals["masked_tokens"] / max(totals["maskable_tokens"], 1), 4),
        }

    # ---- evaluation hooks ----------------------------------------------------------
    # The held-out ELBO (evaluation/elbo.py) and the lm-eval model score a method through
    # these class methods, without a Trainer instance. A method with other noise (uniform
    # corruption, blocks) overrides `elbo_noise`/`corrupt`, or `nll_bound` as a whole
    # (docs/architecture.md, "Evaluation").

    @classmethod
    def model_view(
        cls, input_ids: torch.Tensor, labels: torch.Tensor, bos_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as the model sees it; MDLM uses it as it is."""
        return input_ids, labels

    @classmethod
    def corrupt(cls, input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
        """The noised ids: every masked position holds the mask token."""
        return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)

    @classmethod
    def elbo_noise(
        cls, scored: torch.Tensor, u: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked, weight) [b, l] for one ELBO draw per row at noise level u in [0, 1).

        The count form of the masked-diffusion ELBO (LLaDA's Eq. 12): of a row's L scored
        positions, l = 1 + floor(u * L) are masked, chosen uniformly by the row's generator,
        each weighted L / l. A uniform u gives a uniform l, and then the expectation equals
        the time form the loss trains with (t ~ U(0, 1), weight 1/t, for every schedule),
        without its 1/t spikes.
        """
        masked = torch.zeros_like(scored, dtype=torch.bool)
        weight = torch.zeros(scored.shape, dtype=torch.float32, device=scored.device)
        for row, generator in enumerate(generators):
            positions = scored[row].nonzero().squeeze(1)
            mask_by_count(masked, weight, row, positions, float(u[row]), generator)
        return masked, weight

    @classmethod
    def nll_bound(
        cls,
        model: nn.Module,
        head: nn.Linear | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        u: torch.Tensor,
        generators: Sequence[torch.Generator],
        ids: TokenIds,
        chunk_rows: int = 2048,
    ) -> torch.Tensor:
        """Per row [b]: one unbiased draw of the negative ELBO of its scored tokens (nats).

        The rows are already in the model's view (`model_view`); `labels` marks the scored
        positions. The same corruption and the same scoring (score_masked) as the loss.
        """
        masked, weight = cls.elbo_noise(labels != IGNORE_INDEX, u, generators)
        noised = cls.corrupt(input_ids, masked, ids.mask_id)
        shift = cls.shift_logits
        _, ce = score_masked(
            model, head, noised, input_ids, masked, weight,
            lambda cols: cols - 1 if shift else cols, chunk_rows,
        )  # fmt: skip
        return row_sums(masked, weight, ce)


class DreamTrainer(MDLMTrainer):
    """Dream SFT: right-shifted logits (position i scored by the output at i-1), BOS
    prepended when needed, CART weights by default."""

    arguments_class = DreamTrainingArguments
    shift_logits = True

    @classmethod
    def padded_collator(cls, pad_token_id: int, cfg: Any) -> DreamCollator:
        return DreamCollator(
            pad_token_id=pad_token_id,
            perbatch_cutoff=cfg.perbatch_cutoff,
            resp_cutoff_ratio=cfg.resp_cutoff_ratio,
            seed=cfg.seed,
        )

    @classmethod
    def model_view(
        cls, input_ids: torch.Tensor, labels: torch.Tensor, bos_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend BOS unless every row's first label is already ignored.

        With the shift, position 0 has no predecessor: it must never be scored. (Packed
        rows get a BOS per example when they are packed: data/packing.py.)
        """
        if bool((labels[:, 0] == IGNORE_INDEX).all()):
            return input_ids, labels
        if bos_id is None:
            raise ValueError(
                "Dream training needs a BOS token id to prepend (the tokenizer has none)"
            )
        bos = torch.full_like(input_ids[:, :1], bos_id)
        ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
        return torch.cat([bos, input_ids], dim=1), torch.cat([ignore, labels], dim=1)


def row_sums(masked: torch.Tensor, weight: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """Per row [b]: the sum of weight * CE over its masked positions (`ce` in the order of
    masked.nonzero())."""
    rows = masked.nonzero(as_tuple=True)[0]
    bound = torch.zeros(masked.shape[0], dtype=torch.float32, device=ce.device)
    return bound.index_add_(0, rows.to(ce.device), weight[masked].to(ce.device) * ce)


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
    def padded_collator(cls, pad_token_id: int, cfg: Any) -> MDLMCollator:
        """The base method's collator, filling each row to whole blocks; shifted models
        never score column 0 (nothing precedes it; no BOS is prepended, so the block grid
        starts at the prompt's first token as in the sampler)."""
        base = super().padded_collator(pad_token_id, cfg)
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
        self,
        maskable: torch.Tensor,
        view: ExampleView,
        keys: NoiseKeys,
        first_row: int,
        training: bool,
    ) -> NoiseDraw:
        """One t per block, returned per position [b, l] (padded rows only: no packing)."""
        t, masked = draw_block_noise(
            maskable, self.args.block_size, self.schedule, self.args.time_epsilon,
            keys.seed, keys.phase, keys.step, first_row,
        )  # fmt: skip
        return NoiseDraw(t, masked, torch.ones(t.shape[0], device=t.device), 1)

    def forward_inputs(
        self, model: nn.Module, noised: torch.Tensor, batch: ModelBatch
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """[noised ; clean] with the block mask and both copies at positions 0..L-1.

        The mask depends only on the width: it is built once per width and device (a
        [2L, 2L] mask is 67 MB at L = 4096, four times that as an additive float mask).
        """
        clean = batch.input_ids
        key = (clean.shape[1], clean.device)
        cached = getattr(self, "_block_mask", None)
        if cached is None or cached[0] != key:
            unwrapped = self.accelerator.unwrap_model(model)
            mask = block_attention(unwrapped, key[0], self.args.block_size, clean.device)
            self._block_mask = (key, mask)
        return layout_inputs(noised, clean, self._block_mask[1])

    def source_columns(self, cols: torch.Tensor, length: int) -> torch.Tensor:
        return source_columns(cols, length, self.args.block_size, self.shift_logits)

    def position_weights(
        self, t: torch.Tensor, masked: torch.Tensor, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        return loss_weights(
            self.weight_kind, t, masked, self.schedule, self.geo_p,
            block_size=self.args.block_size,
        )  # fmt: skip

    # ---- evaluation hooks (class methods, as MDLMTrainer's) ----------------------------
    # The bound of block diffusion is a sum over blocks of the MDLM bound of each block
    # given the clean blocks before it; it needs the block size the model was trained
    # with, which a class does not hold: evaluation scores through `with_block_size`.

    @classmethod
    def with_block_size(cls, block_size: int) -> BlockBound:
        """The evaluation hooks with the trained block size (evaluation/elbo.py's scorer)."""
        return BlockBound(cls, block_size)

    @classmethod
    def model_view(
        cls, input_ids: torch.Tensor, labels: torch.Tensor, bos_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As training collates: nothing prepended (the block grid starts at the first
        token); a right-shifted model never scores column 0."""
        if cls.shift_logits and not bool((labels[:, 0] == IGNORE_INDEX).all()):
            labels = labels.clone()
            labels[:, 0] = IGNORE_INDEX
        return input_ids, labels

    @classmethod
    def elbo_noise(
        cls,
        scored: torch.Tensor,
        u: torch.Tensor,
        generators: Sequence[torch.Generator],
        block_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked, weight) [b, l]: MDLM's count form (MDLMTrainer.elbo_noise) in every
        block, each at its own noise level.

        The k-th of a row's K blocks with scored tokens takes the level (u + k / K) mod 1:
        uniform whenever u is, so each block's term stays unbiased, while one draw spreads
        its blocks over the levels and the stratification of u carries over to every block.
        """
        size = _trained_block_size(block_size)
        masked = torch.zeros_like(scored, dtype=torch.bool)
        weight = torch.zeros(scored.shape, dtype=torch.float32, device=scored.device)
        for row, generator in enumerate(generators):
            starts = range(0, scored.shape[1], size)
            blocks = [
                start + scored[row, start : start + size].nonzero().squeeze(1) for start in starts
            ]
            blocks = [positions for positions in blocks if positions.numel()]
            for k, positions in enumerate(blocks):
                level = (float(u[row]) + k / len(blocks)) % 1.0
                mask_by_count(masked, weight, row, positions, level, generator)
        return masked, weight

    @classmethod
    def nll_bound(
        cls,
        model: nn.Module,
        head: nn.Linear | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        u: torch.Tensor,
        generators: Sequence[torch.Generator],
        ids: TokenIds,
        chunk_rows: int = 2048,
        block_size: int | None = None,
    ) -> torch.Tensor:
        """Per row [b]: one unbiased draw of the block-diffusion negative ELBO of its scored
        tokens (nats), scored in the training layout ([noised ; clean], block mask).

        Rows are filled to whole blocks with the mask id, unscored (blocks.fill_to_blocks).
        """
        size = _trained_block_size(block_size)
        input_ids, labels = fill_to_blocks(input_ids, labels, size, ids.mask_id)
        masked, weight = cls.elbo_noise(labels != IGNORE_INDEX, u, generators, size)
        noised = cls.corrupt(input_ids, masked, ids.mask_id)
        length = input_ids.shape[1]
        mask = block_attention(getattr(model, "module", model), length, size, input_ids.device)
        inputs, forward = layout_inputs(noised, input_ids, mask)
        shift = cls.shift_logits
        _, ce = score_masked(
            model, head, inputs, input_ids, masked, weight,
            lambda cols: source_columns(cols, length, size, shift), chunk_rows, **forward,
        )  # fmt: skip
        return row_sums(masked, weight, ce)


@dataclass(frozen=True)
class BlockBound:
    """A block-diffusion Trainer class's evaluation hooks with the block size the model
    was trained with: what evaluation/elbo.py scores with (its BoundScorer)."""

    trainer: type[BlockDiffusion]
    block_size: int

    def model_view(
        self, input_ids: torch.Tensor, labels: torch.Tensor, bos_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainer.model_view(input_ids, labels, bos_id)

    def nll_bound(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.trainer.nll_bound(*args, **kwargs, block_size=self.block_size)


def block_attention(
    model: nn.Module, length: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """The 2L layout's block mask for rows of `length`, as `model` takes a 4-D mask."""
    return attention_mask_for(model, bd3lm_keep_mask(length, block_size, device))


def _trained_block_size(block_size: int | None) -> int:
    if not block_size or block_size < 1:
        raise ValueError(
            "block diffusion is scored with the block size it was trained with: pass "
            "block_size (Method.bound_scorer)"
        )
    return block_size


class BD3LMTrainer(BlockDiffusion, MDLMTrainer):
    """Block-diffusion SFT of unshifted models (BERT family, LLaDA, a2d)."""

    arguments_class = BD3LMTrainingArguments


class DreamBD3LMTrainer(BlockDiffusion, DreamTrainer):
    """Block-diffusion SFT of Dream: right-shifted logits, block-wise CART weights."""

    arguments_class = DreamBD3LMTrainingArguments
