"""Rows -> tokenised SFT features (input_ids, labels, prompt_len).

The train/eval split, chat-template tokenisation with prompt masking, and truncation
(loading the rows is sources.py).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets

from ..diffusion.loss import IGNORE_INDEX
from ..errors import DataError
from .sources import EVAL_SPLIT_NAMES
from .templates import RowTemplates, row_to_messages

logger = logging.getLogger(__name__)


def split_train_eval(
    dsd: datasets.DatasetDict, eval_split_ratio: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train and eval sets: named splits when present, else a held-out fraction of train."""
    train_name = "train" if "train" in dsd else (next(iter(dsd)) if len(dsd) == 1 else None)
    if train_name is None:
        raise DataError(f"the dataset has no 'train' split; its splits are {', '.join(dsd)}")
    train = dsd[train_name]
    eval_name = next((s for s in EVAL_SPLIT_NAMES if s in dsd and s != train_name), None)
    if eval_name is not None:
        return train, dsd[eval_name]
    if eval_split_ratio > 0 and len(train) >= 10:
        parts = train.train_test_split(test_size=eval_split_ratio, seed=seed, shuffle=True)
        return parts["train"], parts["test"]
    return train, None


@dataclass
class TokenizeOptions:
    max_length: int
    truncation: str  # "right" or "filter"
    mask_prompt_loss: bool


def tokenize_messages(
    messages: list[dict[str, str]], tokenizer: Any, opts: TokenizeOptions
) -> dict[str, Any]:
    """Features for one conversation, or {"drop": reason} when truncation drops it.

    The prompt is every message before the last (the answer) plus the assistant
    generation prompt; its tokens are a prefix of the full conversation's tokens, which
    is checked because a chat template that breaks it would mislabel the answer.
    """
    if not messages[-1]["content"].strip():
        return _dropped("with an empty answer")
    prompt_ids = _chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            "the chat template does not render the prompt as a prefix of the whole conversation, "
            "so the answer cannot be located; fix the tokenizer's chat template"
        )
    prompt_len = len(prompt_ids)
    if opts.truncation == "filter" and len(full_ids) > opts.max_length:
        return _dropped(f"longer than max_length {opts.max_length} (truncation=filter)")
    if opts.truncation == "right":
        if prompt_len > opts.max_length:
            return _dropped(
                f"prompt alone longer than max_length {opts.max_length} (truncation=right)"
            )
        full_ids = full_ids[: opts.max_length]
    labels = list(full_ids)
    if opts.mask_prompt_loss:
        labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
    return {"input_ids": full_ids, "labels": labels, "prompt_len": prompt_len, "drop": ""}


def _dropped(reason: str) -> dict[str, Any]:
    # Same columns as a kept row: datasets.map needs one schema for every row.
    return {"input_ids": [], "labels": [], "prompt_len": 0, "drop": reason}


def _chat_ids(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return list(ids)


def build_sft_dataset(
    rows: datasets.Dataset,
    tokenizer: Any,
    templates: RowTemplates,
    opts: TokenizeOptions,
    num_proc: int,
    split_name: str = "train",
    keep_messages: bool = False,
) -> datasets.Dataset:
    """Render and tokenise every row; report and remove the rows truncation drops.

    Rows are rendered to messages in this process first so that a bad row fails with its
    index (worker processes would bury the message); tokenisation may use workers.
    """
    if len(rows) == 0:
        raise DataError(f"the {split_name} split is empty")
    messages = [row_to_messages(row, i, templates) for i, row in enumerate(rows)]
    table = datasets.Dataset.from_dict({"messages": messages})
    workers = min(num_proc, os.cpu_count() or 1) if len(table) >= 2000 else None
    features = table.map(
        lambda ex: tokenize_messages(ex["messages"], tokenizer, opts),
        num_proc=workers,
        remove_columns=[] if keep_messages else ["messages"],
        desc=f"tokenising {split_name}",
    )
    reasons = Counter(r for r in features["drop"] if r)
    kept = features.filter(lambda ex: not ex["drop"]).remove_columns("drop")
    if reasons:
        detail = "; ".join(f"{n} {why}" for why, n in reasons.items())
        logger.warning(
            "%s: dropped %d of %d rows: %s",
            split_name,
            sum(reasons.values()),
            len(features),
            detail,
        )
    if len(kept) == 0:
        raise DataError(
            f"no {split_name} rows left after truncation: all {len(features)} were dropped ({detail}); "
            "raise max_length"
            + (" or use truncation 'right'" if opts.truncation == "filter" else "")
        )
    return kept
