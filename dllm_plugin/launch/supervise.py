"""Run the launched training processes and learn how they ended.

The launcher streams the children's output into our log, passes the first
SIGTERM/SIGINT on to them, and reads the failure-file protocol: each launched process
that fails writes its reason into a shared folder (one file per rank); rank 0 writes a
marker after a clean stop on request. The parent then reports the first rank's reason,
or the children's last meaningful output line when none could write one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import signals
from ..atomic import write_text
from ..config import PLUGIN_DIR
from .plan import LaunchPlan

logger = logging.getLogger(__name__)

MAIN_SCRIPT = PLUGIN_DIR / "main.py"
# A launched child writes its failure reason into this folder (one file per rank).
FAILURE_DIR_ENV = "DLLM_FAILURE_DIR"
STOPPED_MARKER = "stopped"  # written there by rank 0 after a clean stop on request


@dataclass
class LaunchResult:
    """What the launched training processes did: their exit status and, on failure, why."""

    returncode: int
    reason: str = ""


# ---- the command and its environment -----------------------------------------------------
def launch_command(
    plan: LaunchPlan, config_path: Path, input_file: Path, args: argparse.Namespace
) -> list[str]:
    """`python -m accelerate.commands.launch ... main.py --input_file F --launched_with_accelerate ...`."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_path),
    ]
    if plan.device == "cpu":
        # A MULTI_CPU config alone (like `--cpu --num_processes N`) silently runs ONE
        # process; `--multi_gpu` picks the torchrun launcher, which gives N gloo ranks.
        command.append("--multi_gpu")
    command += [
        str(MAIN_SCRIPT),
        "--input_file",
        str(Path(input_file).resolve()),
        "--launched_with_accelerate",
    ]
    for name in ("plugin_dir", "experiment_name", "job_id"):  # the harness's own arguments
        value = getattr(args, name, None)
        if value is not None:
            command += [f"--{name}", str(value)]
    return command


def child_environment(plan: LaunchPlan, failure_dir: Path) -> dict[str, str]:
    """Our environment (host variables such as _TFL_ORG_ID included) plus what children need."""
    env = dict(os.environ)
    env[FAILURE_DIR_ENV] = str(failure_dir)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the job log as they are printed
    env["PYTHONPATH"] = python_path(env.get("PYTHONPATH", ""))
    if plan.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.visible_devices
    if plan.device == "cpu" and "OMP_NUM_THREADS" not in env:
        # torchrun would set 1; share this machine's cores between the ranks instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.processes_per_machine))
    return env


def python_path(existing: str) -> str:
    """PYTHONPATH holding our sys.path entries that are not installed packages or stdlib.

    The host's harness puts its SDK folder (and the plugin folder) on sys.path; the
    launched children must import the same modules.
    """
    stdlib = {
        str(Path(p).resolve())
        for key in ("stdlib", "platstdlib")
        if (p := sysconfig.get_paths().get(key))
    }
    entries: list[str] = []
    for entry in [*sys.path, *existing.split(os.pathsep)]:
        if not entry or not os.path.isdir(entry):
            continue
        resolved = str(Path(entry).resolve())
        parts = Path(resolved).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if any(resolved == s or resolved.startswith(s + os.sep) for s in stdlib):
            continue
        if resolved not in entries:
            entries.append(resolved)
    return os.pathsep.join(entries)


# ---- run and report -------------------------------------------------------------------
def run_streaming(command: list[str], env: dict[str, str], keep: int = 40) -> tuple[int, list[str]]:
    """Run the launcher, copy its output to our stdout line by line; (status, last lines).

    The first SIGTERM/SIGINT sent to us is passed on once (a second copy would cut short
    the launcher's own graceful shutdown): the training processes stop at the end of
    their step with a checkpoint and do not outlive a killed job. We read until every
    process holding the output pipe is gone, so we never return before the ranks do.
    """
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    with _forward_first_signal(proc):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        returncode = proc.wait()
    return returncode, list(tail)


@contextlib.contextmanager
def _forward_first_signal(proc: subprocess.Popen) -> Iterator[None]:
    forwarded: list[int] = []

    def forward(sig: int, _frame: Any) -> None:
        if not forwarded and proc.poll() is None:
            forwarded.append(sig)
            logger.warning("passing %s on to the training processes", signals.name(sig))
            proc.send_signal(sig)

    with signals.handling(forward):
        yield


def launch_result(failure_dir: Path, returncode: int, tail: list[str]) -> LaunchResult:
    """Success, a clean stop on request, or a failure with the best reason we have."""
    if returncode == 0:
        return LaunchResult(0)
    reason = rank_failure(failure_dir)
    if reason is None and (failure_dir / STOPPED_MARKER).is_file():
        # Rank 0 stopped on request with a checkpoint and told the host; the launcher
        # only reports the signal that asked for it.
        logger.info("training processes stopped on request (launcher status %s)", returncode)
        return LaunchResult(0)
    return LaunchResult(returncode, reason or fallback_reason(returncode, tail))


def rank_failure(failure_dir: Path) -> str | None:
    """'rank R: reason' for the first reason written (the lowest rank that wrote it), or None."""
    written = []
    for path in failure_dir.glob("rank-*.txt"):
        with contextlib.suppress(OSError, ValueError):
            rank = int(path.stem.split("-", 1)[1])
            written.append((path.stat().st_mtime_ns, rank, path.read_text(encoding="utf-8")))
    if not written:
        return None
    first = min(written)[2]
    rank = min(r for _, r, text in written if text == first)
    return f"rank {rank}: {first.strip() or 'unknown error'}"


def fallback_reason(returncode: int, tail: list[str]) -> str:
    """No rank wrote a reason (killed, crashed hard): the children's FAILED line or last line."""
    status = f"training processes exited with status {returncode}"
    for line in reversed(tail):
        if line.startswith("FAILED: "):
            return line[len("FAILED: ") :]
    meaningful = [line.strip() for line in tail if re.search(r"[A-Za-z0-9]", line)]
    return f"{status}: {meaningful[-1]}" if meaningful else status


def record_failure(reason: str) -> None:
    """In a launched child: leave this rank's failure reason for the launcher. Never raises."""
    _leave_note(f"rank-{os.environ.get('RANK', '0')}.txt", reason)


def record_stopped(summary: dict[str, Any]) -> None:
    """In rank 0 of a launched job: note a clean stop on request for the launcher."""
    _leave_note(STOPPED_MARKER, str(summary.get("global_step", "")))


def _leave_note(name: str, text: str) -> None:
    folder = os.environ.get(FAILURE_DIR_ENV)
    if folder:
        with contextlib.suppress(OSError):
            write_text(Path(folder) / name, text)


def launched_by_us() -> bool:
    """True in a training process that our launcher started (it reads our notes)."""
    return bool(os.environ.get(FAILURE_DIR_ENV))
