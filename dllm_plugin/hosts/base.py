"""The Host interface: what a job tells the world around it, and what it asks.

The job code talks to a `Host` only: the config (when the host holds it), progress,
metrics, log lines, job data, the stop flag, the dataset, saved checkpoints and models,
and the final status. `Host` itself is the stand-alone behaviour (everything goes to the
log and output_dir); the Transformer Lab hosts override what their app provides. With
several training processes only one of them (rank 0) reports: the others see the host
through `NonMainRankHost`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Host:
    """The interface, with the stand-alone behaviour as its defaults."""

    name = "standalone"
    inside_host = False
    # Seconds between a stop signal and the process's exit that the host allows, or None
    # for no limit. With a limit a stop writes no new checkpoint (the newest periodic one
    # is the resumable state) and an interrupt before training is a stop, not a failure.
    stop_grace_s: float | None = None
    # True: with several training processes, the launcher (not rank 0) talks to the
    # host; rank 0 hands its reports to the launcher (hosts/channel.py).
    reports_from_launcher = False

    def raw_config(self) -> dict[str, Any] | None:
        """The job's raw config when the host holds it; None = read the job file."""
        return None

    def configure(self, config: Any) -> None:
        """The validated job config, before any data or weights are loaded."""

    def load_dataset(self, config: Any) -> Any | None:
        """A DatasetDict when the host owns the dataset; None = load it ourselves."""
        return None

    def progress(self, percent: float, eta_seconds: float | None = None) -> None:
        """Training progress 0-100 (the Trainer's own progress bar shows it stand-alone)."""

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Train/eval metrics of one logging step."""

    def add_data(self, key: str, value: Any) -> None:
        """Extra job data (samples, output paths)."""

    def log(self, message: str) -> None:
        """One log line for the host's own job log (our logger's records, `forward_logs`)."""

    def checkpoint_saved(self, path: Path) -> None:
        """A complete periodic checkpoint folder (every process has written its part)."""

    def output_saved(self, folder: Path, kind: str, architecture: str, base_model: str) -> None:
        """A saved adaptor, full model or merged model folder, for the host to list."""

    def should_stop(self) -> bool:
        return False

    def models_dir(self) -> Path | None:
        """Where full models go so the host lists them; None stand-alone."""
        return None

    def register_model(self, folder: Path, name: str, architecture: str) -> None:
        """Tell the host about a new full model (the record is already in the folder)."""

    def running(self) -> None:
        """The job started."""

    def complete(self, summary: dict[str, Any]) -> None:
        logger.info("job complete")

    def stopped(self, summary: dict[str, Any]) -> None:
        logger.info("job stopped on request")

    def fail(self, reason: str) -> None:
        """The job failed; the reason is also the last log line (printed by the CLI)."""


class NonMainRankHost(Host):
    """What a rank other than 0 sees of the host: the dataset and the stop flag.

    Status, progress, metrics and model registration come from rank 0 only; a failure
    on any rank reaches the host through the launcher.
    """

    def __init__(self, host: Host):
        self._host = host
        _copy_attributes(host, self)

    def load_dataset(self, config: Any) -> Any | None:
        return self._host.load_dataset(config)

    def should_stop(self) -> bool:
        return self._host.should_stop()

    def models_dir(self) -> Path | None:
        return self._host.models_dir()


class MainRankHost(Host):
    """Rank 0 of a launched job: the host itself, plus `on_stopped` after a clean stop
    (the launcher must not read its non-zero status after a forwarded signal as a
    failure)."""

    def __init__(self, host: Host, on_stopped: Callable[[dict[str, Any]], None]):
        self._host = host
        self._on_stopped = on_stopped
        _copy_attributes(host, self)

    def configure(self, config: Any) -> None:
        self._host.configure(config)

    def load_dataset(self, config: Any) -> Any | None:
        return self._host.load_dataset(config)

    def progress(self, percent: float, eta_seconds: float | None = None) -> None:
        self._host.progress(percent, eta_seconds)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._host.metrics(values, step)

    def add_data(self, key: str, value: Any) -> None:
        self._host.add_data(key, value)

    def log(self, message: str) -> None:
        self._host.log(message)

    def checkpoint_saved(self, path: Path) -> None:
        self._host.checkpoint_saved(path)

    def output_saved(self, folder: Path, kind: str, architecture: str, base_model: str) -> None:
        self._host.output_saved(folder, kind, architecture, base_model)

    def should_stop(self) -> bool:
        return self._host.should_stop()

    def models_dir(self) -> Path | None:
        return self._host.models_dir()

    def register_model(self, folder: Path, name: str, architecture: str) -> None:
        self._host.register_model(folder, name, architecture)

    def running(self) -> None:
        self._host.running()

    def complete(self, summary: dict[str, Any]) -> None:
        self._host.complete(summary)

    def stopped(self, summary: dict[str, Any]) -> None:
        self._on_stopped(summary)
        self._host.stopped(summary)

    def fail(self, reason: str) -> None:
        self._host.fail(reason)


def _copy_attributes(host: Host, view: Host) -> None:
    """A rank's view behaves like the host in every decision all ranks must agree on."""
    for attribute in ("name", "inside_host", "stop_grace_s", "reports_from_launcher"):
        setattr(view, attribute, getattr(host, attribute))


class _HostLogHandler(logging.Handler):
    """Our logger's records (INFO and up) as host log lines."""

    def __init__(self, host: Host):
        super().__init__(logging.INFO)
        self.host = host
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.host.log(self.format(record))
        except Exception:  # a log line must never break the job
            self.handleError(record)


@contextlib.contextmanager
def forward_logs(host: Host) -> Iterator[None]:
    """While inside, the job's log lines also reach the host's job log."""
    handler = _HostLogHandler(host)
    root = logging.getLogger("dllm_plugin")
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
