"""Test helpers: tiny tokenizers and models, fixture copies, a pairs job through main.py.

Imported by the tests as `from helpers import ...` (pytest puts this folder on sys.path);
the pytest fixtures that use them live in conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def shared_fixture(name: str) -> Path:
    path = SHARED_FIXTURES / name
    if not (path / "config.json").is_file():
        pytest.skip(f"shared fixture {path} is missing (CI places ../shared beside the clone)")
    return path


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


def run_pairs_job(tmp_path: Path, fixture: str, **overrides) -> dict:
    """Train a fixture model on PAIRS through main.py's entry; return run_summary.json."""
    from dllm_plugin.cli import main as cli_main

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


# ---- DiffusionGemma ------------------------------------------------------------------------
DGEMMA_SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<|turn>": 3, "<turn|>": 4}
DGEMMA_VOCAB = 128


def gemma_char_tokenizer():
    """A character-level fast tokenizer with DiffusionGemma's special tokens at the ids of
    its text config (pad 0, eos 1, bos 2) and Gemma 4's turn markers."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(DGEMMA_SPECIALS)
    vocab["<unk>"] = len(vocab)
    for ch in " \n" + string.ascii_letters + string.digits + string.punctuation:
        vocab[ch] = len(vocab)
    assert len(vocab) <= DGEMMA_VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(DGEMMA_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )


def tiny_diffusion_gemma_config(canvas_length: int = 8, sliding_window: int = 8, attn="sdpa"):
    """A 2-layer DiffusionGemma (one sliding, one full-attention layer), 4 experts (top 2),
    hidden 32, vocabulary 128, with a one-layer vision tower it never uses."""
    from transformers import DiffusionGemmaConfig

    text = dict(
        vocab_size=DGEMMA_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        num_global_key_value_heads=1,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        use_bidirectional_attention="vision",
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=16,
        position_embedding_size=64,
        pooling_kernel_size=1,
    )
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=canvas_length,
        boi_token_id=120,
        eoi_token_id=121,
        image_token_id=122,
    )
    config._attn_implementation = attn
    return config


def tiny_diffusion_gemma(seed: int = 0, **config_kwargs):
    """A random tiny DiffusionGemmaForBlockDiffusion; router and norms randomised too, so
    no weight is at a symmetric initial value a bug could hide behind."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_diffusion_gemma_config(**config_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                param.add_(0.2 * torch.randn_like(param))
    return model


def tiny_diffusion_gemma_dir(folder: Path, seed: int = 0, **config_kwargs) -> Path:
    """A saved tiny DiffusionGemma with the character tokenizer."""
    tiny_diffusion_gemma(seed, **config_kwargs).save_pretrained(folder)
    gemma_char_tokenizer().save_pretrained(folder)
    return folder
