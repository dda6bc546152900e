"""As a Transformer Lab task: the real `lab` SDK (PyPI transformerlab 0.1.46), the job
created as the app creates it, task.yaml's `run` under the SDK's own `tfl-remote-trap`,
and the app's Stop, status worker and resume emulated from its source (tlab_app/).

Every run is a subprocess: the SDK's top-level `lab` module never enters this process,
and never meets tests/fake_tlab's plugin-era `lab`. The runs are few: one complete
single-process job, one failing job, one single-process and one 2-process job stopped
mid-training (the second resumed from its checkpoint), and a stop during a step that
does not end.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from helpers import write_rows
from tlab_app.runner import HERE, TaskApp, launch_parameters

try:  # asked of the package metadata: `lab` itself is not imported here
    importlib.metadata.version("transformerlab")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "the task SDK is missing (pip install transformerlab==0.1.46)", allow_module_level=True
    )
if not (Path(sys.executable).parent / "tfl-remote-trap").exists():
    pytest.skip("tfl-remote-trap is not beside this Python", allow_module_level=True)

ROWS = [
    {"prompt": f"What is {a} plus {b}?", "completion": f"{a + b}."}
    for a in range(4)
    for b in range(4)
]
MODEL_ID = "TransformerLab/tiny-bert"  # a model the app lists (folder: models/tiny-bert)
DATASET_ID = "sums"
LONG = {"train_steps": "160", "save_steps": "20", "logging_steps": "10", "eval_strategy": "no"}
# As the app's CLI sends them: every value a string. Plus keys the app's form adds.
STRINGS = dict(
    model_name=MODEL_ID,
    dataset_name=DATASET_ID,
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
    eval_strategy="steps",
    eval_steps="4",
    eval_split_ratio="0.25",
    save_steps="4",
    num_preview_samples="0",
    log_to_wandb="false",
    num_proc="1",
    adaptor_name="sums",
)
EXTRA_KEYS = {"use_spot": False, "sweep_metric": "eval/loss", "resource_group_id": "g-1"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_bert_session) -> TaskApp:
    """A workspace whose registry holds the model and the dataset, and a team secret."""
    app = TaskApp(tmp_path_factory.mktemp("tlab"))
    model = app.workspace / "models" / "tiny-bert"
    shutil.copytree(tiny_bert_session, model)
    record = {"model_id": MODEL_ID, "name": "tiny-bert", "json_data": {"model_filename": "."}}
    (model / "index.json").write_text(json.dumps(record))
    data = app.workspace / "datasets" / DATASET_ID
    data.mkdir(parents=True)
    write_rows(data / "train.jsonl", ROWS)
    (data / "index.json").write_text(json.dumps({"dataset_id": DATASET_ID, "location": "local"}))
    (app.workspace / "team_secrets.json").write_text(json.dumps({"_HF_TOKEN": "hf_from_app"}))
    return app


def summary_of(app: TaskApp, job_id: str) -> dict:
    return json.loads((app.home_of(job_id) / "output" / "run_summary.json").read_text())


def test_a_job_completes_with_string_parameters_extra_keys_and_registry_names(app):
    job_id = app.create_job(launch_parameters({**STRINGS, **EXTRA_KEYS}))
    run = app.run(job_id)
    assert run.returncode == 0, run.output[-4000:]
    assert app.settle(job_id) == "COMPLETE"
    job = app.job(job_id)
    data = job["job_data"]
    assert job["status"] == "COMPLETE" and job["progress"] == 100
    assert data["live_status"] == "Remote command finished"
    assert data["completion_status"] == "success"
    assert data["completion_details"].startswith("training finished: 8 steps")

    # Strings coerced (as numbers: lr, batch size; as booleans: lora off = a full model),
    # extra keys ignored with one line, model and dataset found in the app's registry.
    summary = summary_of(app, job_id)
    assert {h["learning_rate"] for h in summary["log_history"] if "loss" in h} == {0.001}
    assert summary["metrics"]["epoch"] == pytest.approx(8 * 2 / 12)  # 16 rows, 4 held out
    log = app.task_log(job_id)
    ignored = [line for line in log if "ignoring config keys" in line]
    assert len(ignored) == 1 and all(key in ignored[0] for key in EXTRA_KEYS)
    registry = app.workspace / "models" / "tiny-bert"
    assert f"model_name {MODEL_ID!r}: the app's model {registry}" in "\n".join(log)
    assert "data: 12 train rows, 4 eval rows" in "\n".join(log)  # its index.json is no row
    assert "HF_TOKEN: from the app's secret _HF_TOKEN" in run.output

    # Metrics rows with step and metrics; the score holds what the run measured.
    rows = [r for r in app.metrics_rows(job_id) if "metrics" in r]
    assert [r["step"] for r in rows if "loss" in r["metrics"]] == list(range(1, 9))
    assert any("eval/loss" in r["metrics"] for r in rows)
    score = data["score"]
    for key in ("eval/loss", "train/loss", "eval/nll"):
        assert math.isfinite(score[key]), key
    assert score["steps"] == 8 and score["eval/loss"] == pytest.approx(
        summary_of(app, job_id)["eval_loss"]
    )

    # The model is saved, listed with the job, and its checkpoints registered.
    (model,) = data["models"]
    assert Path(model) == app.job_dir(job_id) / "models" / f"{job_id}_tiny-bert_sums"
    assert (Path(model) / "model.safetensors").is_file() and (Path(model) / "config.json").is_file()
    assert Path(data["latest_checkpoint"]).name == "checkpoint-8"
    assert sorted(p.name for p in (app.job_dir(job_id) / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    assert app.task_log(job_id)[-1].startswith("done: training finished: 8 steps")


def test_a_bad_template_fails_the_job_with_its_reason(app):
    bad = {
        **STRINGS,
        "input_template": "{{ missing_column }}",
        "output_template": "{{ completion }}",
    }
    job_id = app.create_job(launch_parameters(bad))
    run = app.run(job_id)
    assert run.returncode == 1
    assert app.settle(job_id) == "FAILED"
    job = app.job(job_id)
    data = job["job_data"]
    reason = "input_template uses a column or attribute that is missing"
    assert job["status"] == "FAILED" and data["completion_status"] == "failed"
    assert reason in data["error_msg"] and reason in data["completion_details"]
    assert data["live_status"] == "Remote command crashed"
    assert app.task_log(job_id)[-1] == f"FAILED: {data['error_msg']}"
    assert run.output.strip().splitlines()[-1] == f"FAILED: {data['error_msg']}"


def assert_stopped_with_the_newest_checkpoint(app: TaskApp, job_id: str, processes: int) -> Path:
    """STOPPED, the record whole, the newest periodic checkpoint registered; its path."""
    assert app.settle(job_id) == "STOPPED"
    job = app.job(job_id)  # parses: the record survived the app's writes and ours
    data = job["job_data"]
    assert data["live_status"] == "Remote command finished" and data["stop"] is True
    checkpoint = Path(data["latest_checkpoint"])
    step = int(checkpoint.name.split("-")[1])
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step and 20 <= step < 160
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == (
        [f"rng_state_{rank}.pth" for rank in range(processes)]
        if processes > 1
        else ["rng_state.pth"]
    )
    saved = sorted(
        (app.home_of(job_id) / "output").glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[1]),
    )
    assert saved[-1].name == checkpoint.name  # the newest one in output_dir, no newer
    stopped = summary_of(app, job_id)
    assert stopped["status"] == "stopped" and stopped["global_step"] >= step
    log = "\n".join(app.task_log(job_id))
    assert f"resumable checkpoint: the registered {checkpoint.name}" in log
    return checkpoint


def test_stop_of_a_single_process_job(app):
    """Stop mid-training (SIGTERM to the tree, SIGKILL 3 s later): exit status 0 in time."""
    job_id = app.create_job(launch_parameters({**STRINGS, **LONG}))
    proc = app.start(job_id)
    app.wait_for(job_id, proc, lambda job: job["job_data"].get("latest_checkpoint"))
    returncode, killed, seconds = app.press_stop(job_id, proc)
    output = app.output(job_id)
    assert returncode == 0, f"{killed} left for SIGKILL after {seconds:.1f} s\n{output[-4000:]}"
    assert_stopped_with_the_newest_checkpoint(app, job_id, processes=1)


def test_a_step_that_does_not_end_is_cut_by_the_watchdog(app):
    """A step longer than the app's 3 s (a large model): the process still exits with
    status 0 in time, with the summary saying stopped and the job STOPPED."""
    job_id = app.create_job(launch_parameters(STRINGS))
    proc = app.start(job_id, run=f"exec python {HERE / 'stuck_step.py'}")
    app.wait_for_output(job_id, proc, "training")
    returncode, killed, seconds = app.press_stop(job_id, proc)
    output = app.output(job_id)
    assert returncode == 0, f"{killed} left for SIGKILL after {seconds:.1f} s\n{output[-4000:]}"
    assert "stop requested" in output and "not reached" not in output
    assert app.settle(job_id) == "STOPPED"
    assert app.job(job_id)["job_data"]["live_status"] == "Remote command finished"
    summary = summary_of(app, job_id)
    assert summary["status"] == "stopped" and "before the step ended" in summary["reason"]
    assert any("did not end within 2 s" in line for line in app.task_log(job_id))


def test_stop_with_two_processes_then_the_resumed_job_continues(app):
    """The same with two training processes; the app's resumed job (also two) trains on
    from the registered checkpoint to the end."""
    job_id = app.create_job(launch_parameters({**STRINGS, **LONG, "num_processes": "2"}))
    proc = app.start(job_id)
    app.wait_for(job_id, proc, lambda job: job["job_data"].get("latest_checkpoint"))
    returncode, killed, seconds = app.press_stop(job_id, proc)
    output = app.output(job_id)
    assert returncode == 0, f"{killed} left for SIGKILL after {seconds:.1f} s\n{output[-4000:]}"
    checkpoint = assert_stopped_with_the_newest_checkpoint(app, job_id, processes=2)
    step = int(checkpoint.name.split("-")[1])

    resumed_id = app.resume(job_id, checkpoint.name)
    run = app.run(resumed_id)
    assert run.returncode == 0, run.output[-4000:]
    assert app.settle(resumed_id) == "COMPLETE"
    assert f"continuing from the parent job's checkpoint {checkpoint}" in run.output
    summary = summary_of(app, resumed_id)
    assert summary["status"] == "complete" and summary["global_step"] == 160
    rows = [r for r in app.metrics_rows(resumed_id) if "loss" in r.get("metrics", {})]
    assert rows[0]["step"] > step and rows[-1]["step"] == 160  # continued, not started over
    resumed = app.job(resumed_id)["job_data"]
    assert resumed["parent_job_id"] == job_id and len(resumed["models"]) == 1
    assert resumed["score"]["steps"] == 160
