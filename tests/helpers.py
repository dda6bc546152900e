"""Test helpers: tiny tokenizers and models, fixture copies, a pairs job through main.py.

Imported by the tests as `from helpers import ...` (pytest puts this folder on sys.path);
the pytest fixtures that use them live in conftest.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def shared_fixture(name: str) -> Path:
    path = SHARED_FIXTURES / name
    if not (path / "config.json").is_file():
        pytest.skip(f"shared fixture {path} is missing (CI places ../shared beside the clone)")
    return path


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models on one thread: as fast, and on a loaded machine a second thread only
    spins (the evaluation tests ran 5x slower with two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_bert(folder: Path, minilm_path: Path) -> Path:
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


def copy_fixture(name: str, dest: Path) -> Path:
    """A writable copy of a shared fixture (they are read-only)."""
    src = shared_fixture(name)
    shutil.copytree(src, dest)
    for p in dest.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dest


LLADA_SPECIALS = {
    "<|startoftext|>": 248,
    "<|endoftext|>": 249,
    "<|mdm_mask|>": 250,
    "<|start_header_id|>": 251,
    "<|end_header_id|>": 252,
    "<|eot_id|>": 253,
}
DREAM_SPECIALS = {
    "<|endoftext|>": 250,
    "<|im_start|>": 251,
    "<|im_end|>": 252,
    "<|beginoftext|>": 253,
    "<|mask|>": 254,
}


def char_tokenizer(specials: dict[str, int], **special_attrs):
    """A character-level fast tokenizer whose special tokens sit at the given ids.

    The fixtures have a 256-token vocabulary and no tokenizer; this one fits it, so the
    real chat-template, masking and sampling code runs against them.
    """
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for ch in " \n" + string.ascii_letters + string.digits + string.punctuation:
        vocab[ch] = len(vocab)
    assert max(vocab.values()) < min(specials.values())
    vocab.update(specials)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special_attrs)


def fixture_model_dir(name: str, dest: Path) -> Path:
    """A writable copy of tiny-llada / tiny-dream with a tokenizer built to its ids."""
    copy_fixture(name, dest)
    if name == "tiny-llada":
        tok = char_tokenizer(LLADA_SPECIALS, eos_token="<|endoftext|>", bos_token="<|startoftext|>")
    else:
        tok = char_tokenizer(DREAM_SPECIALS, eos_token="<|endoftext|>", bos_token="<|beginoftext|>")
    tok.save_pretrained(dest)
    return dest


PAIRS = [("hi", "hello"), ("sky?", "blue"), ("1+1?", "two"), ("cat?", "meow")]


def run_pairs_job(tmp_path: Path, fixture: str, held_out: bool = False, **overrides) -> dict:
    """Train a fixture model on PAIRS through main.py's entry; return run_summary.json.

    held_out: a data folder with PAIRS x 3 to train on and PAIRS as the test split.
    """
    from dllm_plugin.cli import main as cli_main

    model = fixture_model_dir(fixture, tmp_path / fixture)
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    if held_out:
        data = tmp_path / "pairs"
        data.mkdir()
        write_rows(data / "train.jsonl", rows * 3)
        write_rows(data / "test.jsonl", rows)
    else:
        data = write_rows(tmp_path / "pairs.jsonl", rows)
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
        "save_total_limit": 1,
        "log_to_wandb": False,
        "num_preview_samples": 0,
        "output_dir": str(tmp_path / "out"),
        "adaptor_name": "pairs",
        **overrides,
    }
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": config}))
    assert cli_main(["--input_file", str(job)]) == 0
    return json.loads((tmp_path / "out" / "run_summary.json").read_text())


def tiny_bert_mlm(vocab_size: int):
    """A one-layer, dropout-free BertForMaskedLM (seed the RNG first for fixed weights)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def write_lm_eval_tasks(folder: Path, pairs=PAIRS) -> Path:
    """A local lm-eval task folder over jsonl files written here (absolute paths, offline):
    `pairs_gen` (generate_until, exact match) and `pairs_mc` (multiple choice between the
    trained answer and the next pair's answer, by loglikelihood)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = write_rows(folder / "gen.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    answers = [c for _, c in pairs]
    mc = write_rows(
        folder / "mc.jsonl",
        [
            {"prompt": p, "choices": [c, answers[(i + 1) % len(answers)]], "label": 0}
            for i, (p, c) in enumerate(pairs)
        ],
    )
    (folder / "pairs_gen.yaml").write_text(
        f"""task: pairs_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    (folder / "pairs_mc.yaml").write_text(
        f"""task: pairs_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    return folder
