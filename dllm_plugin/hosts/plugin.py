"""The job inside Transformer Lab's plugin era: progress, metrics, stop and status through its SDK.

The SDK (`transformerlab.sdk.v1.train.tlab_trainer`) exists only inside the host, so it
is imported lazily and its absence means stand-alone. Depending on the host version its
job object (`lab.Job`) has plain or `async` methods; `_call` accepts both.

Why not the SDK's `job_wrapper`: for a stopped run it writes progress 100 and
completion_status "success" and then re-raises the stop; on failure it replaces the
reason with a generic text. This class writes the same job-data keys the wrapper writes
(start_time, end_time, completion_status, completion_details) with honest values, and
sets the job status itself where the host would get it wrong: the host marks a job that
is still RUNNING as COMPLETE when the process exits, whatever the exit code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import inspect
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..atomic import write_json
from ..config import resolve_path
from .base import Host

logger = logging.getLogger(__name__)

# The harness puts the SDK folder on sys.path (first name); the host's API package
# exposes the same module under the second name.
SDK_MODULES = (
    "transformerlab.sdk.v1.train",
    "transformerlab.plugin_sdk.transformerlab.sdk.v1.train",
)
PROGRESS_INTERVAL_S = 2.0  # at most one progress write per interval unless the percent moves
DETAILS_MAX_CHARS = 2000


@functools.cache
def load_sdk() -> ModuleType | None:
    """The SDK module holding `tlab_trainer`, or None outside the host."""
    for name in SDK_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and not name.startswith(e.name):  # the SDK is there but a dependency is not
                logger.warning("Transformer Lab SDK %s cannot be imported: %s", name, e)
            continue
        except (Exception, SystemExit) as e:  # the SDK exits when it finds no workspace
            logger.warning(
                "Transformer Lab SDK %s failed to load (%s): running stand-alone", name, e
            )
            return None
        if hasattr(module, "tlab_trainer"):
            return module
    return None


def plugin_sdk_available() -> bool:
    """True inside Transformer Lab's plugin harness (its SDK imports)."""
    return load_sdk() is not None


def run_awaitable(value: Any) -> Any:
    """The result of `value`, awaiting it when the SDK handed back a coroutine."""
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    # Called from inside an event loop (not ours): run the coroutine on its own thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def metric_name(key: str) -> str:
    """The SDK's metric naming: 'eval_loss' -> 'eval/loss', 'train_loss' -> 'train/loss'."""
    return re.sub(r"^(train|eval)_", r"\1/", key)


def json_number(value: Any) -> Any:
    """JSON-safe: NaN/inf would make the host's job JSON unreadable to its web UI."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def secure_name(name: str) -> str:
    """How the host names a dataset folder (werkzeug's secure_filename, when available)."""
    try:
        from werkzeug.utils import secure_filename
    except ImportError:
        return re.sub(r"[^A-Za-z0-9_.-]", "", "_".join(name.replace("/", " ").split())).strip("._")
    return secure_filename(name)


class PluginHost(Host):
    """Talks to the host's job through `tlab_trainer`; never lets bookkeeping kill training."""

    name = "transformerlab-plugin"
    inside_host = True

    def __init__(self, sdk: Any = None, workspace: str | Path | None = None):
        """`sdk` (the `tlab_trainer` object) and `workspace` default to the SDK's (tests
        pass their own)."""
        self._sdk = sdk
        self._workspace = Path(workspace) if workspace is not None else None
        self._cfg: Any = None
        self._stop = False
        self._last_percent = -1
        self._last_sent = 0.0
        self._metrics: dict[str, Any] = {}

    # ---- plumbing ------------------------------------------------------------------
    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            module = load_sdk()
            if module is None:
                raise RuntimeError("the Transformer Lab SDK is not available")
            self._sdk = module.tlab_trainer
        return self._sdk

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one SDK call; a failure is logged, never raised (the job matters more)."""
        try:
            return run_awaitable(fn(*args))
        except Exception as e:
            logger.warning("Transformer Lab: could not %s: %s", what, e)
            return None

    def _data(self, key: str, value: Any) -> None:
        self._call(f"set job data {key!r}", self.sdk.add_job_data, key, value)

    def _status(self, status: str) -> None:
        self._call(f"set the job status to {status}", lambda: self.sdk.job.update_status(status))

    def _sync_params(self, cfg: Any) -> None:
        """Make `tlab_trainer.params` (read by the SDK's load_dataset, provenance, ...)
        hold our validated config rather than the raw strings of the input file."""
        parse = getattr(self.sdk, "_ensure_args_parsed", None)
        if parse is not None:  # parse first, or parsing later would overwrite our values
            self._call("parse the job arguments", parse)
        params = self.sdk.params
        for key, value in cfg.to_dict().items():
            if key != "job_id":  # the SDK's job object is already bound to its own id
                params[key] = value

    def workspace(self) -> Path | None:
        """The host workspace: the SDK's own WORKSPACE_DIR, as its model registration uses."""
        if self._workspace is not None:
            return self._workspace
        module = sys.modules.get(type(self.sdk).__module__)
        found = getattr(module, "WORKSPACE_DIR", None) or os.environ.get("TFL_WORKSPACE_DIR")
        if not found or "://" in str(found):
            if found:
                logger.warning(
                    "workspace %s is remote storage: full models stay in output_dir", found
                )
            return None
        self._workspace = Path(found)
        return self._workspace

    # ---- the Host interface --------------------------------------------------------
    def configure(self, cfg: Any) -> None:
        self._cfg = cfg
        self._sync_params(cfg)
        self._data("start_time", time.strftime("%Y-%m-%d %H:%M:%S"))
        self._data("model_name", cfg.model_name)
        self._data("template_name", cfg.template_name)
        # The host shows its TensorBoard button only when this key is set; its TensorBoard
        # reads the experiment's tensorboards/<template> folder, our output_dir.
        self._data("tensorboard_output_dir", str(cfg.output_dir))
        self.progress(0.0)

    def load_dataset(self, config: Any) -> Any | None:
        """A host dataset through the SDK; None (we load it) for local paths and hub ids."""
        name = config.dataset_name
        if not name or resolve_path(name, config.source_dir).exists():
            return None
        workspace = self.workspace()
        folders = {name, secure_name(name)}
        if workspace is None or not any((workspace / "datasets" / f).is_dir() for f in folders):
            return None
        import datasets

        self._sync_params(config)
        logger.info("dataset %r: loading it through Transformer Lab", name)
        loaded = self.sdk.load_dataset(["train"])  # our eval_split_ratio makes the eval split
        return datasets.DatasetDict(dict(loaded))

    def progress(self, percent: float, eta_seconds: float | None = None) -> None:
        """Monotonic whole percents; throttled because each SDK call rewrites the job file.
        The SDK's progress_update is also where a stop request surfaces (KeyboardInterrupt)."""
        value = max(self._last_percent, min(100, int(percent)))
        now = time.monotonic()
        if value == self._last_percent and now - self._last_sent < PROGRESS_INTERVAL_S:
            return
        self._last_percent, self._last_sent = value, now
        self._send_progress(value)
        if eta_seconds is not None:
            self._data("estimated_time_remaining", round(eta_seconds))

    def _send_progress(self, value: int) -> bool:
        """True when the SDK reported a stop request (it has then set STOPPED itself)."""
        try:
            run_awaitable(self.sdk.progress_update(value))
        except KeyboardInterrupt:
            if not self._stop:
                logger.warning("Transformer Lab asked to stop the job")
            self._stop = True
            return True
        except Exception as e:
            logger.warning("Transformer Lab: could not report progress: %s", e)
        return False

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Latest value of each metric as job data, and metrics.json in output_dir (the
        host's sweeps read it, with the SDK's 'eval/loss' names)."""
        self._metrics.update({metric_name(k): json_number(v) for k, v in values.items()})
        self._metrics["step"] = step
        self._data("metrics", dict(self._metrics))
        if self._cfg is not None:
            try:
                write_json(Path(self._cfg.output_dir) / "metrics.json", self._metrics)
            except OSError as e:
                logger.warning("could not write metrics.json: %s", e)

    def add_data(self, key: str, value: Any) -> None:
        self._data(key, json_number(value))

    def should_stop(self) -> bool:
        if self._stop:
            return True
        try:  # older SDKs had a should_stop flag on the job object
            return bool(getattr(self.sdk.job, "should_stop", False))
        except Exception:
            return False

    def models_dir(self) -> Path | None:
        workspace = self.workspace()
        return workspace / "models" if workspace is not None else None

    def register_model(self, folder: Path, name: str, architecture: str) -> None:
        """The SDK rewrites the record (index.json) and adds md5 checksums and
        _tlab_provenance.json; our record is already in the folder if this fails."""
        create = getattr(self.sdk, "create_transformerlab_model", None)
        if create is None:
            return
        if Path(folder).parent != self.models_dir():
            logger.warning("%s is not in the workspace models folder: not registered", folder)
            return
        json_data = _record_json_data(Path(folder))
        self._call(f"register model {name}", create, name, architecture, json_data)

    def complete(self, summary: dict[str, Any]) -> None:
        """Success data; the host itself turns the RUNNING job into COMPLETE at exit."""
        stop_came_late = self._send_progress(100)
        self._data("completion_status", "success")
        self._data("completion_details", finished_details(summary))
        self._data("end_time", time.strftime("%Y-%m-%d %H:%M:%S"))
        for key in ("output_path", "merged_model_path", "loss_plot"):
            if summary.get(key):
                self._data(key, str(summary[key]))
        if stop_came_late:  # the SDK set STOPPED after the last step: the run did finish
            self._status("COMPLETE")
        logger.info("job complete")

    def stopped(self, summary: dict[str, Any]) -> None:
        self._status("STOPPED")
        checkpoint = summary.get("checkpoint")
        self._data("completion_status", "stopped")
        self._data(
            "completion_details",
            f"stopped on request at step {summary.get('global_step')}; resumable checkpoint "
            f"{checkpoint} (run again with resume_from_checkpoint=auto)",
        )
        self._data("end_time", time.strftime("%Y-%m-%d %H:%M:%S"))
        if checkpoint:
            self._data("checkpoint", str(checkpoint))
        logger.info("job stopped on request")

    def fail(self, reason: str) -> None:
        """FAILED status first (the one thing the host would otherwise get wrong)."""
        try:
            self._status("FAILED")
            self._data("completion_status", "failed")
            self._data("completion_details", reason[:DETAILS_MAX_CHARS])
            self._data("end_time", time.strftime("%Y-%m-%d %H:%M:%S"))
        except Exception as e:  # e.g. no job id at all: the log line is all we have
            logger.warning("Transformer Lab: could not mark the job failed: %s", e)


def _record_json_data(folder: Path) -> dict[str, Any]:
    """Our record's json_data (description, architecture, ...) for the SDK's record."""
    import json

    try:
        record = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        return dict(record.get("json_data", {}))
    except (OSError, ValueError):
        return {}


def finished_details(summary: dict[str, Any]) -> str:
    parts = [f"training finished: {summary.get('global_step')} steps"]
    for key in ("train_loss", "eval_loss"):
        if isinstance(summary.get(key), int | float):
            parts.append(f"{key.replace('_', ' ')} {summary[key]:.4g}")
    if summary.get("output_path"):
        parts.append(f"saved to {summary['output_path']}")
    return ", ".join(parts)
