"""Where the job runs: inside Transformer Lab (its SDK) or stand-alone.

The rest of the code talks to a `Host` only: progress, metrics, the stop flag, the
dataset, model registration and the final status.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Host:
    """Stand-alone behaviour; TransformerLabHost overrides what the host provides."""

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
        """The job failed; the reason is also the last log line (printed by main)."""


class StandaloneHost(Host):
    """Runs from the command line: everything goes to the log and output_dir."""


def detect_host() -> Host:
    """The host SDK when the Transformer Lab harness runs us, else stand-alone.

    The SDK module exists only inside the host (its harness puts it on sys.path), so
    being able to import it is the test.
    """
    from .tlab_host import TransformerLabHost, sdk_available

    if sdk_available():
        logger.info("running inside Transformer Lab")
        return TransformerLabHost()
    return StandaloneHost()
