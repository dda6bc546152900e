"""The llada and dream methods train end to end through main.py on the official-format fixtures."""

from __future__ import annotations

import pytest
from helpers import run_pairs_job


def nll_curve(summary: dict) -> list[float]:
    return [h["nll"] for h in summary["log_history"] if "nll" in h and "loss" in h]


@pytest.mark.parametrize("fixture", ["tiny-llada", "tiny-dream"])
def test_fixture_trains_and_loss_falls(tmp_path, fixture):
    summary = run_pairs_job(tmp_path, fixture)
    assert summary["method"] == ("llada" if fixture == "tiny-llada" else "dream")
    nll = nll_curve(summary)
    assert sum(nll[-3:]) / 3 < 0.6 * sum(nll[:2]) / 2, nll
    assert summary["status"] == "complete" and summary["output_kind"] == "full_model"


def test_dream_lora_with_scheduler_weights(tmp_path):
    summary = run_pairs_job(
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


@pytest.mark.parametrize("fixture", ["tiny-llada", "tiny-dream"])
def test_packed_lora_trains(tmp_path, fixture):
    """Packing through the whole job, on a peft-wrapped model."""
    summary = run_pairs_job(
        tmp_path, fixture, lora=True, lora_r=8, lora_alpha=16, train_steps=6, packing=True,
        timestep_sampling="stratified", complementary_masking=True,
    )  # fmt: skip
    assert summary["output_kind"] == "lora_adaptor" and summary["global_step"] == 6
