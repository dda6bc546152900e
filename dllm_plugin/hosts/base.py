"""The Host interface: what a job tells the world around it, and what it asks.

The job code talks to a `Host` only: progress, metrics, log data, the stop flag, the
dataset, model registration and the final status. `Host` itself is the stand-alone
behaviour (everything goes to the log and output_dir); the Transformer Lab hosts
override what their app provides. With several training processes only one of them
(rank 0) reports: the others see the host through `NonMainRankHost`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Host:
    """The interface, with the stand-alone behaviour as its defaults."""

    name = "standalone"
    inside_host = False

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
        self.name = host.name
        self.inside_host = host.inside_host

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
        self.name = host.name
        self.inside_host = host.inside_host

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
