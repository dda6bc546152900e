"""Rank 0's reports to the launcher, for hosts that only the launcher may talk to.

Every call of the Transformer Lab task SDK rewrites the job file without a lock, so with
several training processes exactly one process may make them: the launcher. Rank 0 then
runs with a `ChannelHost`: each report (progress, metrics, a log line, a saved checkpoint
or model, the final summary) becomes one JSON line appended to a file in the launch's
temporary folder. The launcher reads the new lines while it supervises the processes
(`EventReader.replay`) and makes the same calls on its own host. The final call
(`complete` or `stopped`) is held until the processes have exited: a run that fails
after rank 0 finished is reported as failed, not as complete.

One `write` of one line to a file opened for appending is not interleaved with other
writes, and the reader only takes lines that end in a newline: it never sees half an
event.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from .base import Host

logger = logging.getLogger(__name__)

CHANNEL_ENV = "DLLM_HOST_CHANNEL"  # JSON: the events file and the host's stop rule
REPLAYED = ("progress", "metrics", "add_data", "log", "checkpoint_saved", "output_saved")
FINAL = ("complete", "stopped")
PATH_ARGUMENT = ("checkpoint_saved", "output_saved")  # their first argument is a folder


def channel_environment(events: Path, host: Host) -> dict[str, str]:
    """The environment entry that makes the launched processes report through `events`."""
    spec = {"events": str(events), "stop_grace_s": host.stop_grace_s, "name": host.name}
    return {CHANNEL_ENV: json.dumps(spec)}


def channel_from_environment() -> ChannelHost | None:
    """The ChannelHost of a process our launcher started for such a host, else None."""
    raw = os.environ.get(CHANNEL_ENV)
    if not raw:
        return None
    spec = json.loads(raw)
    return ChannelHost(Path(spec["events"]), spec.get("stop_grace_s"), spec.get("name", ""))


def json_safe(value: Any) -> Any:
    """JSON-safe: paths as text, NaN/inf as null (the job file must stay valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class ChannelHost(Host):
    """Rank 0's host in a launched job: every report is an event for the launcher."""

    inside_host = True

    def __init__(self, events: Path, stop_grace_s: float | None, name: str = ""):
        self.events = Path(events)
        self.stop_grace_s = stop_grace_s
        self.name = f"{name} (through the launcher)" if name else "launcher"

    def _send(self, call: str, *args: Any) -> None:
        line = json.dumps({"call": call, "args": json_safe(list(args))}, default=str) + "\n"
        try:
            with open(self.events, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:  # the launcher is gone (stopped): nothing left to tell
            logger.debug("could not hand %s to the launcher: %s", call, e)

    def progress(self, percent: float, eta_seconds: float | None = None) -> None:
        self._send("progress", percent, eta_seconds)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._send("metrics", values, step)

    def add_data(self, key: str, value: Any) -> None:
        self._send("add_data", key, value)

    def log(self, message: str) -> None:
        self._send("log", message)

    def checkpoint_saved(self, path: Path) -> None:
        self._send("checkpoint_saved", path)

    def output_saved(self, folder: Path, kind: str, architecture: str, base_model: str) -> None:
        self._send("output_saved", folder, kind, architecture, base_model)

    def complete(self, summary: dict[str, Any]) -> None:
        self._send("complete", summary)

    def stopped(self, summary: dict[str, Any]) -> None:
        self._send("stopped", summary)


class EventReader:
    """The launcher's side: new events from the file, replayed on the launcher's host."""

    def __init__(self, events: Path):
        self.events = Path(events)
        self.final: tuple[str, dict[str, Any]] | None = None  # held complete/stopped call
        self._offset = 0
        self._partial = b""

    def new_events(self) -> list[dict[str, Any]]:
        """Events whose line is complete, each once."""
        try:
            with open(self.events, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                logger.warning("ignoring an unreadable report from rank 0: %r", line[:200])
        return events

    def replay(self, host: Host) -> None:
        """Make rank 0's new calls on `host`; keep the final one in `self.final`."""
        for event in self.new_events():
            call, args = event.get("call"), list(event.get("args", []))
            if call in FINAL and args:
                self.final = (call, args[0])
            elif call in REPLAYED:
                if call in PATH_ARGUMENT:
                    args[0] = Path(args[0])
                try:
                    getattr(host, call)(*args)
                except Exception as e:  # bookkeeping never stops the supervision
                    logger.warning("could not pass rank 0's %s on to the host: %s", call, e)
            else:
                logger.warning("ignoring an unknown report from rank 0: %r", call)
