"""The examples of a batch, one per row: what the loss works on.

A padded batch holds one example per row. A packed batch (data/packing.py) holds several
per row, marked by `segment_ids` (0, 1, ... in order; -1 marks the filler after the last
example). `ExampleView` gathers each example into its own row of an [E, Le] view, so
timesteps, masks, loss weights and the per-example normalisation are computed exactly
as for padded rows, then scattered back into the batch for the one forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data.collators import FILLER_SEGMENT as FILLER


def segment_lengths(segment_ids: Tensor) -> list[list[int]]:
    """Per row, the length of each example (segments 0, 1, ... in order)."""
    out = []
    for row in segment_ids.cpu():
        ids = row[row != FILLER]
        out.append(torch.bincount(ids).tolist() if ids.numel() else [])
    return out


def count_examples(batch: Mapping[str, Any]) -> int:
    """The number of examples in a collated batch (rows, or segments of packed rows)."""
    if "segment_ids" not in batch:
        return int(batch["input_ids"].shape[0])
    return sum(len(lengths) for lengths in segment_lengths(batch["segment_ids"]))


@dataclass(frozen=True)
class ExampleView:
    """Where each example of a [b, L] batch sits, and its slot (row, segment).

    `rows`/`cols` [E, Le] give the batch position of each view position (None: the view
    is the batch itself, one example per row); `valid` marks the positions that belong
    to the example. `slots[e]` = (batch row, segment or None, examples in that row).
    """

    rows: Tensor | None
    cols: Tensor | None
    valid: Tensor
    slots: tuple[tuple[int, int | None, int], ...]
    batch_shape: tuple[int, int]

    @property
    def packed(self) -> bool:
        return self.rows is not None

    @classmethod
    def padded(cls, batch_rows: int, length: int, device: torch.device) -> ExampleView:
        valid = torch.ones(batch_rows, length, dtype=torch.bool, device=device)
        slots = tuple((r, None, 1) for r in range(batch_rows))
        return cls(None, None, valid, slots, (batch_rows, length))

    @classmethod
    def from_segments(cls, segment_ids: Tensor) -> ExampleView:
        """The view of packed rows, from their segment ids [b, L]."""
        b, length = segment_ids.shape
        lengths = segment_lengths(segment_ids)
        slots = tuple((r, j, len(row)) for r, row in enumerate(lengths) for j in range(len(row)))
        widest = max((n for row in lengths for n in row), default=0)
        rows = torch.zeros(len(slots), widest, dtype=torch.long)
        cols = torch.zeros(len(slots), widest, dtype=torch.long)
        valid = torch.zeros(len(slots), widest, dtype=torch.bool)
        e = 0
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                rows[e] = r
                cols[e] = start + torch.arange(widest).clamp(max=max(n - 1, 0))
                valid[e, :n] = True
                start, e = start + n, e + 1
        device = segment_ids.device
        return cls(rows.to(device), cols.to(device), valid.to(device), slots, (b, length))

    def to_examples(self, x: Tensor, fill: Any = 0) -> Tensor:
        """[b, L] batch values -> [E, Le] view (`fill` outside each example)."""
        if self.rows is None:
            return x
        return x[self.rows, self.cols].masked_fill(~self.valid, fill)

    def to_batch(self, x: Tensor, fill: Any = 0) -> Tensor:
        """[E, Le] view values -> [b, L] batch (`fill` where no example is)."""
        if self.rows is None:
            return x
        out = torch.full(self.batch_shape, fill, dtype=x.dtype, device=x.device)
        out[self.rows[self.valid], self.cols[self.valid]] = x[self.valid]
        return out

    def repeated(self, copies: int) -> ExampleView:
        """The view of the batch stacked `copies` times along its rows (same slots)."""
        if copies == 1:
            return self
        b, length = self.batch_shape
        valid = self.valid.repeat(copies, 1)
        shape = (b * copies, length)
        if self.rows is None:
            return ExampleView(None, None, valid, self.slots * copies, shape)
        rows = torch.cat([self.rows + c * b for c in range(copies)])
        return ExampleView(rows, self.cols.repeat(copies, 1), valid, self.slots * copies, shape)

    def first_positions(self) -> Tensor:
        """[b, L] bool: the first position of every example."""
        starts = torch.zeros_like(self.valid)
        starts[:, 0] = True
        return self.to_batch(starts & self.valid, False) if self.packed else starts
