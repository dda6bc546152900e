"""MDLMTrainer and DreamTrainer: transformers.Trainer subclasses with the diffusion losses.

Only `compute_loss` (and the evaluation step) are ours, so checkpoints, resume,
DDP/FSDP/DeepSpeed and trackers come from the Trainer unchanged.

Noise (timesteps and masks) is drawn per row from a generator seeded by (seed, optimizer
step, row index in the global batch) rather than from the process RNG: the same global
batch gets the same noise whatever the process count and gradient accumulation, and a
resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .diffusion import (
    cart_weights,
    chunked_linear_cross_entropy,
    get_schedule,
    parse_loss_weight_type,
    sample_masks,
    sample_timesteps,
)

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class MDLMConfig(TrainingArguments):
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
class DreamConfig(MDLMConfig):
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

    The loss (facts/diffusion-sft.md): per sequence t ~ U[eps, 1); mask each maskable
    position with probability 1 - alpha(t); one forward on the noised ids; cross-entropy
    against the clean ids at masked positions, weighted (1/t for linear) and normalised.
    """

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
        if self.args.loss_norm_type not in ("token", "sequence", "batch"):
            raise ValueError(
                f"loss_norm_type {self.args.loss_norm_type!r}: expected token, sequence or batch"
            )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._micro_step = (-1, 0)  # (global_step, micro-batches seen in it)
        self._eval_batches = 0
        self._head_fallback_logged = False

    # ---- noise -------------------------------------------------------------------
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
            return 0, self.state.global_step, slot * self.args.per_device_train_batch_size
        slot = self._eval_batches * self.args.world_size + self.args.process_index
        self._eval_batches += 1
        return 1, 0, slot * self.args.per_device_eval_batch_size

    def _draw_noise(
        self, maskable: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [b], masked [b, l]) from one generator per row, keyed by (seed, step, global row).

        Keying by row makes the noise independent of process count, gradient accumulation
        and padding width, and a resumed run redraws exactly what the uninterrupted one drew.
        """
        phase, step, first_row = self._first_row_key(training)
        cpu_maskable = maskable.cpu()
        times, masks = [], []
        for row in range(maskable.shape[0]):
            gen = keyed_generator(self.args.seed, phase, step, first_row + row)
            t = sample_timesteps(1, self.args.time_epsilon, torch.device("cpu"), gen)
            masks.append(sample_masks(cpu_maskable[row : row + 1], self.schedule.mask_prob(t), gen))
            times.append(t)
        return torch.cat(times).to(maskable.device), torch.cat(masks).to(maskable.device)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._eval_batches = 0  # every evaluation sees the same noise: comparable eval losses
        return super().evaluate(*args, **kwargs)

    # ---- loss --------------------------------------------------------------------
    def prepare_inputs(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for Dream's BOS; MDLM uses the batch as it is."""
        return input_ids, labels

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        training = model.training
        input_ids, labels = self.prepare_inputs(inputs["input_ids"], inputs["labels"])
        maskable = labels != IGNORE_INDEX
        # 1-3. timesteps, masks, noised ids
        t, masked = self._draw_noise(maskable, training)
        noised = torch.where(masked, torch.full_like(input_ids, self.mask_token_id), input_ids)
        # 5-6. per-position weight times the normalisation scale
        scale = self._token_scale(t, masked, maskable, num_items_in_batch, training)
        # 4. forward and cross-entropy at masked positions only
        weighted_sum, ce = self._masked_ce(model, noised, input_ids, masked, scale)
        self._record(training, ce, masked, maskable)
        return (weighted_sum, None) if return_outputs else weighted_sum

    def _token_scale(
        self,
        t: torch.Tensor,
        masked: torch.Tensor,
        maskable: torch.Tensor,
        num_items: torch.Tensor | int | None,
        training: bool,
    ) -> torch.Tensor:
        """w(t) (or CART) divided by the normaliser: the loss is sum(scale * CE) over masked tokens.

        `token` uses the step's global maskable count when the Trainer gives it (times the
        process count, which DDP's gradient averaging divides out again); `sequence` and
        `batch` are local means divided by the accumulation steps.
        """
        if self.weight_kind == "cart":
            weights = cart_weights(masked, self.geo_p).to(t.dtype)
        elif self.weight_kind == "uniform":
            weights = torch.ones_like(masked, dtype=t.dtype)
        else:
            weights = self.schedule.weight(t)[:, None].expand_as(masked)
        weights = weights * masked
        norm = self.args.loss_norm_type
        ga = (
            getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            if training
            else 1
        )
        if norm == "token":
            if training and num_items is not None:
                denom = torch.as_tensor(num_items, dtype=t.dtype, device=t.device).clamp(min=1)
                return weights * (self.accelerator.num_processes / denom)
            return weights / (maskable.sum().clamp(min=1) * ga)
        if norm == "sequence":
            per_row = maskable.sum(dim=1, keepdim=True).clamp(min=1)
            return weights / (per_row * masked.shape[0] * ga)
        return weights / (masked.shape[0] * ga)

    def _masked_ce(
        self,
        model: nn.Module,
        noised: torch.Tensor,
        clean: torch.Tensor,
        masked: torch.Tensor,
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of scale * CE over masked positions, per-masked-token CE for metrics).

        Masked-only path (default): the model runs with its vocabulary head swapped for a
        pass-through, so `.logits` are the head's input [b, l, d]; only the masked rows
        (Dream: the rows one to the left) go through the head and the CE in row chunks, so
        neither [b*l, V] nor [n, V] logits ever exist. The full path (`score_masked_only`
        off, or a head that cannot be separated) is model(...).logits and the CE at the
        same rows.
        """
        # A position scored by the output at i-1 (Dream) is still indexed by i here.
        rows, cols = masked.nonzero(as_tuple=True)
        src_cols = cols - 1 if self.shift_logits else cols
        targets = clean[rows, cols]
        token_scale = scale[rows, cols]
        head = self._separable_head(model, noised) if self.args.score_masked_only else None
        if head is None:
            logits = model(input_ids=noised).logits
            picked = logits[rows, src_cols].float()
            del logits  # backward needs only the picked rows: free [b, l, V] now
            ce = nn.functional.cross_entropy(picked, targets, reduction="none")
            return (ce * token_scale).sum(), ce.detach()
        with swapped_head(model, head) as head_inputs:
            hidden = model(input_ids=noised).logits
        # DDP with find_unused_parameters returns a clone of the output: equal, not `is`.
        if len(head_inputs) != 1 or not (
            head_inputs[0] is hidden or torch.equal(head_inputs[0], hidden)
        ):
            raise RuntimeError(
                "score_masked_only: the model's output is not its head's input although the "
                "first check passed; set score_masked_only to false"
            )
        # The fp32 [V, rows] block stays within max(32 MiB, an eighth of the head's fp32
        # gradient, which exists anyway): flat memory, yet enough rows for fast matmuls.
        budget_rows = max(2**23 // head.out_features, head.in_features // 8)
        chunk_rows = max(1, min(self.args.head_chunk_size, budget_rows))
        return chunked_linear_cross_entropy(
            hidden[rows, src_cols],
            head.weight,
            head.bias,
            targets,
            token_scale.to(torch.float32),
            chunk_rows,
        )

    def _separable_head(self, model: nn.Module, input_ids: torch.Tensor) -> nn.Linear | None:
        """The vocabulary head if running it ourselves on picked rows is exact, else None.

        Structure: get_output_embeddings() must be a plain nn.Linear submodule whose weight
        is held whole here (FSDP and ZeRO-3 keep empty local shards; a 4-bit or LoRA head is
        another type), and DDP must not look for unused parameters. Behaviour, checked once
        per (model, head) on a tiny forward: the model's logits must equal head(head input),
        i.e. the head is the model's last operation and runs once (no logit scaling or
        soft-capping, no sparse prediction). Otherwise the full-logits path is used, with
        one log line.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        getter = getattr(unwrapped, "get_output_embeddings", None)
        head = getter() if callable(getter) else None

        def probe() -> str | None:
            """Eval mode (no dropout, no checkpointing), no_grad; train flags restored."""
            ids = input_ids[:1, : min(int(input_ids.shape[1]), 8)]
            modes = [(m, m.training) for m in unwrapped.modules()]
            try:
                unwrapped.eval()
                with torch.no_grad():
                    full = unwrapped(input_ids=ids).logits
                    with swapped_head(unwrapped, head) as seen:
                        hidden = unwrapped(input_ids=ids).logits
                    if len(seen) != 1 or seen[0] is not hidden:
                        return "the model does not return its head's output unchanged"
                    separate = head(hidden)
            except Exception as e:  # e.g. the forward reads the head's weight directly
                return f"the check forward failed: {type(e).__name__}: {e}"
            finally:
                for module, mode in modes:
                    module.training = mode
            if separate.shape != full.shape or not torch.allclose(
                separate.float(), full.float(), rtol=1e-4, atol=1e-5
            ):
                return "head(head input) differs from the model's logits"
            return None

        def why_not() -> str | None:
            if type(head) is not nn.Linear:
                return f"it is a {type(head).__name__}, not a plain nn.Linear"
            if self.is_fsdp_enabled or head.weight.numel() == 0:
                return "its weight is sharded (FSDP / ZeRO-3)"
            if getattr(model, "find_unused_parameters", False) and not getattr(
                model, "static_graph", False
            ):  # DDP would mark the head unused at forward, then see its gradient twice
                return "DDP find_unused_parameters=True"
            if _parent_of(unwrapped, head) is None:
                return "it is not a submodule of the model"
            return probe()

        verdict = getattr(self, "_head_verdict", None)  # (head, model, reason or None)
        if verdict is None or verdict[0] is not head or verdict[1] is not model:
            verdict = (head, model, why_not())
            self._head_verdict = verdict
        if verdict[2] is None:
            return head
        if not self._head_fallback_logged:
            logger.warning(
                "score_masked_only: the output head cannot be run separately (%s); "
                "scoring with full logits",
                verdict[2],
            )
            self._head_fallback_logged = True
        return None

    # ---- metrics -----------------------------------------------------------------
    def _record(
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

    shift_logits = True

    def prepare_inputs(
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


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (stable across runs and platforms)."""
    digest = hashlib.sha256(repr(tuple(key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, attribute name) that holds `child` inside `root`, or None."""
    for module in root.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    return None


@contextlib.contextmanager
def swapped_head(model: nn.Module, head: nn.Module):
    """Run the model with its vocabulary head replaced by a pass-through.

    `.logits` are then the head's input. Yields the list of tensors the stand-in returned,
    so callers can check that the head ran exactly once and that its output came back
    untouched. The forward still goes through `model` (DDP/peft wrappers included), so
    gradient synchronisation hooks see it; the head is applied afterwards to masked rows.
    """
    found = _parent_of(model, head)
    if found is None:
        raise RuntimeError("the output head is not a submodule of the model")
    parent, name = found
    seen: list[torch.Tensor] = []
    stand_in = nn.Identity()
    stand_in.register_forward_hook(lambda _module, _args, out: seen.append(out))
    setattr(parent, name, stand_in)
    try:
        yield seen
    finally:
        setattr(parent, name, head)
