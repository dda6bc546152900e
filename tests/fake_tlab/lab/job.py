"""Fake lab.Job: one JSON file per job; coroutine methods as in `transformerlab` 0.0.74."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from .dirs import workspace_dir


def job_dir(job_id: Any) -> Path:
    return Path(workspace_dir()) / "jobs" / str(job_id)


def record_call(job_id: Any, call: str, **fields: Any) -> None:
    """Append one SDK call to calls.jsonl (test inspection only)."""
    folder = job_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "calls.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"call": call, **fields}, default=str) + "\n")


class Job:
    def __init__(self, job_id: Any):
        self.id = job_id
        self.should_stop = False

    # -- storage --
    def _file(self) -> Path:
        return job_dir(self.id) / "index.json"

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self._file().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"id": self.id, "status": "NOT_STARTED", "progress": 0, "job_data": {}}

    def _write(self, data: dict[str, Any]) -> None:
        path = self._file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
        # allow_nan=False: the host's web UI cannot parse NaN, so a plugin must not send it
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False), encoding="utf-8")
        os.replace(tmp, path)

    def _set(self, key: str, value: Any) -> None:
        data = self._read()
        data[key] = value
        self._write(data)

    # -- the API plugins use --
    async def get_json_data(self, uncached: bool = False) -> dict[str, Any]:
        return self._read()

    async def update_progress(self, progress: int) -> None:
        self._set("progress", progress)

    async def update_status(self, status: str) -> None:
        record_call(self.id, "update_status", status=status)
        self._set("status", status)

    async def get_status(self) -> str:
        return self._read().get("status")

    async def get_progress(self) -> int:
        return self._read().get("progress")

    async def get_job_data(self) -> dict[str, Any]:
        return self._read().get("job_data", {})

    async def update_job_data_field(self, key: str, value: Any) -> None:
        data = self._read()
        data.setdefault("job_data", {})[key] = value
        self._write(data)

    async def set_job_completion_status(
        self, completion_status: str, completion_details: str = "", score: Any = None
    ) -> None:
        if completion_status not in ("success", "failed"):
            raise ValueError("completion_status must be either 'success' or 'failed'")
        data = self._read()
        data.setdefault("job_data", {}).update(
            completion_status=completion_status, completion_details=completion_details
        )
        if score is not None:
            data["job_data"]["score"] = score
        self._write(data)
