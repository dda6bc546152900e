"""Run the trainer as Transformer Lab's Local provider runs a task, for the tests.

The app's server side is app.py (a subprocess: the real `lab` SDK never enters the test
process). This module does the provider's part (compute_providers/local.py): a job home
that is the working directory and $HOME, holding the task's files as a root GitHub import
leaves them (`cp -r clone/* .`; here links to this checkout), the task's `envs` and the
launch variables, and `bash -c 'tfl-remote-trap -- <run>'` in a new session, with stdout
and stderr in the job folder. Stop is process_registry.py's: SIGTERM to the whole tree,
SIGKILL to what is left 3 s later.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
APP = HERE / "app.py"
EXPERIMENT = "alpha"
TASK_FILES = ("main.py", "index.json", "dllm_plugin", "task.yaml", "pyproject.toml")
KILL_AFTER_S = 3.0  # process_registry._terminate_process_tree


def task_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "task.yaml").read_text(encoding="utf-8"))


def launch_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The job's parameters: task.yaml's (schema dicts) overlaid with the launch's config
    (launch_template.py 530-552)."""
    return {**task_yaml()["parameters"], **config}


@dataclass
class Run:
    """One finished run of the task's command."""

    returncode: int
    output: str
    elapsed_s: float


class TaskApp:
    """A workspace with one experiment, and the jobs run in it."""

    def __init__(self, root: Path):
        self.root = root
        self.workspace = root / "workspace"
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.home_dir = root / "tfl-home"  # the SDK's TFL_HOME_DIR, not the user's ~
        self.home_dir.mkdir(exist_ok=True)
        self.runs = root / "local_provider_runs"

    # ---- the server (app.py, in a subprocess) -------------------------------------------
    def _app(self, *args: str) -> Any:
        proc = subprocess.run(
            [sys.executable, str(APP), *args, "--experiment", EXPERIMENT],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def create_job(self, parameters: dict[str, Any]) -> str:
        job_data = {
            "task_name": "dllm-trainer",
            "run": task_yaml()["run"],
            "parameters": parameters,
        }
        return self._app("create-job", "--job-data", json.dumps(job_data))

    def stop(self, job_id: str) -> None:
        self._app("stop", "--job-id", job_id)

    def settle(self, job_id: str) -> str:
        return self._app("settle", "--job-id", job_id)

    def resume(self, job_id: str, checkpoint: str) -> str:
        return self._app("resume", "--job-id", job_id, "--checkpoint", checkpoint)

    # ---- the job's files ---------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.workspace / "experiments" / EXPERIMENT / "jobs" / job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """The job record, parsed (a wiped or half-written record fails here)."""
        return json.loads((self.job_dir(job_id) / "index.json").read_text(encoding="utf-8"))

    def task_log(self, job_id: str) -> list[str]:
        path = self.job_dir(job_id) / f"output_{job_id}.txt"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def metrics_rows(self, job_id: str) -> list[dict[str, Any]]:
        path = self.job_dir(job_id) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    # ---- the provider ------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for name in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "DLLM_FAILURE_DIR",
            "TENSORBOARD_LOGGING_DIR",
        ):
            env.pop(name, None)
        env.update(
            TFL_WORKSPACE_DIR=str(self.workspace),
            TFL_HOME_DIR=str(self.home_dir),
            TFL_STORAGE_PROVIDER="aws",  # what the app passes even on local disk
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            OMP_NUM_THREADS="1",
        )
        for name in ("WANDB_MODE", "HF_TOKEN", "WANDB_API_KEY"):  # the app's secrets decide
            env.pop(name, None)
        env.update(extra)
        return env

    def home_of(self, job_id: str) -> Path:
        return self.runs / job_id / "workspace"

    def home(self, job_id: str) -> Path:
        """The job's $HOME and working directory, with the task's files in it."""
        home = self.home_of(job_id)
        home.mkdir(parents=True, exist_ok=True)
        for name in TASK_FILES:
            (home / name).symlink_to(REPO / name)
        return home

    def start(self, job_id: str, run: str | None = None, **env: str) -> subprocess.Popen:
        """task.yaml's `run` (or `run`) as the Local provider starts it."""
        task = task_yaml()
        home = self.home(job_id)
        venv_bin = str(Path(sys.executable).parent)
        variables = self.env(
            **task.get("envs", {}),
            _TFL_JOB_ID=job_id,
            _TFL_EXPERIMENT_ID=EXPERIMENT,
            TFL_EXPERIMENT_ID=EXPERIMENT,
            _TFL_USER_ID="user-1",
            HOME=str(home),
            VIRTUAL_ENV=str(Path(venv_bin).parent),
            PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            **env,
        )
        command = f"tfl-remote-trap -- {shlex.quote(run or task['run'])}"  # launch_template.py
        log = open(home.parent / "stdout.log", "w")  # noqa: SIM115 (the child keeps it)
        try:
            return subprocess.Popen(
                ["/bin/bash", "-c", command],
                cwd=home,
                env=variables,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def output(self, job_id: str) -> str:
        return (self.runs / job_id / "stdout.log").read_text(errors="replace")

    def run(self, job_id: str, timeout: float = 300, **env: str) -> Run:
        started = time.monotonic()
        proc = self.start(job_id, **env)
        returncode = proc.wait(timeout=timeout)
        return Run(returncode, self.output(job_id), time.monotonic() - started)

    def wait_for(self, job_id: str, proc: subprocess.Popen, ready, timeout: float = 300) -> None:
        """Poll the job record until `ready(job)` (a record being rewritten is skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended early:\n{self.output(job_id)[-3000:]}"
            try:
                if ready(self.job(job_id)):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting:\n{self.output(job_id)[-3000:]}")

    def wait_for_output(self, job_id: str, proc: subprocess.Popen, text: str) -> None:
        self.wait_for(job_id, proc, lambda _job: text in self.output(job_id))

    def press_stop(self, job_id: str, proc: subprocess.Popen) -> tuple[int, int, float]:
        """The app's Stop: STOPPING, then SIGTERM to the tree and SIGKILL 3 s later.
        (the exit status, how many processes were still alive for the SIGKILL, seconds
        from the SIGTERM until the tree had ended)."""
        self.stop(job_id)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        sent = time.monotonic()
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=KILL_AFTER_S)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        returncode = proc.wait(timeout=30)
        return returncode, len(alive), time.monotonic() - sent
