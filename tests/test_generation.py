"""After training: previews, memorisation, the generate command, merged adaptors."""

from __future__ import annotations

import pytest
import torch
from helpers import PAIRS, run_pairs_job

from dllm_plugin import generate


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    return run_pairs_job(
        tmp_path_factory.mktemp("memorise"),
        "tiny-llada",
        train_steps=250,
        max_length=48,
        logging_steps=50,
        save_steps=1.0,
        eval_split_ratio=0.0,
        num_preview_samples=4,
        preview_max_new_tokens=8,
    )


def test_memorised_pairs_are_generated_exactly(memorised):
    samples = memorised["samples"]
    assert [s["reference"] for s in samples] == [c for _, c in PAIRS]
    assert [s["generated"] for s in samples] == [c for _, c in PAIRS]
    assert all(s["before_training"] != s["reference"] for s in samples)


def test_generate_command_on_the_trained_model(memorised, capsys):
    argv = [
        "--model",
        memorised["output_path"],
        "--prompt",
        "sky?",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]
    assert generate.main(argv) == 0
    assert capsys.readouterr().out.strip() == "blue"
    assert (
        generate.main(
            [
                *argv[:-4],
                "--max-new-tokens",
                "8",
                "--block-size",
                "4",
                "--steps",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "blue"


def test_generate_command_reports_errors(tmp_path, capsys):
    assert (
        generate.main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--device", "cpu"]) == 1
    )
    assert capsys.readouterr().err.startswith("error: ")


def test_merged_adaptor_equals_base_plus_adaptor(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    summary = run_pairs_job(
        tmp_path,
        "tiny-dream",
        lora=True,
        lora_r=8,
        lora_alpha=16,
        train_steps=5,
        merge_adaptor=True,
        max_length=96,
        num_preview_samples=0,
        learning_rate=1e-2,
    )
    merged_dir = summary["merged_model_path"]
    assert merged_dir.endswith("tiny-dream_pairs_merged")
    ids = torch.randint(0, 90, (2, 10))
    base = AutoModelForMaskedLM.from_pretrained(tmp_path / "tiny-dream")
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = (
            PeftModel.from_pretrained(base, summary["output_path"]).eval()(input_ids=ids).logits
        )
        merged = AutoModelForMaskedLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adaptor changed something
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert (
        generate.main(
            [
                "--model",
                str(tmp_path / "tiny-dream"),
                "--adaptor",
                summary["output_path"],
                "--prompt",
                "hi",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
