"""The job as a Transformer Lab task: config, reports and status through the `lab` SDK.

Today's Transformer Lab runs a task's `run` command under `tfl-remote-trap`, with the
job's id in `_TFL_JOB_ID`, and talks to the script only through the SDK of the PyPI
package `transformerlab` 0.1.x (module `lab`). The SDK is imported lazily; without it
(or without `_TFL_JOB_ID`) the job is not a task. The contract, with its sources:
../shared/facts/transformerlab-tasks.md. The traps this host is built around:

- Every SDK call rewrites the job's index.json (truncate, then write) without a lock.
  One process makes them (this one; with several training processes the launcher, see
  hosts/channel.py); each call holds SIGTERM/SIGINT back until it is done
  (signals.deferred) and holds a lock the stop watchdog waits for.
- Stop sends SIGTERM to the whole process tree and SIGKILL 3 s later; the app turns an
  exit status 0 after a stop into STOPPED, anything else into FAILED. So a stop writes
  no new checkpoint (the newest periodic one is already registered, with
  `lab.save_checkpoint`), and a watchdog ends the process with status 0
  `STOP_GRACE_S` after the signal if the current step has not ended by then.
- Parameters arrive as typed values, as strings (the CLI) or, from a raw API caller, as
  the schema dicts of task.yaml, often with extra keys (use_spot, sweep_*, ...):
  `build_job_config` coerces and validates them like any other job's.
- `lab.error` alone does not fill the task list's `error_msg`; a failure sets both and
  ends with a non-zero exit status (the trap marks the job FAILED on it).
- The app's server writes the same job file the same unlocked way (Stop, the trap's
  live status), and a read that meets a half-written file is taken as an empty record,
  which the next write makes permanent. `harden_job_files` makes this process's SDK
  reads wait out a half-written file and its writes replace the file atomically.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import signals
from ..atomic import write_text
from ..errors import one_line
from ..jobdir import mark_stopped
from .base import Host
from .channel import json_safe
from .plugin import PROGRESS_INTERVAL_S, finished_details, json_number, metric_name, secure_name

logger = logging.getLogger(__name__)

JOB_ID_ENV = "_TFL_JOB_ID"
STOP_GRACE_S = 2.0  # the app kills 3 s after its SIGTERM; the trap needs the rest
SCHEMA_KEYS = ("type", "default", "min", "max", "options", "enum")  # the app's schema test
# The app's own secret names (Team/User settings); used when set, never required.
SECRETS = (("_HF_TOKEN", "HF_TOKEN"), ("_WANDB_API_KEY", "WANDB_API_KEY"))
PIPELINE_TAG = "text-generation"  # given, so save_model does not ask the hub for one
DEFAULT_OUTPUT_DIR = "output"  # under the task's working directory: the one writable place
READ_ATTEMPTS, READ_PAUSE_S = 50, 0.01  # a half-written job file is whole again within ms


def task_sdk_available() -> bool:
    """True when Transformer Lab runs this script as a task (its job id and SDK are here)."""
    if not os.environ.get(JOB_ID_ENV):
        return False
    try:
        module = importlib.import_module("lab")
    except Exception as e:  # not installed, or it exits when it finds no workspace
        logger.warning(
            "%s is set but the task SDK cannot be imported (%s): stand-alone", JOB_ID_ENV, e
        )
        return False
    except SystemExit:
        logger.warning("%s is set but the task SDK found no workspace: stand-alone", JOB_ID_ENV)
        return False
    if not hasattr(module, "Lab"):
        logger.warning("%s is set but `lab` is not the task SDK (transformerlab 0.1.x)", JOB_ID_ENV)
        return False
    return True


class JobRecordUnreadable(RuntimeError):
    """The job file stayed unparsable: better not to write than to write it back empty."""


def harden_job_files() -> None:
    """Make this process's SDK job-file reads and writes safe against the app's writers.

    The SDK (0.1.x) reads a record, changes it and writes it back by truncating the file;
    a read that meets another process's half-written file returns {} and the write that
    follows wipes the record. Here a local record is read again until it parses (a
    write in progress ends within milliseconds) and written to a temporary file that
    replaces it, so others never see it half-written. Remote storage keeps the SDK's way.
    """
    try:
        from lab import storage
        from lab.labresource import BaseLabResource
    except ImportError:  # an SDK without these internals: nothing to harden
        return
    if getattr(BaseLabResource, "_dllm_hardened", False):
        return
    sdk_get, sdk_set = BaseLabResource.get_json_data, BaseLabResource._set_json_data

    async def get_json_data(self: Any, uncached: bool = False, max_retries: int = 5) -> Any:
        path = await self._get_json_file()
        if storage.is_remote_path(path):
            return await sdk_get(self, uncached=uncached, max_retries=max_retries)
        for _ in range(READ_ATTEMPTS):
            try:
                text = Path(path).read_text(encoding="utf-8")
            except FileNotFoundError:
                return {}
            try:
                data = json.loads(text.strip().rstrip("%").strip())
            except ValueError:
                await asyncio.sleep(READ_PAUSE_S)
                continue
            return json_safe(data) if isinstance(data, dict) else {}
        raise JobRecordUnreadable(f"{path} does not parse: not rewriting it")

    async def set_json_data(self: Any, json_data: Any) -> None:
        path = await self._get_json_file()
        if storage.is_remote_path(path) or not isinstance(json_data, dict):
            return await sdk_set(self, json_data)
        write_text(Path(path), json.dumps(json_safe(json_data), ensure_ascii=False))

    BaseLabResource.get_json_data = get_json_data
    BaseLabResource._set_json_data = set_json_data
    BaseLabResource._dllm_hardened = True


def unwrap_parameter(value: Any) -> Any:
    """A value as the form would send it: a schema dict (a raw API caller sent the task's
    own parameters) stands for its default."""
    if isinstance(value, dict) and any(key in value for key in SCHEMA_KEYS):
        return value.get("default")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def registry_model(models_dir: Path, model_id: str) -> str | None:
    """Where the app's model registry keeps `model_id`: its folder when the weights are
    there, else the hub id its record names (weights in the shared HF cache); None when
    the registry does not know it. Flat ids, grouped ids ('group/v1') and ids with the
    app's 'TransformerLab/' prefix are looked up as the app lays them out."""
    parts = [secure_name(p) for p in model_id.split("/") if p]
    candidates = [models_dir / secure_name(model_id)]
    if parts:
        candidates.append(models_dir.joinpath(*parts))
    if len(parts) > 1:
        candidates.append(models_dir / secure_name(model_id.split("/", 1)[1]))
    for folder in candidates:
        if (folder / "config.json").is_file():
            return str(folder)
    for folder in candidates:
        record = _read_json(folder / "index.json")
        if record:
            json_data = record.get("json_data") or {}
            return str(json_data.get("huggingface_repo") or record.get("model_id") or model_id)
    return None


def registry_dataset(datasets_dir: Path, dataset_id: str) -> tuple[str, str | None] | None:
    """(a local folder or a hub id, the hub config name) of a dataset in the app's
    registry, or None when the registry does not know it."""
    folder = datasets_dir / secure_name(dataset_id)
    if not folder.is_dir():
        return None
    record = _read_json(folder / "index.json")
    if record.get("location") == "huggingfacehub":
        json_data = record.get("json_data") or {}
        return str(json_data.get("huggingfacerepo") or dataset_id), json_data.get("config_name")
    return str(folder), None


def run_score(summary: dict[str, Any]) -> dict[str, float]:
    """Every number the run measured, under the SDK's names ('eval/loss'): sweeps rank
    runs by one of them (the app's default sweep metric is 'eval/loss')."""
    score: dict[str, float] = {}
    for key, value in (summary.get("metrics") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            score[metric_name(key)] = value
    for key in ("train_loss", "eval_loss"):
        value = summary.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            score[metric_name(key)] = value
    if isinstance(summary.get("global_step"), int):
        score["steps"] = summary["global_step"]
    return score


class TaskHost(Host):
    """Talks to the task's job through `lab`; bookkeeping never kills training."""

    name = "transformerlab-task"
    inside_host = True
    stop_grace_s = STOP_GRACE_S
    reports_from_launcher = True

    def __init__(self, lab: Any = None):
        """`lab` is the SDK's facade (`from lab import lab`), imported when first used."""
        self._lab = lab
        self._lock = threading.RLock()  # held for every SDK call; the watchdog waits for it
        self._output_dir: Path | None = None
        self._percent = 0  # the last percent written
        self._seen_percent = 0  # the last percent reported (metrics rows carry it)
        self._last_progress_at = 0.0
        self._step = 0
        self._checkpoint: Path | None = None  # the newest registered checkpoint
        self._final = False  # complete/stopped/failed has been recorded

    @property
    def lab(self) -> Any:
        if self._lab is None:
            from lab import lab

            self._lab = lab
        return self._lab

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One SDK call: signals held back, never two at once; a failure is logged, not
        raised (the job matters more than its bookkeeping)."""
        with self._lock, signals.deferred():
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if what != "log":  # a failing log call must not log about itself
                    logger.warning("Transformer Lab: could not %s: %s", what, e)
                return None

    # ---- the config -------------------------------------------------------------------
    def raw_config(self) -> dict[str, Any]:
        """The task's parameters (the launch's values over task.yaml's defaults), with the
        model and dataset found in the app's registry, output_dir under the working
        directory, and the checkpoint of a resumed job."""
        harden_job_files()
        with self._lock, signals.deferred():
            self.lab.init()  # RUNNING; a missing job raises and fails the run
        raw = {k: unwrap_parameter(v) for k, v in (self.lab.get_config() or {}).items()}
        raw.setdefault("job_id", os.environ.get(JOB_ID_ENV))
        self._use_secrets()
        self._resolve_registry_names(raw)
        raw["output_dir"] = str(Path(raw.get("output_dir") or Path.cwd() / DEFAULT_OUTPUT_DIR))
        self._output_dir = Path(raw["output_dir"])
        resume = self._call("find the checkpoint to resume", self.lab.get_checkpoint_to_resume)
        if resume:
            logger.info("resumed job: continuing from the parent job's checkpoint %s", resume)
            raw["resume_from_checkpoint"] = str(resume)
        threading.Thread(target=self._stop_watchdog, name="stop-watchdog", daemon=True).start()
        return raw

    def _use_secrets(self) -> None:
        """The user's HF token and W&B key from the app's secrets, when set (a task.yaml
        that referenced them would not launch without them)."""
        for secret, variable in SECRETS:
            if os.environ.get(variable):
                continue
            value = self._call(f"read the secret {secret}", self.lab.get_secret, secret)
            if value:
                os.environ[variable] = str(value)
                logger.info("%s: from the app's secret %s", variable, secret)

    @functools.cached_property
    def _workspace(self) -> Path | None:
        """The app's workspace folder on this machine (None for remote storage)."""
        found = os.environ.get("TFL_WORKSPACE_DIR")
        if not found:
            from lab import dirs

            found = self._call("find the workspace", lambda: asyncio.run(dirs.get_workspace_dir()))
        if not found or "://" in str(found):
            return None
        return Path(found)

    def _resolve_registry_names(self, raw: dict[str, Any]) -> None:
        """model_name and dataset_name: a local path stays; an id the app's registry knows
        becomes its folder (or the hub id its record names); anything else is a hub id."""
        for key in ("model_name", "dataset_name"):
            name = raw.get(key)
            if not isinstance(name, str) or not name:
                continue
            local = Path(name).expanduser()
            if local.exists():  # relative to the working directory, where the task's files are
                raw[key] = str(local.resolve())
                continue
            workspace = self._workspace
            if workspace is None:
                continue
            if key == "model_name":
                found = registry_model(workspace / "models", name)
                if found and found != name:
                    logger.info("model_name %r: the app's model %s", name, found)
                    raw[key] = found
            elif (dataset := registry_dataset(workspace / "datasets", name)) is not None:
                logger.info("dataset_name %r: the app's dataset %s", name, dataset[0])
                raw[key] = dataset[0]
                if dataset[1]:
                    raw["dataset_config_name"] = dataset[1]

    # ---- reports ----------------------------------------------------------------------
    def progress(self, percent: float, eta_seconds: float | None = None) -> None:
        """Whole percents, forward only, at most one write per interval (each rewrites
        the job file)."""
        value = min(100, int(percent))
        self._seen_percent = max(self._seen_percent, value)
        now = time.monotonic()
        if value <= self._percent or (now - self._last_progress_at < PROGRESS_INTERVAL_S):
            return
        self._percent, self._last_progress_at = value, now
        self._call("report progress", self.lab.update_progress, value)

    def metrics(self, values: dict[str, float], step: int) -> None:
        """One metrics row (job_data.current_metrics and metrics.jsonl), SDK names."""
        self._step = step
        named = {metric_name(k): json_number(v) for k, v in values.items()}
        self._call(
            "report metrics",
            self.lab.update_progress,
            self._seen_percent,
            metrics=named,
            step=step,
        )

    def add_data(self, key: str, value: Any) -> None:
        self._call(f"set job data {key!r}", self.lab.set_job_data_field, key, json_number(value))

    def log(self, message: str) -> None:
        self._call("log", self.lab.log, message)

    def checkpoint_saved(self, path: Path) -> None:
        """Copy the checkpoint into the job (the app lists it and resumes from it); the
        registered copies follow save_total_limit like the ones in output_dir. After a
        stop signal a checkpoint is still registered while the grace period lasts: it is
        the newest resumable state (a copy the app's SIGKILL cuts short stays unlisted:
        the SDK lists a checkpoint only after copying it)."""
        stop_at = signals.first_stop_at()
        if stop_at is not None and time.monotonic() - stop_at >= self.stop_grace_s:
            logger.info("%s is not registered: the job is stopping", path.name)
            return
        dest = self._call(f"register {path.name}", self.lab.save_checkpoint, str(path), path.name)
        if not dest:
            return
        self._checkpoint = Path(dest)
        logger.info("registered %s with the job", path.name)
        with self._lock:
            for kept in Path(dest).parent.glob("checkpoint-*"):
                if not (path.parent / kept.name).exists():  # rotated out of output_dir
                    shutil.rmtree(kept, ignore_errors=True)

    def output_saved(self, folder: Path, kind: str, architecture: str, base_model: str) -> None:
        """The adaptor or model, copied into the job's models and listed there."""
        dest = self._call(
            f"save the {kind} with the job",
            self.lab.save_model,
            str(folder),
            name=folder.name,
            architecture=architecture,
            pipeline_tag=PIPELINE_TAG,
            parent_model=base_model,
        )
        if dest:
            logger.info("the %s is listed with the job: %s", kind, dest)

    # ---- the end ----------------------------------------------------------------------
    def complete(self, summary: dict[str, Any]) -> None:
        with self._lock:
            if self._final:
                return
            details = finished_details(summary)
            self.log(f"done: {details}")
            self._call("mark the job complete", self.lab.finish, details, score=run_score(summary))
            self._final = True

    def stopped(self, summary: dict[str, Any]) -> None:
        """Exit status 0 makes the app's STOPPING job STOPPED; the resumable state is the
        newest registered checkpoint."""
        with self._lock:
            if self._final:
                return
            self._final = True
            step = summary.get("global_step", self._step)
            where = f"the registered {self._checkpoint.name}" if self._checkpoint else "none"
            self.log(f"stopped on request at step {step}; resumable checkpoint: {where}")
            self._call("keep the job STOPPING", self._keep_stopping)

    def _keep_stopping(self) -> None:
        """The app sets STOPPING before its SIGTERM, but a job-file write of ours that began
        just before can put RUNNING back (no lock): the exit would then read as COMPLETE."""
        job = self.lab.job
        if asyncio.run(job.get_status()) == "RUNNING":
            asyncio.run(job.update_status("STOPPING"))

    def fail(self, reason: str) -> None:
        """FAILED with the reason as completion details, error_msg and last log line."""
        with self._lock:
            self._final = True
            self._call("mark the job failed", self.lab.error, reason)
            self._call("set error_msg", self.lab.set_job_data_field, "error_msg", one_line(reason))
            self.log(f"FAILED: {one_line(reason)}")

    def _stop_watchdog(self) -> None:
        """Exit with status 0 `stop_grace_s` after a stop signal when the job has not
        ended by then (a long step, a launcher that does not return): never inside an
        SDK call, and with the run summary saying stopped."""
        while True:
            at = signals.first_stop_at()
            if at is not None and time.monotonic() - at >= self.stop_grace_s:
                break
            time.sleep(0.05)
        with self._lock:
            logger.warning(
                "stop: the job did not end within %.0f s of the stop signal; exiting now "
                "(work since the newest checkpoint is lost)",
                self.stop_grace_s,
            )
            if self._output_dir is not None:
                try:
                    mark_stopped(self._output_dir, "stopped on request before the step ended")
                except OSError as e:
                    logger.warning("could not update run_summary.json: %s", e)
            self.stopped({"global_step": self._step})
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
