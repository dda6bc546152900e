"""Packing: tokenised examples laid end to end in rows of up to max_length tokens.

Done once on the tokenised dataset, before the Trainer: the Trainer's sampler then
shuffles packed rows exactly as it shuffles examples, so which rows a micro-batch holds,
and the keyed noise and dropout of every example, do not depend on the process count,
the accumulation steps or an interruption and resume (docs/architecture.md).

Algorithm: best-fit decreasing. Examples are taken longest first; each goes into the
open row with the least room that still fits it, or opens a new row. Rooms are integers
up to max_length, so the rows are kept in buckets by room and found in O(log max_length).

Each example keeps its own tokens, labels and prompt masking; two things are added to an
example before packing:
- trailing EOS: a packed example is followed by the next example, not by padding, so it
  would never learn to fill the rest of a generation block with EOS (what trained
  padding teaches unpacked). Each example gets k ~ U{0..trailing_eos} EOS tokens with
  EOS labels after its answer, k drawn once from the job's seed, never beyond
  max_length (a truncated example gets none, as unpacked).
- BOS for right-shifted models (Dream): the shift scores token i with the output at
  i - 1, so an example whose first token is scored gets a BOS (label -100) before it,
  as the unpacked trainer prepends one to the batch; no example is ever scored from the
  previous example's last token.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import datasets

from ..errors import DataError
from ..rng import keyed_generator

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` (items larger than
    capacity get a bin of their own). Deterministic: ties go to the earlier index and
    the earliest-opened bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room -> bins with that room, oldest first
    rooms: list[int] = []  # sorted distinct rooms that have bins
    for i in order:
        size = lengths[i]
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            bins.append([i])
            _add(by_room, rooms, max(capacity - size, 0), len(bins) - 1)
            continue
        room = rooms[at]
        b = by_room[room].pop(0)
        if not by_room[room]:
            del by_room[room]
            rooms.pop(at)
        bins[b].append(i)
        _add(by_room, rooms, room - size, b)
    return bins


def _add(by_room: dict[int, list[int]], rooms: list[int], room: int, b: int) -> None:
    if room == 0:
        return  # a full bin takes nothing more
    if room not in by_room:
        by_room[room] = []
        bisect.insort(rooms, room)
    bisect.insort(by_room[room], b)


def packing_waste(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Fraction of the rows' capacity that holds no token."""
    return 1.0 - sum(lengths) / max(len(bins) * capacity, 1)


@dataclass(frozen=True)
class PackOptions:
    max_length: int
    eos_id: int
    trailing_eos: int  # the most EOS tokens after an example (each draws 0..this)
    shifted: bool = False  # a right-shifted model (Dream): BOS before a scored start
    bos_id: int | None = None
    seed: int = 0


def trailing_eos_counts(n: int, opts: PackOptions, split: str) -> list[int]:
    """k ~ U{0..trailing_eos} per example, keyed by (seed, split): fixed for a job."""
    import torch

    gen = keyed_generator(opts.seed, "trailing_eos", split)
    return torch.randint(0, opts.trailing_eos + 1, (n,), generator=gen).tolist()


def prepare_example(
    input_ids: list[int], labels: list[int], eos: int, opts: PackOptions
) -> tuple[list[int], list[int]]:
    """The example as it goes into a row: `eos` trailing EOS (within max_length), then a
    BOS in front when the model is right-shifted and the first token is scored."""
    eos = max(0, min(eos, opts.max_length - len(input_ids)))
    input_ids = list(input_ids) + [opts.eos_id] * eos
    labels = list(labels) + [opts.eos_id] * eos
    if opts.shifted and labels and labels[0] != IGNORE_INDEX:
        if opts.bos_id is None:
            raise DataError(
                "packing for a right-shifted model (Dream) needs a BOS token before examples "
                "whose first token is trained, and the tokenizer has none; set "
                "mask_prompt_loss to true"
            )
        input_ids, labels = [opts.bos_id, *input_ids], [IGNORE_INDEX, *labels]
    return input_ids, labels


def pack_dataset(
    features: datasets.Dataset, opts: PackOptions, split: str = "train"
) -> datasets.Dataset:
    """Tokenised examples (input_ids, labels) -> packed rows (input_ids, labels, seq_lens)."""
    ids_column, labels_column = features["input_ids"], features["labels"]
    counts = trailing_eos_counts(len(ids_column), opts, split)
    examples = [
        prepare_example(ids, labels, k, opts)
        for ids, labels, k in zip(ids_column, labels_column, counts, strict=True)
    ]
    lengths = [len(ids) for ids, _ in examples]
    capacity = max(opts.max_length, max(lengths, default=0))
    bins = best_fit_decreasing(lengths, capacity)
    rows = {"input_ids": [], "labels": [], "seq_lens": []}
    for members in bins:
        rows["input_ids"].append([t for i in members for t in examples[i][0]])
        rows["labels"].append([t for i in members for t in examples[i][1]])
        rows["seq_lens"].append([lengths[i] for i in members])
    real = sum(len(ids) for ids in ids_column)
    logger.info(
        "packing %s: %d examples (%d tokens, %d added EOS/BOS) into %d rows of up to %d "
        "tokens (best-fit decreasing): %.1f%% of the rows' room unused",
        split,
        len(examples),
        real,
        sum(lengths) - real,
        len(bins),
        capacity,
        100 * packing_waste(lengths, bins, capacity),
    )
    return datasets.Dataset.from_dict(rows)
