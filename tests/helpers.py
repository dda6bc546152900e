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

from dllm_plugin.gpu_check.tokenizer import char_tokenizer

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


def tiny_bert(folder: Path, minilm_path: Path, dropout: float = 0.0) -> Path:
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
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
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
    """Train a fixture model (tiny-llada, tiny-dream, or a causal family for a2d) on PAIRS
    through main.py's entry; return run_summary.json.

    held_out: a data folder with PAIRS x 3 to train on and PAIRS as the test split.
    """
    from dllm_plugin.cli import main as cli_main

    if fixture in CAUSAL_FAMILIES:
        model = causal_lm_dir(fixture, tmp_path / fixture)
    else:
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


# ---- a2d: tiny causal LMs built from configs ---------------------------------------------
A2D_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# family -> (config class, causal class, extra config fields, vocabulary rows or None for
# exactly the tokenizer's size: then the added mask token needs a resized embedding)
CAUSAL_FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, 128),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, 112),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, None),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}, 104),
}


def a2d_tokenizer():
    """The character tokenizer with ChatML specials right after the characters (no mask)."""
    import string

    first = len(" \n" + string.ascii_letters + string.digits + string.punctuation) + 1
    specials = {tok: first + i for i, tok in enumerate(A2D_SPECIALS)}
    return char_tokenizer(specials, eos_token="<|endoftext|>")


def tiny_causal_lm(
    family: str, seed: int = 0, attn: str = "sdpa", hidden: int = 32, layers: int = 2
):
    """(a random causal LM of `family`, its tokenizer): GQA, positions 256."""
    import torch
    import transformers

    config_name, model_name, extra, rows = CAUSAL_FAMILIES[family]
    tokenizer = a2d_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=rows or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval(), tokenizer


def causal_lm_dir(family: str, dest: Path, seed: int = 0, layers: int = 2) -> Path:
    """A saved tiny causal LM checkpoint with its tokenizer (what a user would pick)."""
    model, tokenizer = tiny_causal_lm(family, seed, layers=layers)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def grad_recorder():
    """A Trainer callback that keeps every optimizer step's gradients (`.grads`, one dict
    of parameter name -> gradient per step), for the accumulation-invariance tests."""
    from transformers import TrainerCallback

    class GradRecorder(TrainerCallback):
        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.grads.append(
                {
                    n: p.grad.detach().clone()
                    for n, p in model.named_parameters()
                    if p.grad is not None
                }
            )

    return GradRecorder()
