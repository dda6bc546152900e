"""Which trackers a run reports to: TensorBoard always, W&B only when it can work.

A W&B run without an API key aborts the whole job (wandb raises UsageError); without network
it hangs for minutes. Either way the user loses a training run over a dashboard, so W&B
falls back to offline mode with one warning instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)


_SET_BY_US: dict[str, str] = {}


def set_job_env(name: str, value: str) -> None:
    """Set a tracker's environment variable for this job.

    A value the user exported wins; one a previous job of this process set does not
    (else a second in-process job would write into the first job's folder).
    """
    current = os.environ.get(name)
    if current is None or current == _SET_BY_US.get(name):
        os.environ[name] = _SET_BY_US[name] = value


def usable_trackers(log_to_wandb: bool, output_dir: Path) -> list[str]:
    """TensorBoard when installed; W&B when asked and usable, writing under output_dir
    (the plugin host runs jobs from its own source folder: never the working directory)."""
    trackers = []
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        trackers.append("tensorboard")
    else:
        logger.warning(
            "TensorBoard is not installed: no event files will be written (pip install tensorboard)"
        )
    if log_to_wandb and _wandb_ready():
        set_job_env("WANDB_DIR", str(output_dir))
        trackers.append("wandb")
    return trackers


def _wandb_ready() -> bool:
    """True when W&B can log (online with a key, or offline); warns once otherwise."""
    if importlib.util.find_spec("wandb") is None:
        logger.warning("log_to_wandb is true but wandb is not installed: continuing without W&B")
        return False
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return mode != "disabled"
    if not _has_api_key():
        reason = "no W&B API key is configured"
    elif not _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        reason = "the W&B server cannot be reached"
    else:
        return True
    os.environ["WANDB_MODE"] = "offline"
    logger.warning(
        "log_to_wandb: %s; logging to W&B offline (sync later with `wandb sync`)", reason
    )
    return True


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "wandb" in netrc.read_text()
    except OSError:
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
