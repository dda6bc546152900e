"""The job's output folder: one job at a time, and a run summary that is never stale.

The process that owns a job (the single training process, or the launcher of several)
claims `output_dir` before anything is written there: it creates the folder, takes an
exclusive lock (`.dllm-trainer.lock`, holding its pid and host) and writes
`run_summary.json` with status "running". A second job on the same folder fails at once,
naming the holder, and changes nothing. At the end the summary says "complete" or
"stopped" (written by rank 0 with the run's details) or "failed" with the reason, and
the lock file is removed.

The lock is an `flock` on the lock file: the kernel releases it when its process dies,
so a lock left by a killed job is taken over (and said so) rather than blocking forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .atomic import write_json
from .checkpoints import latest_checkpoint
from .errors import ConfigError, UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".dllm-trainer.lock"
SUMMARY_NAME = "run_summary.json"


class OutputDirInUse(UserError):
    """Another running job holds output_dir."""


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    """run_summary.json, atomically (readers never see half of it)."""
    write_json(Path(output_dir) / SUMMARY_NAME, summary)


class JobFolder:
    """A claimed output_dir: its lock is held until `release`."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd: int | None = lock_fd

    def running(self, config: dict[str, Any]) -> None:
        write_summary(
            self.path,
            {
                "status": "running",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": now(),
                "config": config,
            },
        )

    def failed(self, reason: str) -> None:
        """The final word for a failed job (rank 0 may have written nothing at all)."""
        summary = _read_summary(self.path)
        summary.update({"status": "failed", "reason": reason, "ended": now()})
        write_summary(self.path, summary)

    def stopped(self, reason: str) -> None:
        """A job stopped before training wrote its own summary (see `mark_stopped`)."""
        mark_stopped(self.path, reason)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in that order: a waiting job
        that opened the old file sees it unlinked and retries)."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_NAME)
        os.close(self._lock_fd)
        self._lock_fd = None


def mark_stopped(path: Path, reason: str) -> None:
    """Turn a summary that still says "running" into "stopped": the job ended on request
    before its training processes could write their own (complete or stopped) summary."""
    summary = _read_summary(Path(path))
    if summary.get("status") not in (None, "running"):
        return
    checkpoint = latest_checkpoint(Path(path))
    summary.update(
        {
            "status": "stopped",
            "reason": reason,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "ended": now(),
        }
    )
    write_summary(Path(path), summary)


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def make_output_dir(path: Path) -> None:
    """Create output_dir, or fail naming the field."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot create {str(path)!r}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {str(path)!r} is not writable")


def _holder(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    return {}


def lock_output_dir(path: Path) -> JobFolder:
    """Take the exclusive lock of output_dir (created if needed) or raise OutputDirInUse."""
    make_output_dir(path)
    lock_path = path / LOCK_NAME
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise OutputDirInUse(
                f"output_dir {str(path)!r} is in use by another job: pid {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')} since {holder.get('started', '?')}; wait for it "
                "to end or choose another output_dir"
            ) from None
        # The file may have been unlinked by its releasing owner after we opened it.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder(fd)
    if stale.get("pid"):
        logger.warning(
            "output_dir %s: taking over the lock of job pid %s on %s, which is no longer running",
            path,
            stale.get("pid"),
            stale.get("host"),
        )
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
    return JobFolder(path, fd)
