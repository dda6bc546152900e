"""Family detection, method checks, per-family tokenizer set-up, LoRA targets, 4-bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    DREAM_SPECIALS,
    LLADA_SPECIALS,
    char_tokenizer,
    fixture_model_dir,
    shared_fixture,
)
from transformers import AutoModelForMaskedLM, AutoTokenizer

from dllm_plugin.errors import ModelError
from dllm_plugin.methods import resolve_method
from dllm_plugin.models.families import (
    detect_family,
    load_tokenizer,
    prepare_tokenizer,
    read_model_config,
    resolve_lora_targets,
)


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "bert"),
        ({"model_type": "roberta"}, "bert"),
        ({"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"]}, "bert"),
        ({"model_type": "distilbert"}, "bert"),
        ({"model_type": "llada", "architectures": ["LLaDAModelLM"]}, "llada"),
        ({"architectures": ["LLaDAModelLM"]}, "llada"),
        ({"model_type": "Dream", "architectures": ["DreamModel"]}, "dream"),
        ({"model_type": "custom", "architectures": ["CustomForMaskedLM"]}, "bert"),
    ],
)
def test_detect_family(config, family):
    assert detect_family(config) == family


def test_detect_family_rejects_other_models():
    with pytest.raises(ModelError, match="unsupported model: model_type 't5'"):
        detect_family({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})


def test_fixture_configs_are_detected():
    assert detect_family(read_model_config(str(shared_fixture("tiny-llada")))) == "llada"
    assert detect_family(read_model_config(str(shared_fixture("tiny-dream")))) == "dream"


def test_method_must_fit_the_family():
    assert resolve_method("auto", "dream", "m").name == "dream"
    assert resolve_method("llada", "llada", "m").name == "llada"
    with pytest.raises(ModelError) as err:
        resolve_method("bert", "llada", "GSAI-ML/LLaDA-8B-Instruct")
    assert str(err.value) == (
        "training_method 'bert' does not fit model 'GSAI-ML/LLaDA-8B-Instruct', which is a llada model: "
        "use training_method 'llada' or 'auto'"
    )


# ---- tokenizers ---------------------------------------------------------------------------
def test_llada_tokenizer_setup():
    tok = char_tokenizer(LLADA_SPECIALS)
    assert tok.mask_token is None and tok.eos_token is None
    ids = prepare_tokenizer(tok, "llada", {"mask_token_id": 250})
    assert (ids.mask_id, ids.eos_id, ids.pad_id, ids.bos_id) == (250, 249, 249, 248)
    assert set(ids.stop_ids) == {249, 253} and tok.padding_side == "right"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " hi "}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_dream_tokenizer_keeps_chatml_and_fills_specials():
    tok = char_tokenizer(DREAM_SPECIALS)
    ids = prepare_tokenizer(tok, "dream", {"mask_token_id": 254})
    assert (ids.mask_id, ids.eos_id, ids.pad_id, ids.bos_id) == (254, 250, 250, 253)
    assert set(ids.stop_ids) == {250, 252}
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert (
        text
        == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = char_tokenizer(DREAM_SPECIALS)
    own.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    prepare_tokenizer(own, "dream", {})
    assert own.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_bert_tokenizer_setup(minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    ids = prepare_tokenizer(tok, "bert", {})
    assert (ids.mask_id, ids.eos_id, ids.pad_id) == (103, 102, 102) and ids.stop_ids == (102,)
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    ) == ("[CLS]User: hi[SEP]Assistant:")


def test_missing_or_mismatched_mask_token_is_an_error():
    specials = {k: v for k, v in LLADA_SPECIALS.items() if k != "<|mdm_mask|>"}
    with pytest.raises(ModelError, match="no mask token"):
        prepare_tokenizer(char_tokenizer(specials), "llada", {})
    with pytest.raises(ModelError, match="mask_token_id 251"):
        prepare_tokenizer(char_tokenizer(LLADA_SPECIALS), "llada", {"mask_token_id": 251})


def test_dream_tokenizer_from_official_style_folder_without_remote_code(tmp_path):
    """The official folder names a remote-code class (DreamTokenizer); we read vocab/merges as Qwen2."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["hello world, the model says hello"] * 20, vocab_size=300, min_frequency=1
    )
    bpe.save_model(str(tmp_path))
    base = len(bpe.get_vocab())
    specials = {
        "<|endoftext|>": base,
        "<|im_start|>": base + 1,
        "<|im_end|>": base + 2,
        "<|beginoftext|>": base + 3,
        "<|mask|>": base + 4,
    }
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "DreamTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
                "bos_token": "<|beginoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "mask_token": "<|mask|>",
                "added_tokens_decoder": {
                    str(i): {
                        "content": t,
                        "special": True,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "single_word": False,
                    }
                    for t, i in specials.items()
                },
            }
        )
    )
    (tmp_path / "tokenization_dream.py").write_text(
        "raise RuntimeError('remote code must not run')\n"
    )
    tok = load_tokenizer(str(tmp_path), "dream")
    ids = prepare_tokenizer(tok, "dream", {"mask_token_id": base + 4})
    assert ids.mask_id == base + 4 and ids.eos_id == base and ids.bos_id == base + 3
    encoded = tok("hello world")["input_ids"]
    assert tok.decode(encoded) == "hello world"


# ---- LoRA targets ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llada_model():
    return AutoModelForMaskedLM.from_pretrained(shared_fixture("tiny-llada"))


@pytest.fixture(scope="module")
def dream_model():
    return AutoModelForMaskedLM.from_pretrained(shared_fixture("tiny-dream"))


def test_llada_lora_targets_exclude_the_head(llada_model):
    targets = resolve_lora_targets(llada_model, "llada", "auto")
    shorts = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    assert targets == sorted(f"model.transformer.blocks.{i}.{s}" for i in range(2) for s in shorts)
    assert "model.transformer.ff_out" not in targets


def test_dream_lora_targets(dream_model):
    targets = resolve_lora_targets(dream_model, "dream", "auto")
    assert len(targets) == 2 * 7 and "lm_head" not in targets
    assert (
        "model.layers.1.mlp.down_proj" in targets and "model.layers.0.self_attn.o_proj" in targets
    )


def test_bert_lora_targets_skip_mlm_head_and_pooler(minilm_path):
    model = AutoModelForMaskedLM.from_pretrained(minilm_path)
    targets = resolve_lora_targets(model, "bert", "auto")
    assert len(targets) == 6 * 6
    assert not any(t.startswith(("cls", "bert.pooler")) for t in targets)


def test_explicit_lora_targets_and_unknown_names(llada_model):
    assert resolve_lora_targets(llada_model, "llada", "q_proj, v_proj") == sorted(
        f"model.transformer.blocks.{i}.{s}" for i in range(2) for s in ("q_proj", "v_proj")
    )
    with pytest.raises(ModelError) as err:
        resolve_lora_targets(llada_model, "llada", "q_proj,query,o_proj")
    assert "query, o_proj match no Linear module" in str(err.value)
    assert "attn_out, ff_out, ff_proj, k_proj, q_proj, up_proj, v_proj" in str(err.value)


# ---- 4-bit -------------------------------------------------------------------------------
def test_4bit_lora_training_step_on_tiny_llada(tmp_path):
    from dllm_plugin.models.loading import LoadOptions, check_bitsandbytes, load_model

    try:
        check_bitsandbytes()
    except ModelError as e:
        pytest.skip(f"bitsandbytes cannot quantise here: {e}")
    import bitsandbytes as bnb

    folder = fixture_model_dir("tiny-llada", tmp_path / "llada")
    loaded = load_model(
        str(folder),
        "llada",
        LoadOptions(dtype="float32", load_in_4bit=True, lora=True, lora_r=4, lora_alpha=8),
    )
    model = loaded.model
    base = model.get_base_model()
    assert type(base.model.transformer.ff_out) is torch.nn.Linear  # the head stays unquantised
    assert isinstance(base.model.transformer.blocks[0].q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(base.model.transformer.blocks[0].ff_out.base_layer, bnb.nn.Linear4bit)
    ids = torch.randint(0, 90, (2, 12))
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert (
        lora_grads
        and all(g is not None for g in lora_grads)
        and any(g.abs().sum() > 0 for g in lora_grads)
    )
    assert torch.isfinite(loss)


def test_4bit_without_bitsandbytes_fails_clearly(monkeypatch):
    import builtins

    from dllm_plugin.models import loading

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ModelError, match="load_in_4bit: true, but bitsandbytes cannot quantise"):
        loading.check_bitsandbytes()
