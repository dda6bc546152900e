"""Run the plugin as Transformer Lab does, against the fake SDK in this folder.

The job runner's part is emulated here: it creates the job (RUNNING), writes the input
file `{"experiment", "config"}` with the host fields, starts the harness from a working
directory that is not the plugin's, and when the process has exited marks the job
COMPLETE if it is still RUNNING, whatever the exit code (as the real host does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAKE_TLAB = Path(__file__).resolve().parent
REPO = FAKE_TLAB.parents[1]
HARNESS = FAKE_TLAB / "plugin_harness.py"
EXPERIMENT = "alpha"


def quiet_env(**overrides: str | None) -> dict[str, str]:
    """Environment for a plugin subprocess: offline, one thread, no W&B; None removes."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        WANDB_MODE="disabled",
    )
    env.pop("TENSORBOARD_LOGGING_DIR", None)  # each job picks its folder under output_dir
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass
class HostRun:
    """One finished plugin process and what it left in the fake job store."""

    returncode: int
    output: str
    workspace: Path
    job_id: str
    status_at_exit: str = ""

    @property
    def job(self) -> dict[str, Any]:
        return json.loads((self.workspace / "jobs" / self.job_id / "index.json").read_text())

    @property
    def job_data(self) -> dict[str, Any]:
        return self.job.get("job_data", {})

    def calls(self, name: str) -> list[dict[str, Any]]:
        path = self.workspace / "jobs" / self.job_id / "calls.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [c for c in map(json.loads, lines) if c["call"] == name]

    @property
    def last_line(self) -> str:
        lines = self.output.strip().splitlines()
        return lines[-1] if lines else ""


def install_dataset(workspace: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """A local dataset as the host keeps it: a folder of data files plus its index.json."""
    folder = workspace / "datasets" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "index.json").write_text(json.dumps({"dataset_id": name, "location": "local"}))


def host_config(workspace: Path, job_id: str, template: str, **config: Any) -> dict[str, Any]:
    """The template's saved form plus the fields the job runner adds."""
    model = Path(str(config["model_name"])).name
    adaptor = config.get("adaptor_name", "adaptor")
    return {
        "template_name": template,
        "plugin_name": "dllm_trainer_multi_gpu",
        **config,
        "job_id": job_id,
        "output_dir": str(workspace / "experiments" / EXPERIMENT / "tensorboards" / template),
        "adaptor_output_dir": str(workspace / "adaptors" / model / str(adaptor)),
    }


def run_in_host(
    workspace: Path,
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> HostRun:
    """Run one job through the fake harness and finish it as the host's job runner does."""
    job_id = str(config["job_id"])
    job_file = workspace / "jobs" / job_id / "index.json"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(
        json.dumps({"id": job_id, "status": "RUNNING", "progress": 0, "job_data": {}})
    )
    input_file = workspace / "temp" / f"plugin_input_{job_id}.json"
    input_file.parent.mkdir(parents=True, exist_ok=True)
    input_file.write_text(json.dumps({"experiment": {"name": EXPERIMENT}, "config": config}))
    api_dir = workspace.parent / "host_api"  # the host's cwd, not the plugin folder
    api_dir.mkdir(exist_ok=True)
    command = [
        sys.executable,
        str(HARNESS),
        "--plugin_dir",
        str(REPO),
        "--input_file",
        str(input_file),
        "--experiment_name",
        EXPERIMENT,
    ]
    env = dict(env or quiet_env())
    env["TFL_WORKSPACE_DIR"] = str(workspace)
    env.setdefault("HF_DATASETS_CACHE", str(workspace.parent / "hf_datasets_cache"))
    proc = subprocess.run(
        command,
        cwd=api_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    run = HostRun(proc.returncode, proc.stdout, workspace, job_id)
    job = run.job
    run.status_at_exit = job["status"]
    if job["status"] == "RUNNING":  # the host's on-exit rule
        job["status"] = "COMPLETE"
        job_file.write_text(json.dumps(job))
    return run
