"""Generators keyed by data, not by history.

The noise of a training row, the Dream collator's cut-offs and the weights a checkpoint
lacks are drawn from generators seeded by a hash of what they belong to (seed, step, row,
batch ids, parameter name). The same key gives the same draw whatever the process
count, the accumulation steps or an interruption and resume in between.
"""

from __future__ import annotations

import hashlib

import torch


def keyed_seed(*key: object) -> int:
    """A 63-bit seed from a tuple (stable across runs, processes and platforms)."""
    digest = hashlib.sha256(repr(tuple(key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from `key`."""
    return torch.Generator().manual_seed(keyed_seed(*key))
