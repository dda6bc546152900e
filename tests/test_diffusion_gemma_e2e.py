"""DiffusionGemma end to end through main.py: the held-out loss falls, saved models (full,
adaptor, merged) reload to the trained logits, generation answers the trained prompts,
a resumed run ends where an uninterrupted one does, and two processes train as one
process with gradient accumulation.

The model is the random 2-layer DiffusionGemma of helpers.py (canvas 8, vocabulary 128)
with a character tokenizer; the in-process runs use one torch thread (tiny matrices).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import PAIRS, tiny_diffusion_gemma_dir, write_rows
from test_multiprocess import losses, run_main

import dllm_plugin.run as run_module
from dllm_plugin import generate
from dllm_plugin.cli import main as cli_main

# Besides the four pairs to memorise, a rule that transfers to new prompts: "word X?" is
# answered "ok". The held-out split asks it for words the training rows never had.
RULE = [(f"word {w}?", "ok") for w in ("red", "tree", "milk", "song", "lamp", "fish")]
HELD_OUT = [(f"word {w}?", "ok") for w in ("door", "cake")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_diffusion_gemma_dir(tmp_path_factory.mktemp("dgemma") / "tiny-dgemma")


def write_job(folder: Path, model: Path, train_rows=PAIRS + RULE, **overrides) -> Path:
    """`train_rows` (PAIRS and RULE) as the train split, HELD_OUT as the test split."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_rows(data / "train.jsonl", [{"prompt": p, "completion": c} for p, c in train_rows])
    write_rows(data / "test.jsonl", [{"prompt": p, "completion": c} for p, c in HELD_OUT])
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "auto",
        "train_device": "cpu",
        "dtype": "float32",
        "batch_size": 10,  # the whole train split: every step sees every pair
        "learning_rate": 1e-2,
        # A decaying rate lets the tiny model settle: at a constant 1e-2 one answer letter
        # stayed wrong on a clean canvas ("mwow"), whatever the sampler's seed.
        "learning_rate_schedule": "cosine",
        "warmup_ratio": 0.0,
        "train_steps": 300,
        "max_length": 64,
        "logging_steps": 25,
        "eval_strategy": "steps",
        "eval_steps": 10,
        "save_steps": 1000,
        "save_total_limit": 1,
        "log_to_wandb": False,
        "num_preview_samples": 0,
        "num_proc": 1,
        "seed": 3,
        "output_dir": str(folder / "out"),
        "adaptor_name": "pairs",
        **overrides,
    }
    job = folder / "job.json"
    job.write_text(json.dumps({"config": config}))
    return job


def train(folder: Path, model: Path, **overrides) -> tuple[dict, object]:
    """Run a job through main.py's entry; (run_summary.json, the Trainer it built)."""
    box = {}
    original = run_module.build_trainer

    def spy(*args, **kwargs):
        box["trainer"] = original(*args, **kwargs)
        return box["trainer"]

    run_module.build_trainer = spy
    try:
        assert cli_main(["--input_file", str(write_job(folder, model, **overrides))]) == 0
    finally:
        run_module.build_trainer = original
    return json.loads((folder / "out" / "run_summary.json").read_text()), box["trainer"]


def probe_logits(model) -> torch.Tensor:
    """Pass-2-style logits on fixed inputs (prompt through the encoder, a canvas)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    canvas = torch.randint(0, 128, (2, 8), generator=g)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model_dir):
    return train(tmp_path_factory.mktemp("full"), model_dir, num_preview_samples=2)


def test_full_sft_trains_and_the_saved_model_reloads_exactly(full_run):
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    summary, trainer = full_run
    assert summary["status"] == "complete" and summary["method"] == "diffusion_gemma"
    assert summary["output_kind"] == "full_model" and summary["global_step"] == 300
    held_out = [h["eval_loss"] for h in summary["log_history"] if "eval_loss" in h]
    assert len(held_out) >= 4 and held_out[-1] < 0.6 * held_out[0], held_out
    train_nll = [h["nll"] for h in summary["log_history"] if "nll" in h and "loss" in h]
    assert train_nll[-1] < 0.2 * train_nll[0], train_nll
    # Held-out evaluation: no masked-diffusion NLL bound for this method (eval_loss is its
    # score); answer accuracy from the model's own generation, before and after training.
    held = summary["held_out"]
    assert "eval_nll_bound" not in summary["metrics"] and held["mc_samples"] is None
    assert held["before_training"] == {"exact_match": 0.0, "token_f1": 0.0}
    assert held["after_training"] == {"exact_match": 1.0, "token_f1": 1.0}
    assert [a["generated"] for a in held["answers"]] == ["ok", "ok"]
    # The preview answers (the model's own generation too), before and after training.
    samples = summary["samples"]
    assert len(samples) == 2 and all(s["generated"] == s["reference"] for s in samples)
    assert all(s["before_training"] != s["reference"] for s in samples)
    out = Path(summary["output_path"])
    reloaded = DiffusionGemmaForBlockDiffusion.from_pretrained(out)
    torch.testing.assert_close(
        probe_logits(reloaded), probe_logits(trainer.model), rtol=0, atol=1e-5
    )
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_generation_reproduces_the_trained_answers(full_run, capsys):
    summary, _ = full_run
    for prompt, answer in PAIRS:
        argv = ["--model", summary["output_path"], "--prompt", prompt, "--device", "cpu"]
        assert generate.main([*argv, "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out.strip() == answer


def test_lora_adaptor_and_merged_model_reload_to_the_trained_logits(tmp_path, model_dir):
    from peft import PeftModel
    from transformers import DiffusionGemmaForBlockDiffusion

    from dllm_plugin.models.diffusion_gemma import share_adaptors

    summary, trainer = train(
        tmp_path,
        model_dir,
        lora=True,
        lora_r=8,
        lora_alpha=16,
        train_steps=8,
        eval_strategy="no",
        merge_adaptor=True,
        learning_rate=5e-2,
    )
    assert summary["output_kind"] == "lora_adaptor"
    trained = probe_logits(trainer.model)
    base = probe_logits(DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir))
    assert (trained - base).abs().max() > 1e-2  # the adaptor changed the model
    adapted = PeftModel.from_pretrained(
        DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir), summary["output_path"]
    )
    share_adaptors(adapted)  # the decoder uses the encoder's adaptors, as in training
    torch.testing.assert_close(probe_logits(adapted), trained, rtol=0, atol=1e-5)
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(summary["merged_model_path"])
    torch.testing.assert_close(probe_logits(merged), trained, rtol=0, atol=1e-5)
    argv = ["--model", str(model_dir), "--adaptor", summary["output_path"], "--prompt", "hi"]
    assert generate.main([*argv, "--max-new-tokens", "8", "--device", "cpu"]) == 0


def test_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, model_dir):
    from safetensors.torch import load_file

    common = dict(train_steps=6, save_steps=3, save_total_limit=2, eval_strategy="no")
    common.update(logging_steps=1)
    straight, _ = train(tmp_path / "straight", model_dir, **common)
    resumed_dir = tmp_path / "resumed" / "out"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "out" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed, _ = train(tmp_path / "resumed", model_dir, resume_from_checkpoint="auto", **common)
    a = load_file(Path(straight["output_path"]) / "model.safetensors")
    b = load_file(Path(resumed["output_path"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # Steps 1-3 come from the checkpoint's state; 4-6 were trained after the resume.
    after = {h["step"]: h["loss"] for h in resumed["log_history"] if "loss" in h}
    before = {h["step"]: h["loss"] for h in straight["log_history"] if "loss" in h}
    assert sorted(after) == sorted(before) == [1, 2, 3, 4, 5, 6]
    assert [after[s] for s in (4, 5, 6)] == pytest.approx([before[s] for s in (4, 5, 6)], rel=1e-5)


def test_two_processes_train_like_one_with_accumulation(tmp_path, model_dir):
    """Same global batch (2 x 2 processes == 2 x GA 2), full fine-tuning over DDP; 8 rows,
    so every epoch ends on a whole global batch (see info.md on uneven last steps)."""
    common = dict(
        train_rows=PAIRS + RULE[:4],
        batch_size=2,
        train_steps=4,
        logging_steps=1,
        eval_strategy="no",
        save_steps=100,
    )
    job = write_job(tmp_path / "two", model_dir, num_processes=2, **common)
    proc = run_main(job)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    one, _ = train(tmp_path / "one", model_dir, gradient_accumulation_steps=2, **common)
    two = losses(tmp_path / "two" / "out" / "run_summary.json")
    single = {h["step"]: h["loss"] for h in one["log_history"] if "loss" in h}
    print(f"1 process x GA 2: {single}\n2 processes x GA 1: {two}")
    assert sorted(single) == sorted(two) == [1, 2, 3, 4]
    assert single[1] == pytest.approx(two[1], abs=1e-5)
    for step in range(2, 5):
        assert single[step] == pytest.approx(two[step], rel=1e-3)
