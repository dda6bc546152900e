"""Where the job runs: stand-alone, inside Transformer Lab's plugin era, or as a task."""

from __future__ import annotations

import logging

from .base import Host, MainRankHost, NonMainRankHost, forward_logs
from .channel import ChannelHost, EventReader, channel_environment, channel_from_environment
from .plugin import PluginHost, plugin_sdk_available
from .task import TaskHost, task_sdk_available

logger = logging.getLogger(__name__)

__all__ = [
    "ChannelHost",
    "EventReader",
    "Host",
    "MainRankHost",
    "NonMainRankHost",
    "PluginHost",
    "TaskHost",
    "channel_environment",
    "detect_host",
    "forward_logs",
]


def detect_host() -> Host:
    """The host this process reports to.

    In order: the plugin-era SDK (the harness puts it on sys.path, so being able to
    import it is the test); a launched training process whose launcher talks to the host
    (it left the channel in our environment); a Transformer Lab task (`_TFL_JOB_ID` and
    the `lab` SDK); else stand-alone.
    """
    if plugin_sdk_available():
        logger.info("running inside Transformer Lab (plugin)")
        return PluginHost()
    channel = channel_from_environment()
    if channel is not None:
        return channel
    if task_sdk_available():
        logger.info("running inside Transformer Lab (task)")
        return TaskHost()
    return Host()
