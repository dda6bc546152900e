"""Checkpoints and resume: a run killed with SIGKILL and resumed ends with the weights of
an uninterrupted run; SIGTERM/SIGINT stop at the next step with a checkpoint; only
complete checkpoints are resumed from.

Full fine-tuning (lora false) of the 2-layer BERT, stand-alone through main.py in
subprocesses (a kill needs a process of its own).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_tlab.runner import REPO, quiet_env
from helpers import write_rows

from dllm_plugin.checkpoints import checkpoint_step, latest_checkpoint
from dllm_plugin.training_args import resolve_resume

ROWS = [
    {"prompt": f"Name a colour, number {i}.", "completion": c}
    for i, c in enumerate(["Red.", "Blue.", "Green.", "White.", "Black.", "Pink.", "Grey."])
]  # 7 rows, batch 2: 4 batches an epoch, so 8 steps cross epoch boundaries

# Each optimizer step sleeps, so the test can act between two steps.
SLOW_MAIN = """
import sys, time
import transformers
step = transformers.Trainer.training_step
def slow_step(self, *args, **kwargs):
    time.sleep(0.4)
    return step(self, *args, **kwargs)
transformers.Trainer.training_step = slow_step
sys.path.insert(0, sys.argv[1])
sys.argv = ["main.py", *sys.argv[2:]]
import main
main.main()
"""


def write_job(folder: Path, model: Path, out: Path, **overrides) -> Path:
    data = write_rows(folder / "colours.jsonl", ROWS)
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "bert",
        "train_device": "cpu",
        "dtype": "float32",
        "batch_size": 2,
        "max_length": 32,
        "train_steps": 8,
        "learning_rate": 1e-3,
        "learning_rate_schedule": "cosine",
        "warmup_ratio": 0.1,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_steps": 2,
        "save_total_limit": 2,
        "num_preview_samples": 0,
        "log_to_wandb": False,
        "lora": False,
        "seed": 7,
        "adaptor_name": "colours",
        "output_dir": str(out),
        **overrides,
    }
    job = folder / f"job-{len(list(folder.glob('job-*.json')))}.json"
    job.write_text(json.dumps({"config": config}))
    return job


def run_main(job: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--input_file", str(job)],
        cwd=cwd,
        env=quiet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def start_slow(job: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_MAIN, str(REPO), "--input_file", str(job)],
        cwd=cwd,
        env=quiet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 240) -> Path:
    """The first complete checkpoint, polled while the run is going."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = latest_checkpoint(out)
        if found is not None:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before any checkpoint:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint in time")


def final_weights(out: Path, model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "models" / f"{model.name}_colours" / "model.safetensors")


PACKED = {"packing": True, "timestep_sampling": "stratified", "complementary_masking": True}


@pytest.mark.parametrize(
    ("model", "options"),
    [("tiny_bert_dir", {}), ("minilm_path", {}), ("tiny_bert_dir", PACKED)],
    ids=["tiny-bert", "minilm", "tiny-bert-packed"],
)
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, request, model, options):
    """Also on MiniLM, whose checkpoint lacks the MLM head (initialised from the seed) and
    which has dropout; and packed, with stratified timesteps and complementary masks."""
    tiny_bert_dir = request.getfixturevalue(model)
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    straight = run_main(write_job(tmp_path, tiny_bert_dir, straight_out, **options), tmp_path)
    assert straight.returncode == 0, straight.stdout[-3000:]

    job = write_job(tmp_path, tiny_bert_dir, killed_out, resume_from_checkpoint="auto", **options)
    proc = start_slow(job, tmp_path)
    first = wait_for_checkpoint(proc, killed_out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    steps = [checkpoint_step(p) for p in killed_out.glob("checkpoint-*")]
    assert first.name == "checkpoint-2" and max(s or 0 for s in steps) < 8, steps
    assert not (killed_out / "models").exists()

    resumed = run_main(job, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    resumed_from = re.search(r"resuming from \S+/checkpoint-(\d+)", resumed.stdout)
    assert resumed_from, resumed.stdout[-3000:]
    start = int(resumed_from.group(1))
    assert 2 <= start < 8
    assert resumed.stdout.count("{'loss': ") == 8 - start  # only the remaining steps ran
    summary = json.loads((killed_out / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 8

    expected, got = (
        final_weights(straight_out, tiny_bert_dir),
        final_weights(killed_out, tiny_bert_dir),
    )
    assert expected.keys() == got.keys()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_the_next_step_with_a_checkpoint(tmp_path, tiny_bert_dir, sig):
    out = tmp_path / "out"
    proc = start_slow(write_job(tmp_path, tiny_bert_dir, out, save_steps=100), tmp_path)
    # No scheduled checkpoint before step 8: wait for the first logged step instead.
    deadline = time.monotonic() + 240
    while not list(out.glob("tensorboard/*/events.out.tfevents.*")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not start:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    time.sleep(0.5)  # inside the step loop
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "stopped" and 0 < summary["global_step"] < 8
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint_step(checkpoint) == summary["global_step"]
    assert (checkpoint / "optimizer.pt").is_file() and list(checkpoint.glob("rng_state*.pth"))
    assert not (out / "models").exists()
    assert "resume with resume_from_checkpoint=auto" in output


# ---- which checkpoint counts ----------------------------------------------------------
def fake_checkpoint(out: Path, step: int, state: str | None = None, mtime: float = 0) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
        if mtime:
            os.utime(folder / "trainer_state.json", (mtime, mtime))
    return folder


def test_latest_checkpoint_takes_the_newest_complete_one(tmp_path):
    now = time.time()
    fake_checkpoint(tmp_path, 2, json.dumps({"global_step": 2}), now - 30)
    newest = fake_checkpoint(tmp_path, 4, json.dumps({"global_step": 4}), now - 20)
    fake_checkpoint(tmp_path, 6)  # killed before trainer_state.json
    fake_checkpoint(tmp_path, 8, '{"global_step": 8, "log_hi')  # killed while writing it
    fake_checkpoint(tmp_path, 10, json.dumps({"global_step": 3}))  # not its own state
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == newest


def test_latest_checkpoint_prefers_the_most_recent_job_over_a_higher_step(tmp_path):
    """Jobs of one template share output_dir: an older job's checkpoint-500 must not win."""
    now = time.time()
    fake_checkpoint(tmp_path, 500, json.dumps({"global_step": 500}), now - 3600)
    mine = fake_checkpoint(tmp_path, 100, json.dumps({"global_step": 100}), now)
    assert latest_checkpoint(tmp_path) == mine


def test_resolve_resume_values(tmp_path):
    folder = fake_checkpoint(tmp_path / "out", 2, json.dumps({"global_step": 2}))
    assert resolve_resume("off", tmp_path / "out") is None
    assert resolve_resume("auto", tmp_path / "empty") is None
    assert resolve_resume("auto", tmp_path / "out") == str(folder)
    assert resolve_resume(str(folder), tmp_path / "elsewhere") == str(folder)
    assert resolve_resume(str(tmp_path / "out"), tmp_path / "elsewhere") == str(folder)
