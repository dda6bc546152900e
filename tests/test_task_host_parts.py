"""The task host's parts that need no SDK: rank 0's channel to the launcher, the app's
registry layout, the score, signals held back around job-file writes, and the stop
rule of a host that allows only seconds."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from dllm_plugin import signals
from dllm_plugin.callbacks import HostCallback, StopSignals
from dllm_plugin.hosts import ChannelHost, EventReader, Host, channel_environment
from dllm_plugin.hosts.channel import CHANNEL_ENV, channel_from_environment
from dllm_plugin.hosts.task import registry_dataset, registry_model, run_score, unwrap_parameter


class Recorder(Host):
    """The launcher's host, recording what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def progress(self, percent: float, eta_seconds: float | None = None) -> None:
        self.calls.append(("progress", (percent, eta_seconds)))

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.calls.append(("metrics", (values, step)))

    def log(self, message: str) -> None:
        self.calls.append(("log", (message,)))

    def checkpoint_saved(self, path: Path) -> None:
        self.calls.append(("checkpoint_saved", (path,)))

    def output_saved(self, folder: Path, kind: str, architecture: str, base_model: str) -> None:
        self.calls.append(("output_saved", (folder, kind, architecture, base_model)))

    def complete(self, summary: dict[str, Any]) -> None:
        self.calls.append(("complete", (summary,)))


# ---- the channel -----------------------------------------------------------------------
def test_rank_zeros_reports_reach_the_launchers_host_in_order(tmp_path):
    events = tmp_path / "events.jsonl"
    rank0 = ChannelHost(events, stop_grace_s=2.0)
    launcher, reader = Recorder(), EventReader(events)
    reader.replay(launcher)  # nothing written yet
    rank0.progress(12.5, 30.0)
    rank0.metrics({"loss": 1.5, "eval_loss": float("nan")}, 3)
    rank0.log("a line")
    rank0.checkpoint_saved(tmp_path / "checkpoint-3")
    reader.replay(launcher)
    rank0.output_saved(tmp_path / "model", "model", "BertForMaskedLM", "org/base")
    rank0.complete({"status": "complete", "global_step": 3})
    reader.replay(launcher)
    assert launcher.calls == [
        ("progress", (12.5, 30.0)),
        ("metrics", ({"loss": 1.5, "eval_loss": None}, 3)),  # NaN: the job file stays JSON
        ("log", ("a line",)),
        ("checkpoint_saved", (tmp_path / "checkpoint-3",)),
        ("output_saved", (tmp_path / "model", "model", "BertForMaskedLM", "org/base")),
    ]
    assert reader.final == ("complete", {"status": "complete", "global_step": 3})  # held
    reader.replay(launcher)
    assert len(launcher.calls) == 5  # each event once


def test_half_a_line_waits_for_its_end(tmp_path):
    events = tmp_path / "events.jsonl"
    launcher, reader = Recorder(), EventReader(events)
    line = json.dumps({"call": "log", "args": ["whole"]}) + "\n"
    events.write_text(line[:10])
    reader.replay(launcher)
    assert launcher.calls == []
    with open(events, "a") as f:
        f.write(line[10:])
    reader.replay(launcher)
    assert launcher.calls == [("log", ("whole",))]


def test_the_launched_processes_find_the_channel_and_the_stop_rule(tmp_path, monkeypatch):
    class Strict(Host):
        name, stop_grace_s = "strict", 2.0

    env = channel_environment(tmp_path / "events.jsonl", Strict())
    monkeypatch.setenv(CHANNEL_ENV, env[CHANNEL_ENV])
    host = channel_from_environment()
    assert isinstance(host, ChannelHost) and host.stop_grace_s == 2.0
    assert host.events == tmp_path / "events.jsonl"
    monkeypatch.delenv(CHANNEL_ENV)
    assert channel_from_environment() is None


# ---- the app's registry and values ---------------------------------------------------------
def test_registry_models_by_the_apps_layout(tmp_path):
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "config.json").write_text("{}")
    (models / "group" / "v1").mkdir(parents=True)
    (models / "group" / "v1" / "config.json").write_text("{}")
    (models / "org_hub-model").mkdir()
    record = {"model_id": "org/hub-model", "json_data": {"huggingface_repo": "org/hub-model"}}
    (models / "org_hub-model" / "index.json").write_text(json.dumps(record))
    assert registry_model(models, "TransformerLab/tiny") == str(models / "tiny")
    assert registry_model(models, "group/v1") == str(models / "group" / "v1")
    assert registry_model(models, "org/hub-model") == "org/hub-model"  # weights in the HF cache
    assert registry_model(models, "org/elsewhere") is None


def test_registry_datasets_local_or_from_the_hub(tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "mine").mkdir(parents=True)
    (datasets / "mine" / "index.json").write_text(json.dumps({"location": "local"}))
    (datasets / "org_data").mkdir()
    hub = {
        "location": "huggingfacehub",
        "json_data": {"huggingfacerepo": "org/data", "config_name": "en"},
    }
    (datasets / "org_data" / "index.json").write_text(json.dumps(hub))
    assert registry_dataset(datasets, "mine") == (str(datasets / "mine"), None)
    assert registry_dataset(datasets, "org/data") == ("org/data", "en")
    assert registry_dataset(datasets, "unknown") is None


def test_values_as_the_app_sends_them_and_the_score():
    assert unwrap_parameter({"type": "integer", "default": 4, "min": 1}) == 4
    assert unwrap_parameter("4") == "4" and unwrap_parameter({"free": "dict"}) == {"free": "dict"}
    summary = {
        "global_step": 8,
        "train_loss": 2.0,
        "eval_loss": 1.5,
        "metrics": {"eval_loss": 1.5, "eval_nll": 1.2, "epoch": 1.0, "note": "x", "bad": math.inf},
    }
    assert run_score(summary) == {
        "eval/loss": 1.5,
        "eval/nll": 1.2,
        "epoch": 1.0,
        "train/loss": 2.0,
        "steps": 8,
    }


# ---- signals -----------------------------------------------------------------------------
def test_signals_wait_for_the_end_of_a_job_file_write():
    seen: list[int] = []
    with signals.handling(lambda signum, _frame: seen.append(signum)):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []  # the write is not interrupted
        assert seen == [signal.SIGTERM]  # delivered after, once
    assert signals.first_stop_at() is not None


# ---- the stop rule -------------------------------------------------------------------------
class Grace(Recorder):
    stop_grace_s = 2.0


@pytest.mark.parametrize("host, saves", [(Recorder(), True), (Grace(), False)])
def test_a_stop_checkpoints_unless_the_host_allows_only_seconds(host, saves):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    stop = StopSignals()
    callback = HostCallback(host, stop)
    state, control = TrainerState(max_steps=10, global_step=3), TrainerControl()
    args = TrainingArguments(output_dir="out", report_to=[])
    callback.on_train_begin(args, state, control)
    stop.request("SIGTERM")
    callback.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save is saves
    callback.on_save(args, state, control)
    assert host.calls[-1] == ("checkpoint_saved", (Path("out") / "checkpoint-3",))
