"""Real multi-process CPU runs through main.py (two gloo ranks under accelerate launch).

The layout guarantee on real data: demo rows of varied lengths (so micro-batches have
different widths) and a model with dropout 0.1 give the same losses with 2 processes x
GA 1 as with 1 process x GA 2, padded, and packed with stratified timesteps and
complementary masking.

Slow by nature (each process imports torch and transformers: about 30-60 s per run on a
small machine), so the runs are shared: one 2-process run (by the plugin-era host's
harness, with the host's own older packages after the venv on sys.path) and its 1-process
reference, the same packed, and two failing runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_tlab.runner import host_config, quiet_env, run_in_host

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
DEMO_ROWS = REPO / "dllm_plugin" / "demo" / "chat_demo.jsonl"
RUN_TIMEOUT_S = 420  # a hang fails the test instead of blocking the suite
STEPS = 6  # 16 rows, global batch 4: crosses into a second (reshuffled) epoch


def job_config(model: Path, data: Path, **params) -> dict:
    """Tiny model, few steps, no evaluation, previews or W&B."""
    return {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "bert",
        "train_device": "cpu",
        "num_processes": 2,
        "dtype": "float32",
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "train_steps": STEPS,
        "max_length": 64,
        "learning_rate": 1e-3,
        "learning_rate_schedule": "constant",
        "warmup_ratio": 0,
        "logging_steps": 1,
        "eval_strategy": "no",
        "eval_split_ratio": 0,
        "save_steps": 100,
        "num_preview_samples": 0,
        "log_to_wandb": False,
        "num_proc": 1,
        "seed": 7,
        **params,
    }


def write_job(folder: Path, model: Path, data: Path, **params) -> Path:
    """A job file (output_dir: `out` beside it)."""
    config = job_config(model, data, output_dir=str(folder / "out"), **params)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.json"
    path.write_text(json.dumps({"config": config}), encoding="utf-8")
    return path


def old_host_packages(folder: Path) -> Path:
    """A host's shared package folder holding an older transformers that cannot serve us
    (the plugin-era host pins transformers 4.57): importing it fails as that one does."""
    package = folder / "transformers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise ImportError(\"cannot import name 'initialization' from 'transformers' "
        f'({package / "__init__.py"})")\n'
    )
    return folder


def run_main(job: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python main.py --input_file job` in a clean environment (no inherited ranks)."""
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "DLLM_FAILURE_DIR", "TENSORBOARD_LOGGING_DIR"):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, str(MAIN), "--input_file", str(job), *extra],
        cwd=job.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def losses(summary_path: Path) -> dict[int, float]:
    history = json.loads(summary_path.read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """16 demo rows whose answers repeat 1 to 4 times: lengths from ~15 to ~50 tokens."""
    rows = [json.loads(line) for line in DEMO_ROWS.read_text().splitlines()[:16]]
    for i, row in enumerate(rows):
        row["output"] = " ".join([row["output"]] * (1 + i % 4))
    path = tmp_path_factory.mktemp("mp-data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_bert_dropout_session, data_file):
    """Two processes run by the plugin-era host's own harness (tests/fake_tlab), whose
    shared packages, with an older transformers, sit after the venv on its sys.path:
    both ranks must import what the parent imports (on PYTHONPATH that folder would come
    first in the children). The model has dropout 0.1, like real checkpoints."""
    folder = tmp_path_factory.mktemp("mp-two")
    workspace = folder / "workspace"
    config = host_config(workspace, "1", "mp", **job_config(tiny_bert_dropout_session, data_file))
    packages = old_host_packages(folder / "host-packages")
    run = run_in_host(
        workspace,
        config,
        env=quiet_env(FAKE_TLAB_HOST_PACKAGES=str(packages)),
        timeout=RUN_TIMEOUT_S,
    )
    return run, Path(config["output_dir"])


def test_the_rows_have_varied_lengths(data_file, minilm_tokenizer):
    """What makes the layout test real: micro-batches of different widths."""
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    lengths = {
        len(minilm_tokenizer(r["instruction"] + " " + r["input"] + " " + r["output"]).input_ids)
        for r in rows
    }
    assert len(lengths) >= 5 and max(lengths) < 64


def test_two_processes_train_and_rank_0_writes_outputs(two_process_run):
    run, out_dir = two_process_run
    assert run.returncode == 0, run.output[-6000:]
    assert "cannot import name" not in run.output
    out = run.output
    assert "launch plan:" in out and "processes     2" in out and "cpu (gloo)" in out
    assert "global batch  4 = batch_size 2 x 2 process(es)" in out
    assert "--experiment_name alpha" in out  # the harness's arguments reach the children
    assert run.job["status"] == "COMPLETE" and run.job_data["completion_status"] == "success"
    summary = json.loads((out_dir / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == STEPS
    # 6 steps of a global batch of 4 over 16 rows: both ranks consumed their shard.
    assert summary["metrics"]["epoch"] == pytest.approx(STEPS * 4 / 16)
    checkpoint = out_dir / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    models = [p for p in (run.workspace / "models").iterdir()]  # rank 0 registered it
    assert len(models) == 1 and (models[0] / "config.json").is_file()
    assert run.job_data["output_path"] == str(models[0])
    assert not list(out_dir.rglob("*.tmp-*"))


def assert_same_losses_on_one_process(two_out_dir, tmp_path, model, data_file, **params):
    """The 2-process run's losses equal those of 1 process x GA 2 (same global batch)."""
    job = write_job(
        tmp_path / "one", model, data_file, num_processes=1, gradient_accumulation_steps=2,
        **params,
    )  # fmt: skip
    single = run_main(job)
    assert single.returncode == 0, single.stdout[-4000:] + single.stderr[-4000:]
    assert "launch plan:" not in single.stdout  # one process trains in place
    two = losses(two_out_dir / "run_summary.json")
    one = losses(tmp_path / "one" / "out" / "run_summary.json")
    print(f"1 process x GA 2: {one}\n2 processes x GA 1: {two}")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert one[1] == pytest.approx(two[1], abs=1e-5)
    for step in range(2, STEPS + 1):
        assert one[step] == pytest.approx(two[step], rel=1e-3)


def test_loss_does_not_depend_on_process_count(
    two_process_run, tmp_path, tiny_bert_dropout_session, data_file
):
    """Same global batch (2 x 2 processes x GA 1 == 2 x 1 process x GA 2), same seed;
    varied widths, dropout on: the noise and the dropout are keyed by the global row."""
    run, out_dir = two_process_run
    assert run.returncode == 0, run.output[-4000:]
    assert_same_losses_on_one_process(out_dir, tmp_path, tiny_bert_dropout_session, data_file)


PACKED = {"packing": True, "timestep_sampling": "stratified", "complementary_masking": True}


def test_packed_loss_does_not_depend_on_process_count(
    tmp_path, tiny_bert_dropout_session, data_file
):
    """The same with packed rows, stratified timesteps and complementary masking."""
    folder = tmp_path / "two"
    job = write_job(
        folder, tiny_bert_dropout_session, data_file, num_processes=2, batch_size=1, **PACKED
    )
    proc = run_main(job)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "packing train: 16 examples" in proc.stdout + proc.stderr
    assert_same_losses_on_one_process(
        folder / "out", tmp_path, tiny_bert_dropout_session, data_file, batch_size=1, **PACKED
    )


def test_a2d_block_diffusion_loss_does_not_depend_on_process_count(tmp_path, data_file):
    """An a2d model (a tiny Qwen2 made bidirectional) trained with bd3lm on 2 processes:
    the block noise is keyed by the global row too."""
    from helpers import causal_lm_dir

    model = causal_lm_dir("qwen2", tmp_path / "qwen2")
    params = dict(training_method="a2d", diffusion_type="bd3lm", block_size=8, max_length=256)
    folder = tmp_path / "two"
    proc = run_main(write_job(folder, model, data_file, **params))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert_same_losses_on_one_process(folder / "out", tmp_path, model, data_file, **params)


def test_child_failure_fails_the_parent_with_the_childs_reason(
    tmp_path, tiny_bert_session, data_file
):
    """The dataset is only opened in the children: their reason must reach the parent."""
    missing = tmp_path / "no_such_rows.jsonl"
    job = write_job(tmp_path / "bad", tiny_bert_session, missing, num_processes=2)
    proc = run_main(job)
    assert proc.returncode != 0
    line = last_line(proc.stdout)
    assert line.startswith("FAILED: rank "), proc.stdout[-4000:]
    assert "dataset_name" in line and "no_such_rows.jsonl" in line and "does not exist" in line
    out = tmp_path / "bad" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["run_summary.json"]  # lock released
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "failed" and "no_such_rows.jsonl" in summary["reason"]


def test_a_child_that_dies_at_an_import_is_the_jobs_reason(
    tmp_path, tiny_bert_session, data_file, monkeypatch, capsys
):
    """The children get the parent's sys.path; one whose first folder holds a transformers
    that fails to import (the parent had already imported the real one) dies at start-up,
    before it can write its reason: the reason is its own exception line."""
    from dllm_plugin.cli import main as cli_main

    broken = old_host_packages(tmp_path / "broken")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "DLLM_FAILURE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "path", [str(broken), *sys.path])
    job = write_job(tmp_path / "bad", tiny_bert_session, data_file, num_processes=2)
    assert cli_main(["--input_file", str(job)]) == 1
    expected = (
        "ImportError: cannot import name 'initialization' from 'transformers' "
        f"({broken / 'transformers' / '__init__.py'})"
    )
    out = capsys.readouterr().out
    assert last_line(out) == f"FAILED: {expected}", out[-3000:]
    summary = json.loads((tmp_path / "bad" / "out" / "run_summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == expected
