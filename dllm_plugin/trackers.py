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


def usable_trackers(log_to_wandb: bool) -> list[str]:
    trackers = []
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        trackers.append("tensorboard")
    else:
        logger.warning(
            "TensorBoard is not installed: no event files will be written (pip install tensorboard)"
        )
    if log_to_wandb and _wandb_ready():
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
