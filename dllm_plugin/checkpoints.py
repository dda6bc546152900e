"""Checkpoint folders in output_dir: which are complete, which is the newest.

Light on purpose (no torch, no transformers): the stop watchdog and the job folder's
bookkeeping read checkpoints too, and must not wait seconds for an import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint that finished writing, else None.

    transformers writes the weights, optimizer, scheduler and RNG state first and
    trainer_state.json last, without a rename: a readable trainer_state.json for the
    folder's own step means the rest is there; a process killed while writing it leaves
    a truncated file, which does not parse.
    """
    match = CHECKPOINT_RE.match(path.name)
    if not match or not path.is_dir():
        return None
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step = int(match.group(1))
    return step if isinstance(state, dict) and state.get("global_step") == step else None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The most recently written complete checkpoint in output_dir.

    Most recent by the time trainer_state.json was written, not by step number: the
    host gives every job of a training template the same output_dir, so checkpoints of
    an older job with more steps can sit beside the ones of the job being resumed.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = [
        ((p / TRAINER_STATE).stat().st_mtime, step, p)
        for p in output_dir.iterdir()
        if (step := checkpoint_step(p)) is not None
    ]
    return max(complete)[2] if complete else None
