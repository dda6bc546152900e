"""Generators keyed by data, not by history.

The noise of a training row, its dropout, the Dream collator's cut-offs and the weights a
checkpoint lacks are drawn from generators seeded by a hash of what they belong to
(seed, step, row, batch ids, parameter name). The same key gives the same draw whatever the process
count, the accumulation steps or an interruption and resume in between.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def keyed_seed(*key: object) -> int:
    """A 63-bit seed from a tuple (stable across runs, processes and platforms)."""
    digest = hashlib.sha256(repr(tuple(key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from `key`."""
    return torch.Generator().manual_seed(keyed_seed(*key))


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run a block with the global RNG (the CPU's and that of the CUDA device in use)
    seeded from `seed`, then restore the previous state; None runs it unchanged.

    Dropout draws from the global RNG: seeding it per micro-batch from a key makes them
    a function of the data, like the noise (gradient checkpointing replays the state it
    saved at the forward, so recomputation sees the same draws).
    """
    if seed is None:
        yield
        return
    cuda = torch.device(device).type == "cuda"
    index = (torch.device(device).index or torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
