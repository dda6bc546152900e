"""Single process or a re-launch under accelerate (multi-GPU, multi-CPU, multi-node)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .config import JobConfig


@dataclass
class LaunchResult:
    """What the launched training processes did: their exit status and, on failure, why."""

    returncode: int
    reason: str = ""


def maybe_relaunch(cfg: JobConfig, input_file: Path, args: argparse.Namespace) -> LaunchResult | None:
    """None: train in this process. Otherwise the result of the launched processes."""
    return None
