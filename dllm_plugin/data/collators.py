"""Batch collators for masked-diffusion SFT (MDLM / LLaDA / BERT and Dream) and block
diffusion (DiffusionGemma).

The SFT recipe pads on the RIGHT with the pad/EOS id and gives the padding real labels,
so the model learns to end its answer with EOS; and it trains without an attention
mask, so the padding collators return none (a mask would hide the padded EOS from the
model). Packed rows (data/packing.py) go through `PackedCollator` instead: the model
gets per-example positions and attention from their segment ids (models/packing.py).
Block diffusion (DiffusionGemma) fills each answer with EOS to whole blocks instead
(trained) and masks the batch padding out (not trained).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..diffusion.loss import IGNORE_INDEX
from ..rng import keyed_generator

__all__ = [
    "FILLER_SEGMENT",
    "CanvasCollator",
    "DreamCollator",
    "MDLMCollator",
    "PackedCollator",
]

FILLER_SEGMENT = -1
"""Segment id of the positions after a packed row's last example (never scored)."""


class _Row(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def _as_int_list(value: Any) -> list[int]:
    return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]


def _to_row(index: int, feature: Any) -> _Row:
    """Check one tokenised example and keep only the keys the collators use."""
    if not isinstance(feature, Mapping):
        raise ValueError(f"feature {index} must be a dict, got {type(feature).__name__}")
    for key in ("input_ids", "labels", "prompt_len"):
        if key not in feature:
            raise ValueError(f"feature {index} has no {key!r} (keys: {sorted(feature)})")
    input_ids = _as_int_list(feature["input_ids"])
    labels = _as_int_list(feature["labels"])
    if len(input_ids) != len(labels):
        raise ValueError(
            f"feature {index}: input_ids has {len(input_ids)} tokens but labels has {len(labels)}"
        )
    prompt_len = int(feature["prompt_len"])
    if not 0 <= prompt_len <= len(input_ids):
        raise ValueError(f"feature {index}: prompt_len {prompt_len} outside 0..{len(input_ids)}")
    return _Row(input_ids, labels, prompt_len)


def _to_rows(features: Sequence[Mapping[str, Any]]) -> list[_Row]:
    if not features:
        raise ValueError("cannot collate an empty batch")
    return [_to_row(i, f) for i, f in enumerate(features)]


@dataclass
class MDLMCollator:
    """Right-pad input_ids with the pad id and labels with `label_pad_token_id`.

    `label_pad_token_id` None means the pad id itself: padding is trained on (the
    model learns to emit EOS); pass -100 to leave padding out of the loss. Output keys:
    input_ids [b, L], labels [b, L], prompt_len [b] (all long); no attention_mask.

    Block diffusion (`block_size`): each row is first filled with the pad id up to a whole
    number of blocks, and that fill is trained (the answer's end-of-text); the batch's
    padding beyond it is whole blocks that no real token attends to, so it is left out of
    the loss (-100) and a row's loss does not depend on its batch. `ignore_first_token`
    leaves column 0 unscored (right-shifted models have nothing to score it from).
    """

    pad_token_id: int
    label_pad_token_id: int | None = None
    pad_to_multiple_of: int | None = None
    block_size: int | None = None
    ignore_first_token: bool = False

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def label_pad_id(self) -> int:
        """The id written into padded label positions."""
        return self.pad_token_id if self.label_pad_token_id is None else self.label_pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        return self._pad(_to_rows(features))

    def _padded_width(self, width: int) -> int:
        multiple = self.block_size or self.pad_to_multiple_of
        return width if not multiple else -(-width // multiple) * multiple

    def _fill_to_block(self, row: _Row) -> _Row:
        """The row padded with the (trained) pad id to a whole number of blocks."""
        fill = self._padded_width(len(row.input_ids)) - len(row.input_ids)
        pad = [self.pad_token_id] * fill
        return _Row(row.input_ids + pad, row.labels + pad, row.prompt_len)

    def _pad(self, rows: list[_Row], max_width: int | None = None) -> dict[str, Tensor]:
        """Right-pad rows; `max_width` first cuts every row's tail to that many tokens."""
        if max_width is not None:
            rows = [_Row(r.input_ids[:max_width], r.labels[:max_width], r.prompt_len) for r in rows]
        if self.block_size:
            rows = [self._fill_to_block(r) for r in rows]
        width = self._padded_width(max(len(r.input_ids) for r in rows))
        label_pad = IGNORE_INDEX if self.block_size else self.label_pad_id
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), label_pad, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            input_ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
            labels[i, :n] = torch.tensor(row.labels, dtype=torch.long)
        if self.ignore_first_token:
            labels[:, 0] = IGNORE_INDEX
        prompt_len = torch.tensor([r.prompt_len for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "prompt_len": prompt_len}


@dataclass
class DreamCollator(MDLMCollator):
    """MDLM padding plus Dream's random response cut-offs (against length bias).

    perbatch_cutoff (default): pick one example uniformly at random and trim every
    longer response (its tail) to that example's response length before padding.
    resp_cutoff_ratio r acts ONLY when perbatch_cutoff is False: with probability r,
    cut k ~ U{1..min_resp_len-1} tokens off the tail of the padded batch, where
    min_resp_len is the shortest response (nothing happens when it is <= 1). Every row
    therefore keeps its prompt and at least one response token.

    Randomness comes from a generator keyed by (seed, the batch's token ids): the same
    batch always gets the same cut, so runs are reproducible, DataLoader workers do not
    repeat each other, and a resumed run (which skips batches without collating them)
    cuts exactly as the uninterrupted run did.
    """

    perbatch_cutoff: bool = True
    resp_cutoff_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.resp_cutoff_ratio <= 1.0:
            raise ValueError(f"resp_cutoff_ratio must be in [0, 1], got {self.resp_cutoff_ratio}")

    def _rng(self, rows: list[_Row]) -> torch.Generator:
        return keyed_generator(self.seed, [list(r.input_ids) for r in rows])

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        rows = _to_rows(features)
        rng = self._rng(rows)
        if self.perbatch_cutoff:
            return self._pad(self._cut_to_random_response(rows, rng))
        return self._pad(rows, max_width=self._tail_cut_width(rows, rng))

    def _cut_to_random_response(self, rows: list[_Row], rng: torch.Generator) -> list[_Row]:
        chosen = int(torch.randint(len(rows), (1,), generator=rng))
        kept = rows[chosen].response_len
        return [
            r
            if r.response_len <= kept
            else _Row(
                r.input_ids[: r.prompt_len + kept], r.labels[: r.prompt_len + kept], r.prompt_len
            )
            for r in rows
        ]

    def _tail_cut_width(self, rows: list[_Row], rng: torch.Generator) -> int | None:
        """Width of the batch after the random tail cut, or None for no cut."""
        if self.resp_cutoff_ratio <= 0.0:
            return None
        if float(torch.rand((), generator=rng)) >= self.resp_cutoff_ratio:
            return None
        min_resp = min(r.response_len for r in rows)
        if min_resp <= 1:
            return None
        cut = int(torch.randint(1, min_resp, (1,), generator=rng))
        return max(len(r.input_ids) for r in rows) - cut


@dataclass
class PackedCollator:
    """Packed rows right-padded to the batch's longest row, with their segment ids.

    Each feature is one packed row: `input_ids` and `labels` of its examples laid end to
    end and `seq_lens`, the examples' lengths. Output: input_ids [b, L] (filler: the pad
    id), labels [b, L] (filler: -100, never scored), segment_ids [b, L] (0, 1, ... per
    example, FILLER_SEGMENT for the filler); no attention_mask (the trainer builds the
    per-example attention from the segment ids for the model's type).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = [self._row(i, f) for i, f in enumerate(features)]
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        segment_ids = torch.full((len(rows), width), FILLER_SEGMENT, dtype=torch.long)
        for i, (ids, labs, lens) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[i, : len(ids)] = torch.tensor(labs, dtype=torch.long)
            segment_ids[i, : len(ids)] = torch.repeat_interleave(
                torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long)
            )
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}

    @staticmethod
    def _row(index: int, feature: Any) -> tuple[list[int], list[int], list[int]]:
        """Check one packed row: its examples' lengths must add up to its token count."""
        if not isinstance(feature, Mapping) or "seq_lens" not in feature:
            raise ValueError(f"packed row {index} has no 'seq_lens' (is packing on?)")
        ids, labels = _as_int_list(feature["input_ids"]), _as_int_list(feature["labels"])
        lens = _as_int_list(feature["seq_lens"])
        if len(ids) != len(labels) or sum(lens) != len(ids) or min(lens, default=0) < 1:
            raise ValueError(
                f"packed row {index}: {len(ids)} tokens, {len(labels)} labels and example "
                f"lengths {lens} do not match"
            )
        return ids, labels, lens


@dataclass
class CanvasCollator:
    """Prompt + answer filled with EOS to whole blocks, right-padded, with an attention mask.

    Blocks count from the answer's first token (where generation's first canvas starts).
    The EOS fill is part of the answer (scored: the model learns to end inside a block);
    the padding after it is not (attention_mask 0). Labels are not used: the answer is
    everything after `prompt_len`. Output keys: input_ids, attention_mask [b, S];
    prompt_len, response_len [b] (response_len: the filled answer, a multiple of
    block_size; 0 for a row without answer tokens).
    """

    pad_token_id: int
    eos_token_id: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def filled_length(self, response_len: int) -> int:
        return -(-response_len // self.block_size) * self.block_size

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        rows = _to_rows(features)
        filled = [self.filled_length(r.response_len) for r in rows]
        lengths = [r.prompt_len + f for r, f in zip(rows, filled, strict=True)]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            fill = [self.eos_token_id] * (n - len(row.input_ids))
            input_ids[i, :n] = torch.tensor(row.input_ids + fill, dtype=torch.long)
            attention_mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompt_len": torch.tensor([r.prompt_len for r in rows], dtype=torch.long),
            "response_len": torch.tensor(filled, dtype=torch.long),
        }
