"""Preview answers: what the model says to a few held-out prompts.

Users of the original plugin could not see what their diffusion model had learned
without a second plugin; here the same prompts are answered before and after training
(and at each evaluation when asked), shown in the log, TensorBoard, run_summary.json
and the host's job data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from .methods import Method
from .models.families import TokenIds
from .sampling import SamplingConfig

logger = logging.getLogger(__name__)


@dataclass
class PreviewPrompt:
    """A conversation up to (not including) the answer, and the dataset's answer."""

    messages: list[dict[str, str]]
    reference: str


def pick_prompts(conversations: Sequence[list[dict[str, str]]], n: int) -> list[PreviewPrompt]:
    """The first n conversations, split into prompt and reference answer."""
    return [PreviewPrompt(list(c[:-1]), c[-1]["content"]) for c in list(conversations)[:n]]


def sampling_config(
    max_new_tokens: int, seed: int = 0, block_size: int | None = None
) -> SamplingConfig:
    """One token per step, blocks of 32: the official samplers' quality setting.

    `block_size` is the trained block size of block-diffusion methods (their sampler must
    use it); None lets MDLM sample in blocks of 32.
    """
    return SamplingConfig(
        max_new_tokens=max_new_tokens,
        steps=max_new_tokens,
        block_size=block_size or min(32, max_new_tokens),
        seed=seed,
    )


def prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat-formatted prompt, up to and including the assistant's generation prompt."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(
        prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    )


def answer(
    model: Any,
    tokenizer: Any,
    ids: TokenIds,
    method: Method,
    messages: list[dict[str, str]],
    config: SamplingConfig,
) -> str:
    """Generate the assistant's answer to `messages` with the family's sampler."""
    return answer_ids(model, tokenizer, ids, method, prompt_token_ids(tokenizer, messages), config)


def answer_ids(
    model: Any,
    tokenizer: Any,
    ids: TokenIds,
    method: Method,
    prompt_ids: list[int],
    config: SamplingConfig,
) -> str:
    """The decoded answer to an already tokenised prompt."""
    tokens = method.sampler_function()(
        model,
        [prompt_ids],
        mask_id=ids.mask_id,
        stop_ids=ids.stop_ids,
        pad_id=ids.pad_id,
        config=config,
    )[0]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def generate_previews(
    model: Any,
    tokenizer: Any,
    ids: TokenIds,
    method: Method,
    prompts: Sequence[PreviewPrompt],
    max_new_tokens: int,
    block_size: int | None = None,
) -> list[str]:
    config = sampling_config(max_new_tokens, block_size=block_size)
    return [answer(model, tokenizer, ids, method, p.messages, config) for p in prompts]


def log_previews(title: str, prompts: Sequence[PreviewPrompt], answers: Sequence[str]) -> None:
    logger.info("%s", title)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        logger.info("  [%d] prompt:    %s", i, p.messages[-1]["content"].replace("\n", " ")[:200])
        logger.info("      reference: %s", p.reference.replace("\n", " ")[:200])
        logger.info("      model:     %s", a.replace("\n", " ")[:200] or "(empty)")


def as_records(
    prompts: Sequence[PreviewPrompt], answers: Sequence[str], before: Sequence[str] | None = None
) -> list[dict]:
    records = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        record = {"prompt": p.messages[-1]["content"], "reference": p.reference, "generated": a}
        if before is not None:
            record["before_training"] = before[i]
        records.append(record)
    return records


def write_tensorboard_text(trainer: Any, records: list[dict], step: int) -> None:
    """Add the samples as a markdown table to the run's TensorBoard (when it is on)."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        writer = getattr(cb, "tb_writer", None) if isinstance(cb, TensorBoardCallback) else None
        if writer is not None:
            rows = "\n".join(
                f"| {r['prompt']} | {r['reference']} | {r['generated']} |".replace("\n", " ")
                for r in records
            )
            writer.add_text(
                "preview_samples",
                f"| prompt | reference | generated |\n|---|---|---|\n{rows}",
                step,
            )
            writer.flush()


class PreviewCallback(TrainerCallback):
    """Generates the preview answers at each evaluation (main process only)."""

    def __init__(
        self,
        tokenizer: Any,
        ids: TokenIds,
        method: Method,
        prompts: list[PreviewPrompt],
        max_new_tokens: int,
        host: Any,
        block_size: int | None = None,
    ):
        self.trainer: Any = None  # set once the Trainer exists (for its TensorBoard writer)
        self.tokenizer, self.ids, self.method = tokenizer, ids, method
        self.prompts, self.max_new_tokens, self.host = prompts, max_new_tokens, host
        self.block_size = block_size

    def on_evaluate(self, args, state, control, model=None, **kwargs) -> None:
        if not state.is_world_process_zero or model is None or not self.prompts:
            return
        with torch.no_grad():
            answers = generate_previews(
                model, self.tokenizer, self.ids, self.method, self.prompts,
                self.max_new_tokens, self.block_size,
            )  # fmt: skip
        log_previews(f"preview at step {state.global_step}", self.prompts, answers)
        records = as_records(self.prompts, answers)
        if self.trainer is not None:
            write_tensorboard_text(self.trainer, records, state.global_step)
        self.host.add_data("preview_samples", records)
