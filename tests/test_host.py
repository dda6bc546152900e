"""Inside Transformer Lab: the plugin under a fake host (harness + SDK + job store) in a
subprocess, as the host runs it; and PluginHost alone with an old-style SDK
whose job methods are plain functions."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from fake_tlab.runner import host_config, install_dataset, quiet_env, run_in_host

from dllm_plugin.callbacks import HostCallback, StopSignals
from dllm_plugin.config import build_job_config
from dllm_plugin.hosts import Host, detect_host
from dllm_plugin.hosts.plugin import PluginHost, metric_name

ROWS = [
    {"prompt": f"What is {a} plus {b}?", "completion": f"{a + b}."}
    for a in range(4)
    for b in range(4)
]
TINY = dict(
    training_method="bert",
    train_device="cpu",
    dtype="float32",
    batch_size="2",
    max_length="32",
    train_steps="8",
    learning_rate="0.001",
    learning_rate_schedule="constant",
    warmup_ratio="0",
    logging_steps="1",
    eval_strategy="no",
    save_steps="100",
    num_preview_samples="0",
    log_to_wandb="false",
    lora="false",
    adaptor_name="sums",
    dataset_name="sums",
)  # strings, as the host's saved forms hold them


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "workspace"
    install_dataset(ws, "sums", ROWS)
    return ws


def progress_values(run) -> list[int]:
    return [c["value"] for c in run.calls("progress_update")]


# ---- the plugin in the (fake) host ----------------------------------------------------
def test_full_run_reports_progress_metrics_and_registers_the_model(workspace, tiny_bert_dir):
    config = host_config(
        workspace,
        "1",
        "sums-template",
        model_name=str(tiny_bert_dir),
        **{**TINY, "eval_strategy": "steps", "eval_steps": "4", "eval_split_ratio": "0.25"},
    )
    run = run_in_host(workspace, config)
    assert run.returncode == 0, run.output[-3000:]
    assert run.status_at_exit == "RUNNING" and run.job["status"] == "COMPLETE"
    assert not run.calls("update_status")  # success: the host itself marks COMPLETE

    values = progress_values(run)
    assert values[0] == 0 and values[-1] == 100 and values == sorted(values)
    assert len(set(values)) >= 8  # every step moved the bar (8 steps)
    data = run.job_data
    assert data["completion_status"] == "success"
    assert data["completion_details"].startswith("training finished: 8 steps")
    assert {"start_time", "end_time", "estimated_time_remaining"} <= set(data)
    assert data["tensorboard_output_dir"] == config["output_dir"]
    assert math.isfinite(data["metrics"]["loss"]) and math.isfinite(data["metrics"]["eval/loss"])
    assert run.calls("load_dataset") == [{"call": "load_dataset", "dataset_name": "sums"}]

    out = Path(config["output_dir"])
    assert list(out.glob("tensorboard/*/events.out.tfevents.*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert "eval/loss" in metrics
    # the held-out ELBO and answer accuracy reach the host's metrics (the host's names)
    assert math.isfinite(metrics["eval/nll_bound"]) and metrics["eval/nll_bound_se"] > 0
    assert 0 <= data["metrics"]["eval/exact_match"] <= 1
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"

    name = f"{tiny_bert_dir.name}_sums"
    model_dir = workspace / "models" / name
    assert data["output_path"] == str(model_dir)
    record = json.loads((model_dir / "index.json").read_text())
    assert record["model_id"] == f"TransformerLab/{name}" and record["local_model"] is True
    assert record["json_data"]["architecture"] == "BertForMaskedLM"
    assert "diffusion SFT" in record["json_data"]["description"]
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    provenance = json.loads((model_dir / "_tlab_provenance.json").read_text())
    assert provenance["dataset"] == "sums" and provenance["md5_checksums"]
    assert sorted(p.name for p in (workspace / "models").iterdir()) == [name]  # no temp leftovers


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (
            {"input_template": "{{ missing_column }}", "output_template": "{{ completion }}"},
            "row 0: input_template uses a column or attribute that is missing",
        ),
        ({"batch_size": "many"}, "batch_size: 'many' is not allowed"),
    ],
    ids=["bad-template-column", "bad-config"],
)
def test_failure_is_marked_failed_with_its_reason(workspace, tiny_bert_dir, overrides, reason):
    config = host_config(
        workspace, "2", "t", model_name=str(tiny_bert_dir), **{**TINY, **overrides}
    )
    run = run_in_host(workspace, config)
    assert run.returncode != 0
    assert run.status_at_exit == "FAILED" and run.job["status"] == "FAILED"
    data = run.job_data
    assert data["completion_status"] == "failed" and reason in data["completion_details"]
    assert run.last_line.startswith("FAILED: ") and reason.split(":")[0] in run.last_line
    assert not (workspace / "models").exists()


def test_stop_request_checkpoints_and_a_new_job_resumes(workspace, tiny_bert_dir):
    config = host_config(workspace, "3", "t", model_name=str(tiny_bert_dir), **TINY)
    stopped = run_in_host(workspace, config, env=quiet_env(FAKE_TLAB_STOP_AT_PROGRESS="50"))
    assert stopped.returncode == 0, stopped.output[-3000:]
    assert stopped.status_at_exit == "STOPPED" and stopped.job["status"] == "STOPPED"
    assert max(progress_values(stopped)) == 50  # stopped at step 4 of 8
    checkpoint = Path(config["output_dir"]) / "checkpoint-4"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4
    assert stopped.job_data["checkpoint"] == str(checkpoint)
    assert stopped.job_data["completion_status"] == "stopped"
    assert "resume_from_checkpoint=auto" in stopped.job_data["completion_details"]
    assert not (workspace / "models").exists()

    again = host_config(
        workspace,
        "4",
        "t",
        model_name=str(tiny_bert_dir),
        **{**TINY, "resume_from_checkpoint": "auto"},
    )
    resumed = run_in_host(workspace, again)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resuming from {checkpoint}" in resumed.output
    assert (
        resumed.job["status"] == "COMPLETE" and resumed.job_data["completion_status"] == "success"
    )
    assert resumed.job_data["completion_details"].startswith("training finished: 8 steps")
    values = progress_values(resumed)
    assert values == sorted(values) and values[1] == 62  # continued from 50 %, not from 0


@pytest.mark.parametrize("users_dir", [True, False], ids=["WANDB_DIR-set", "WANDB_DIR-unset"])
def test_wandb_without_api_key_warns_once_and_finishes_offline(
    workspace, tiny_bert_dir, tmp_path, users_dir
):
    """No key, no WANDB_MODE, no netrc: offline W&B, no network; files under the user's
    WANDB_DIR, else under output_dir (never the host's working directory)."""
    home, wandb_dir = tmp_path / "home", tmp_path / "wandb"
    home.mkdir()
    wandb_dir.mkdir()
    server, connections = _listener()
    env = quiet_env(
        WANDB_MODE=None,
        WANDB_API_KEY=None,
        NETRC=None,
        WANDB_DISABLED=None,
        HOME=str(home),
        WANDB_DIR=str(wandb_dir) if users_dir else None,
        WANDB_CONFIG_DIR=None,
        WANDB_CACHE_DIR=None,
        WANDB_BASE_URL=f"http://127.0.0.1:{server.getsockname()[1]}",
    )
    config = host_config(
        workspace,
        "5",
        "t",
        model_name=str(tiny_bert_dir),
        **{**TINY, "log_to_wandb": "true", "train_steps": "3"},
    )
    try:
        run = run_in_host(workspace, config, env=env)
    finally:
        server.close()
    assert run.returncode == 0, run.output[-3000:]
    assert run.job["status"] == "COMPLETE" and run.job_data["completion_status"] == "success"
    warnings = [line for line in run.output.splitlines() if "log_to_wandb:" in line]
    assert len(warnings) == 1 and "no W&B API key" in warnings[0]
    expected = wandb_dir if users_dir else Path(config["output_dir"])
    assert list(expected.glob("wandb/offline-run-*")), sorted(p.name for p in tmp_path.rglob("*"))
    assert not list((workspace.parent / "host_api").glob("wandb")), "W&B wrote into the cwd"
    assert connections == [], "offline W&B contacted the W&B server"


def _listener() -> tuple[socket.socket, list[Any]]:
    """A local 'W&B server' that records every connection made to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connections: list[Any] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connections.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return server, connections


# ---- PluginHost with an old-style (synchronous) SDK --------------------------
class OldJob:
    """lab.Job before it went async: plain methods."""

    def __init__(self) -> None:
        self.status, self.progress, self.data = "RUNNING", 0, {}
        self.should_stop = False

    def update_status(self, status: str) -> None:
        self.status = status

    def update_progress(self, progress: int) -> None:
        self.progress = progress

    def get_job_data(self) -> dict[str, Any]:
        return self.data


class OldSDK:
    def __init__(self) -> None:
        self.job = OldJob()
        self.params: dict[str, Any] = {}
        self.sent: list[int] = []
        self.datasets_loaded: list[str] = []

    def progress_update(self, progress: int) -> None:
        self.sent.append(progress)
        self.job.update_progress(progress)
        if self.job.data.get("stop"):
            self.job.update_status("STOPPED")
            raise KeyboardInterrupt("Job stopped by user")

    def add_job_data(self, key: str, value: Any) -> None:
        json.dumps(value, allow_nan=False)  # the host's UI cannot read NaN
        self.job.data[key] = value

    def load_dataset(self, dataset_types: list[str]) -> dict[str, Any]:
        import datasets

        self.datasets_loaded.append(self.params["dataset_name"])
        return {"train": datasets.Dataset.from_list(ROWS)}


def test_progress_is_monotonic_throttled_and_a_stop_becomes_a_flag(tmp_path):
    sdk = OldSDK()
    host = PluginHost(sdk=sdk, workspace=tmp_path)
    for percent in (0, 0.2, 0.4, 1.0, 0.5, 2.0):
        host.progress(percent, eta_seconds=12.3)
    assert sdk.sent == [0, 1, 2]  # a repeat waits for the throttle interval; never back
    assert sdk.job.data["estimated_time_remaining"] == 12
    assert not host.should_stop()
    sdk.job.data["stop"] = True
    host.progress(3.0)  # the SDK raises KeyboardInterrupt: it must not escape
    assert host.should_stop() and sdk.job.status == "STOPPED"


def test_fail_and_stop_and_metrics_reach_the_job(tmp_path):
    sdk = OldSDK()
    host = PluginHost(sdk=sdk, workspace=tmp_path)
    host.metrics({"loss": 1.5, "eval_loss": float("nan"), "learning_rate": 1e-3}, step=3)
    assert sdk.job.data["metrics"] == {
        "loss": 1.5,
        "eval/loss": None,
        "learning_rate": 1e-3,
        "step": 3,
    }
    host.stopped({"global_step": 4, "checkpoint": "/x/checkpoint-4"})
    assert sdk.job.status == "STOPPED" and sdk.job.data["checkpoint"] == "/x/checkpoint-4"
    host.fail("ValueError: boom\nmore lines")
    assert sdk.job.status == "FAILED"
    assert sdk.job.data["completion_status"] == "failed"
    assert sdk.job.data["completion_details"] == "ValueError: boom\nmore lines"


def test_host_dataset_through_the_sdk_local_paths_ourselves(tmp_path):
    sdk = OldSDK()
    host = PluginHost(sdk=sdk, workspace=tmp_path)
    install_dataset(tmp_path, "sums", ROWS)
    local = tmp_path / "local.jsonl"
    local.write_text(json.dumps(ROWS[0]) + "\n")
    cfg = build_job_config({"dataset_name": "sums", "model_name": "m"})
    loaded = host.load_dataset(cfg)
    assert sdk.datasets_loaded == ["sums"] and len(loaded["train"]) == len(ROWS)
    assert (
        host.load_dataset(build_job_config({"dataset_name": str(local), "model_name": "m"})) is None
    )
    assert (
        host.load_dataset(build_job_config({"dataset_name": "org/hub", "model_name": "m"})) is None
    )
    assert host.models_dir() == tmp_path / "models"


def test_stand_alone_outside_the_host():
    assert type(detect_host()) is Host
    assert metric_name("eval_loss") == "eval/loss" and metric_name("loss") == "loss"


class StopHost(Host):
    def should_stop(self) -> bool:
        return True


def test_host_stop_request_saves_and_stops_at_the_step():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    stop = StopSignals()
    callback = HostCallback(StopHost(), stop)
    state, control = TrainerState(max_steps=10, global_step=3), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to=[])
    callback.on_train_begin(args, state, control)
    callback.on_step_end(args, state, control)
    assert stop.requested and control.should_training_stop and control.should_save


def test_each_in_process_job_gets_its_own_tensorboard_folder(tmp_path, monkeypatch):
    from dllm_plugin import trackers, training_args

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "recorded")  # so that teardown removes it
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    monkeypatch.setattr(trackers, "_SET_BY_US", {})
    for name in ("first", "second"):
        cfg = build_job_config({"output_dir": str(tmp_path / name)})
        training_args.use_tensorboard_dir(cfg)
        assert Path(os.environ["TENSORBOARD_LOGGING_DIR"]).parent.parent == tmp_path / name
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "mine"))  # the user's choice wins
    training_args.use_tensorboard_dir(build_job_config({"output_dir": str(tmp_path / "third")}))
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "mine")
