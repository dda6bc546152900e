"""Where the job runs: stand-alone, or inside Transformer Lab (plugin-era SDK)."""

from __future__ import annotations

import logging

from .base import Host, MainRankHost, NonMainRankHost
from .plugin import PluginHost, plugin_sdk_available

logger = logging.getLogger(__name__)

__all__ = ["Host", "MainRankHost", "NonMainRankHost", "PluginHost", "detect_host"]


def detect_host() -> Host:
    """The plugin SDK's host when the Transformer Lab harness runs us, else stand-alone.

    The SDK module exists only inside the host (its harness puts it on sys.path), so
    being able to import it is the test.
    """
    if plugin_sdk_available():
        logger.info("running inside Transformer Lab (plugin)")
        return PluginHost()
    return Host()
