"""Run the launched training processes and learn how they ended.

The launcher streams the children's output into our log, passes the first
SIGTERM/SIGINT on to them, and reads the failure-file protocol: each launched process
that fails writes its reason into a shared folder (one file per rank); rank 0 writes a
marker after a clean stop on request. The parent then reports the first rank's reason;
when none could write one (a process that died at start-up, e.g. at an import), the
last exception line a child printed; else the children's last meaningful output line.

The children import exactly what the parent imports: they get the parent's whole
`sys.path`, in its order, and main.py puts it in place before anything is imported.
(Handing the parent's extra folders over on PYTHONPATH instead puts them ahead of the
venv's site-packages, so a host folder with an older transformers that the parent
only has *after* the venv would win in the children.)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
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
PARENT_SYS_PATH_ENV = "DLLM_PARENT_SYS_PATH"  # the parent's sys.path, read by main.py
TICK_S = 0.2  # how often the launcher looks for rank 0's reports while it waits
# The launcher's own exceptions (torchelastic), not a training process's reason.
LAUNCHER_EXCEPTIONS = ("ChildFailedError", "SignalException")


@dataclass
class LaunchResult:
    """What the launched training processes did: their exit status and, on failure, why."""

    returncode: int
    reason: str = ""
    stopped: bool = False  # they stopped on request (exit status 0 for the job)
    final: tuple[str, dict[str, Any]] | None = None  # rank 0's complete/stopped report


@dataclass
class Streamed:
    """The launcher's exit status and what its output told us."""

    returncode: int
    tail: list[str]
    exception_line: str | None = None  # the last exception a training process printed


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
    env[PARENT_SYS_PATH_ENV] = json.dumps(sys.path)
    if plan.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.visible_devices
    if plan.device == "cpu" and "OMP_NUM_THREADS" not in env:
        # torchrun would set 1; share this machine's cores between the ranks instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.processes_per_machine))
    return env


# ---- run and report -------------------------------------------------------------------
def run_streaming(
    command: list[str],
    env: dict[str, str],
    keep: int = 40,
    on_tick: Callable[[], None] | None = None,
) -> Streamed:
    """Run the launcher, copy its output to our stdout line by line.

    The first SIGTERM/SIGINT sent to us is passed on once (a second copy would cut short
    the launcher's own graceful shutdown): the training processes stop at the end of
    their step and do not outlive a killed job. We read until every process holding the
    output pipe is gone, so we never return before the ranks do; meanwhile `on_tick` runs
    on this (the main) thread every TICK_S and once at the end.
    """
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    exceptions = ExceptionLines()
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def copy_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
            exceptions.feed(line)

    reader = threading.Thread(target=copy_output, name="launcher-output", daemon=True)
    with _forward_first_signal(proc):
        reader.start()
        while reader.is_alive():
            reader.join(TICK_S)
            if on_tick is not None:
                on_tick()
        returncode = proc.wait()
    if on_tick is not None:
        on_tick()
    return Streamed(returncode, list(tail), exceptions.last)


class ExceptionLines:
    """The last exception line of a Python traceback in the children's output.

    A process that dies before our error handling runs (at an import, say) leaves only
    its traceback; torchelastic then prints its own (ChildFailedError), which says
    nothing about the cause and is skipped.
    """

    PREFIX = re.compile(r"^\[[^\]]*\]:\s?")  # torchrun's optional '[rank1]: ' tag

    def __init__(self) -> None:
        self.last: str | None = None
        self._in_traceback = False

    def feed(self, line: str) -> None:
        text = self.PREFIX.sub("", line.rstrip("\n"))
        if text.startswith("Traceback (most recent call last):"):
            self._in_traceback = True
        elif self._in_traceback and text.strip() and not text[0].isspace():
            self._in_traceback = False
            kind = text.split(":", 1)[0].strip()
            if re.fullmatch(r"[A-Za-z_][\w.]*", kind) and (
                kind.rsplit(".", 1)[-1] not in LAUNCHER_EXCEPTIONS
            ):
                self.last = text.strip()


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


def launch_result(failure_dir: Path, streamed: Streamed) -> LaunchResult:
    """Success, a clean stop on request, or a failure with the best reason we have."""
    stopped = (failure_dir / STOPPED_MARKER).is_file()
    if streamed.returncode == 0:
        return LaunchResult(0, stopped=stopped)
    reason = rank_failure(failure_dir)
    if reason is None and stopped:
        # Rank 0 stopped on request and told the host; the launcher only reports the
        # signal that asked for it.
        logger.info(
            "training processes stopped on request (launcher status %s)", streamed.returncode
        )
        return LaunchResult(0, stopped=True)
    return LaunchResult(streamed.returncode, reason or fallback_reason(streamed))


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


def fallback_reason(streamed: Streamed) -> str:
    """No rank wrote a reason (killed, crashed hard): the children's FAILED line, the last
    exception a child printed, or the last line."""
    status = f"training processes exited with status {streamed.returncode}"
    for line in reversed(streamed.tail):
        if line.startswith("FAILED: "):
            return line[len("FAILED: ") :]
    if streamed.exception_line:
        return streamed.exception_line
    meaningful = [line.strip() for line in streamed.tail if re.search(r"[A-Za-z0-9]", line)]
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
