"""Fake `transformerlab.sdk.v1.train`: the `tlab_trainer` object a trainer plugin uses.

Behaviour follows the documented SDK: params from argv then the input file's config,
progress_update raising KeyboardInterrupt after setting STOPPED when job data `stop` is
set, job_wrapper marking completion_status (not the job status), load_dataset returning
a dict of splits, create_transformerlab_model writing the record, checksums and
provenance into <workspace>/models/<name>.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import inspect
import json
import os
import time
import traceback
from typing import Any

from lab import Job
from lab.job import record_call

from transformerlab.plugin import WORKSPACE_DIR, generate_model_json, get_dataset_path


class DotDict(dict):
    __getattr__ = dict.get
    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__


def _sync(value: Any) -> Any:
    return asyncio.run(value) if inspect.iscoroutine(value) else value


class TrainerTLabPlugin:
    def __init__(self) -> None:
        self._job: Job | None = None
        self._parser = argparse.ArgumentParser(description="TransformerLab Plugin")
        self._parser.add_argument("--job_id", type=str)
        self._parser.add_argument("--dataset_name", type=str)
        self._parser.add_argument("--model_name", type=str)
        self._parser.add_argument("--input_file", default=None, type=str)
        self.params = DotDict()
        self._args_parsed = False
        self._config_parsed = False
        self.tlab_plugin_type = "trainer"

    # -- arguments and config --
    def _ensure_args_parsed(self) -> None:
        if not self._args_parsed:
            args, _ = self._parser.parse_known_args()
            for key, value in vars(args).items():
                self.params[key] = value
            self._args_parsed = True
        if not self._config_parsed and self.params.input_file is not None:
            with open(self.params.input_file, encoding="utf-8") as f:
                data = json.load(f)
            self.params._config = data.get("config", data)
            for key, value in self.params._config.items():
                if self.params.get(key) is None:
                    self.params[key] = value
            self._config_parsed = True

    def add_argument(self, *args: Any, **kwargs: Any) -> TrainerTLabPlugin:
        self._parser.add_argument(*args, **kwargs)
        return self

    @property
    def job(self) -> Job:
        if not self._job:
            self._ensure_args_parsed()
            self._job = Job(self.params.job_id)
        return self._job

    # -- job updates --
    def progress_update(self, progress: int) -> None:
        record_call(self.job.id, "progress_update", value=progress)
        job_data = _sync(self.job.get_job_data())
        if job_data.get("sweep_progress") is not None and int(job_data["sweep_progress"]) != 100:
            _sync(self.job.update_job_data_field("sweep_subprogress", progress))
            return
        _sync(self.job.update_progress(progress))
        stop_at = os.environ.get("FAKE_TLAB_STOP_AT_PROGRESS")
        if stop_at and progress >= float(stop_at):  # the user presses Stop in the UI
            _sync(self.job.update_job_data_field("stop", True))
        job_data = _sync(self.job.get_job_data())
        if job_data.get("stop", False):
            _sync(self.job.update_status("STOPPED"))
            raise KeyboardInterrupt("Job stopped by user")

    def add_job_data(self, key: str, value: Any) -> None:
        _sync(self.job.update_job_data_field(key, value))

    def _mark_failed(self, details: str) -> None:
        self.add_job_data("completion_status", "failed")
        self.add_job_data("completion_details", details)
        self.add_job_data("end_time", time.strftime("%Y-%m-%d %H:%M:%S"))

    def job_wrapper(self, progress_start: int = 0, progress_end: int = 100, **_: Any):
        """Completion data around the plugin function; never sets the job status."""

        def decorator(func):
            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self._ensure_args_parsed()
                self.add_job_data("start_time", time.strftime("%Y-%m-%d %H:%M:%S"))
                self.progress_update(progress_start)
                try:
                    result = func(*args, **kwargs)
                    self.progress_update(progress_end)
                    self.add_job_data("completion_status", "success")
                    self.add_job_data("completion_details", "Job completed successfully")
                    self.add_job_data("end_time", time.strftime("%Y-%m-%d %H:%M:%S"))
                    return result
                except Exception as e:
                    print(f"Error in Job: {e}\n{traceback.format_exc()}")
                    self._mark_failed("Error occurred while executing job")
                    raise

            return wrapper

        return decorator

    # -- data --
    def load_dataset(self, dataset_types: list[str] | None = None, config_name: str | None = None):
        """{"train": Dataset} from the workspace dataset folder (all its data files)."""
        import datasets

        self._ensure_args_parsed()
        record_call(self.job.id, "load_dataset", dataset_name=self.params.dataset_name)
        if not self.params.dataset_name:
            self._mark_failed("Dataset name not provided")
            raise ValueError("Dataset name not provided")
        try:
            target = get_dataset_path(self.params.dataset_name)
            files = sorted(
                os.path.join(target, name)
                for name in os.listdir(target)
                if name != "index.json"
                and not name.startswith(".")
                and name.lower().endswith((".json", ".jsonl", ".csv"))
            )
            loaded = {}
            for split in dataset_types or ["train"]:
                loaded[split] = datasets.load_dataset(
                    target, data_files={"train": files}, split="train"
                )
            return loaded
        except Exception:
            self._mark_failed("Failed to load dataset")
            raise

    # -- models --
    def create_transformerlab_model(
        self,
        fused_model_name: str,
        model_architecture: str,
        json_data: dict[str, Any],
        output_dir: str | None = None,
        generate_json: bool = True,
    ) -> None:
        record_call(self.job.id, "create_transformerlab_model", name=fused_model_name)
        location = os.path.join(
            output_dir or os.path.join(WORKSPACE_DIR, "models"), fused_model_name
        )
        if generate_json:
            generate_model_json(
                fused_model_name, model_architecture, model_filename=".", json_data=json_data
            )
        checksums = []
        for root, _, names in os.walk(location):
            for name in sorted(names):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    checksums.append(
                        {"file_path": path, "md5_hash": hashlib.md5(f.read()).hexdigest()}
                    )
        provenance = {
            "model_name": fused_model_name,
            "model_architecture": model_architecture,
            "job_id": self.params.get("job_id"),
            "input_model": self.params.get("model_name"),
            "dataset": self.params.get("dataset_name"),
            "adaptor_name": self.params.get("adaptor_name"),
            "parameters": self.params.get("_config"),
            "md5_checksums": checksums,
        }
        with open(os.path.join(location, "_tlab_provenance.json"), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2)


tlab_trainer = TrainerTLabPlugin()
