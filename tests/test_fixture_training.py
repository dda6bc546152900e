"""The llada and dream methods train end to end through main.py on the official-format fixtures."""

from __future__ import annotations

import json

import pytest
from conftest import fixture_model_dir, write_rows

from dllm_plugin.cli import main as cli_main

PAIRS = [("hi", "hello"), ("sky?", "blue"), ("1+1?", "two"), ("cat?", "meow")]


def run_fixture_job(tmp_path, fixture: str, **overrides) -> dict:
    model = fixture_model_dir(fixture, tmp_path / fixture)
    data = write_rows(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "auto",
        "train_device": "cpu",
        "dtype": "float32",
        "batch_size": 4,
        "learning_rate": 3e-3,
        "learning_rate_schedule": "constant",
        "warmup_ratio": 0.0,
        "train_steps": 60,
        "max_length": 64,
        "logging_steps": 5,
        "eval_strategy": "no",
        "save_steps": 0.5,
        "log_to_wandb": False,
        "num_preview_samples": 0,
        "output_dir": str(tmp_path / "out"),
        **overrides,
    }
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": config}))
    assert cli_main(["--input_file", str(job)]) == 0
    return json.loads((tmp_path / "out" / "run_summary.json").read_text())


def nll_curve(summary: dict) -> list[float]:
    return [h["nll"] for h in summary["log_history"] if "nll" in h and "loss" in h]


@pytest.mark.parametrize("fixture", ["tiny-llada", "tiny-dream"])
def test_fixture_trains_and_loss_falls(tmp_path, fixture):
    summary = run_fixture_job(tmp_path, fixture)
    assert summary["method"] == ("llada" if fixture == "tiny-llada" else "dream")
    nll = nll_curve(summary)
    assert sum(nll[-3:]) / 3 < 0.6 * sum(nll[:2]) / 2, nll
    assert summary["status"] == "complete" and summary["output_kind"] == "full_model"


def test_dream_lora_with_scheduler_weights(tmp_path):
    summary = run_fixture_job(
        tmp_path,
        "tiny-dream",
        lora=True,
        lora_r=8,
        lora_alpha=16,
        train_steps=6,
        loss_weight_type="scheduler",
        perbatch_cutoff=False,
        resp_cutoff_ratio=0.5,
    )
    assert summary["output_kind"] == "lora_adaptor" and summary["global_step"] == 6
