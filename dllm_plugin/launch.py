"""Single process or a re-launch under accelerate (multi-GPU, multi-CPU, multi-node)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import JobConfig


def maybe_relaunch(cfg: JobConfig, input_file: Path, args: argparse.Namespace) -> int | None:
    """None: train in this process. An int: the exit status of the launched children."""
    return None
