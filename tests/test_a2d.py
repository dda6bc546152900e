"""a2d: tiny random causal LMs (Qwen2, Qwen3, Llama, Mistral) made bidirectional diffusion models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CAUSAL_FAMILIES, causal_lm_dir, run_pairs_job, tiny_causal_lm, write_rows
from transformers import AutoModelForMaskedLM

from dllm_plugin import generate
from dllm_plugin.errors import ModelError
from dllm_plugin.methods import resolve_method
from dllm_plugin.models import a2d
from dllm_plugin.models.families import (
    detect_family,
    prepare_tokenizer,
    read_model_config,
    resolve_lora_targets,
)
from dllm_plugin.models.loading import LoadOptions, from_pretrained, load_model

FAMILIES = list(CAUSAL_FAMILIES)


def convert(family: str, tmp_path, seed: int = 0, layers: int = 2, **kwargs):
    """(causal model, its a2d conversion, token ids) from a saved checkpoint."""
    folder = causal_lm_dir(family, tmp_path / family, seed, layers)
    causal, tokenizer = tiny_causal_lm(family, seed, layers=layers)
    ids = prepare_tokenizer(tokenizer, "a2d", read_model_config(str(folder)))
    converted = from_pretrained(str(folder), "a2d", ids, **kwargs).eval()
    return causal, converted, ids


def later_token_effect(model, ids: torch.Tensor, later: int, early: int) -> float:
    """Largest logit change at positions < `early` when token `later` changes."""
    changed = ids.clone()
    changed[0, later] = (ids[0, later] + 1) % 90
    with torch.no_grad():
        a = model(input_ids=ids).logits[0, :early]
        b = model(input_ids=changed).logits[0, :early]
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_makes_attention_bidirectional(family, tmp_path):
    causal, converted, ids = convert(family, tmp_path)
    x = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(1))
    assert later_token_effect(causal, x, later=7, early=5) == 0.0
    assert later_token_effect(converted, x, later=7, early=5) > 1e-4
    assert (
        type(converted).__name__
        == f"A2D{type(causal).__name__.replace('ForCausalLM', '')}ForMaskedLM"
    )
    assert converted.config.is_causal is False and converted.config.model_type == f"a2d-{family}"


@pytest.mark.parametrize("family", FAMILIES)
def test_unchanged_weights_give_the_causal_logits_at_the_last_position(family, tmp_path):
    """The last position of a prefix sees the same tokens causally and bidirectionally.

    Its whole computation is the same only in a one-layer model: with more layers the
    earlier positions' hidden states (which it reads) differ once they see later tokens.
    So: one layer, every prefix length; and two layers, a one-token prefix. (A causal
    Mistral looks back only over its sliding window, which a2d drops: prefixes within it.)
    """
    for layers, ends in ((1, (1, 4, 9)), (2, (1,))):
        causal, converted, ids = convert(family, tmp_path / str(layers), layers=layers)
        keep = [i for i in range(causal.config.vocab_size) if i != ids.mask_id]  # a new row
        x = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(2))
        window = getattr(causal.config, "sliding_window", None) or 9
        for end in (e for e in ends if e <= window):
            with torch.no_grad():
                a = causal(input_ids=x[:, :end]).logits[:, -1, keep]
                b = converted(input_ids=x[:, :end]).logits[:, -1, keep]
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert later_token_effect(converted, x[:1], later=8, early=8) > 1e-4


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_padding_keys_are_masked(family, tmp_path):
    """A right-padded row with an attention mask gives its real tokens the unpadded logits."""
    _, converted, ids = convert(family, tmp_path)
    x = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([x, torch.full((1, 3), ids.pad_id)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        alone = converted(input_ids=x).logits
        with_pad = converted(input_ids=padded, attention_mask=mask).logits[:, :6]
    torch.testing.assert_close(with_pad, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_token_rows_are_added_as_the_mean_and_reload_identically(family, tmp_path):
    causal, converted, ids = convert(family, tmp_path)
    rows = causal.config.vocab_size
    assert ids.mask_id == ids.tokenizer_size - 1  # appended to the tokenizer
    embedding = converted.get_input_embeddings().weight
    assert embedding.shape[0] == max(rows, ids.tokenizer_size)  # resized only when needed
    others = [i for i in range(ids.tokenizer_size) if i != ids.mask_id]
    old = causal.get_input_embeddings().weight
    torch.testing.assert_close(embedding[ids.mask_id], old[others].mean(0))
    torch.testing.assert_close(embedding[others], old[others], rtol=0, atol=0)
    if not causal.config.tie_word_embeddings:
        head = converted.get_output_embeddings().weight
        torch.testing.assert_close(head[ids.mask_id], causal.lm_head.weight[others].mean(0))
    # a second conversion gives the same model (no random rows), and a save reloads it exactly
    _, again, _ = convert(family, tmp_path / "again", seed=0)
    for (name, a), (_, b) in zip(
        converted.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    converted.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == f"a2d-{family}" and saved["is_causal"] is False
    assert saved["mask_token_id"] == ids.mask_id
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    x = torch.randint(0, ids.tokenizer_size, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, converted(input_ids=x).logits)
    assert later_token_effect(reloaded, x[:1], later=8, early=4) > 1e-4


def test_mistral_sliding_window_is_turned_off(tmp_path):
    _, converted, _ = convert("mistral", tmp_path)
    assert converted.config.sliding_window is None  # the tiny checkpoint's window was 4
    x = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(5))
    assert later_token_effect(converted, x, later=11, early=1) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_detection_and_lora_targets_per_family(family, tmp_path):
    folder = causal_lm_dir(family, tmp_path / family)
    config = read_model_config(str(folder))
    assert detect_family(config) == "a2d"
    assert resolve_method("auto", "a2d", family).name == "a2d"
    _, converted, _ = convert(family, tmp_path / "c")
    targets = resolve_lora_targets(converted, "a2d", "auto")
    shorts = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = sorted(
        f"model.layers.{i}.{part}.{name}"
        for i in range(2)
        for part, names in (("self_attn", shorts[:4]), ("mlp", shorts[4:]))
        for name in names
    )
    assert targets == expected and "lm_head" not in targets
    with pytest.raises(ModelError, match="lora_target_modules: wq match no Linear module"):
        resolve_lora_targets(converted, "a2d", "q_proj,wq")


def test_other_causal_lms_are_refused_by_name():
    with pytest.raises(ModelError, match="model_type 'gpt2' .*causal LM that a2d does not convert"):
        detect_family(
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel", "GPT2ForCausalLM"]}
        )
    with pytest.raises(ModelError, match="a2d converts qwen2, qwen3, llama, mistral"):
        detect_family({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})


def test_lora_four_bit_and_checkpointing_train_the_converted_model(tmp_path):
    """LoRA on the family's targets over an NF4 base (the resized, unquantised head), with
    gradient checkpointing: a backward step reaches every adaptor (B; A's start at 0)."""
    pytest.importorskip("bitsandbytes")
    folder = causal_lm_dir("llama", tmp_path / "llama")
    _, tokenizer = tiny_causal_lm("llama")
    ids = prepare_tokenizer(tokenizer, "a2d", read_model_config(str(folder)))
    opts = LoadOptions(
        dtype="float32",
        load_in_4bit=True,
        lora=True,
        lora_r=4,
        lora_alpha=8,
        gradient_checkpointing=True,
    )
    loaded = load_model(str(folder), "a2d", opts, ids)
    model = loaded.model
    model.train()
    x = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(6))
    x[:, 4] = ids.mask_id
    model(input_ids=x).logits[:, 4].logsumexp(-1).sum().backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]  # A's grads start at 0
    assert len(lora_b) == 2 * 7 and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b
    )
    assert model.get_output_embeddings().weight.shape[0] == ids.tokenizer_size  # resized head


def copy_rows(n: int) -> list[dict]:
    """'copy: abc' -> 'abc': a task whose held-out rows share the training rows' pattern."""
    g = torch.Generator().manual_seed(0)
    words = [
        "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (4,), generator=g)) for _ in range(n)
    ]
    return [{"prompt": f"copy: {w}", "completion": w} for w in words]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A full a2d MDLM SFT of a tiny Qwen2 through main.py with a held-out split."""
    folder = tmp_path_factory.mktemp("a2d-sft")
    data = write_rows(folder / "copy.jsonl", copy_rows(24))
    return run_pairs_job(
        folder,
        "qwen2",
        dataset_name=str(data),
        training_method="a2d",
        train_steps=40,
        learning_rate=3e-3,
        eval_split_ratio=0.25,
        eval_strategy="steps",
        eval_steps=20,
        logging_steps=10,
        num_preview_samples=2,
        preview_max_new_tokens=6,
    )


def test_end_to_end_sft_lowers_the_held_out_loss(sft_run):
    evals = [h["eval_loss"] for h in sft_run["log_history"] if "eval_loss" in h]
    assert sft_run["status"] == "complete" and sft_run["method"] == "a2d"
    assert len(evals) >= 2 and evals[-1] < evals[0]


def test_trained_model_reloads_bidirectional_and_generates_its_previews(sft_run, capsys):
    folder = sft_run["output_path"]
    config = json.loads(Path(folder, "config.json").read_text())
    assert config["model_type"] == "a2d-qwen2" and config["is_causal"] is False
    recipe = json.loads(Path(folder, "diffusion_recipe.json").read_text())
    assert recipe == {"training_method": "a2d", "diffusion_type": "mdlm"}
    sample = sft_run["samples"][0]
    argv = ["--model", folder, "--prompt", sample["prompt"], "--max-new-tokens", "6"]
    assert generate.main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == sample["generated"]


def test_a2d_refuses_options_it_ignores(tmp_path):
    from dllm_plugin.config import build_job_config
    from dllm_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="block_size: 8 has no effect with training_method 'a2d'"):
        build_job_config({"training_method": "a2d", "block_size": 8})
    assert a2d.MASK_TOKEN == "<|mask|>"


def test_lora_adaptor_on_a_resized_base_equals_the_merged_model(tmp_path, capsys):
    """Llama's tokenizer fills its rows, so the mask token resizes the embedding: the
    adaptor reapplied to a freshly converted base gives the merged model's logits."""
    from peft import PeftModel

    summary = run_pairs_job(
        tmp_path,
        "llama",
        training_method="a2d",
        lora=True,
        lora_r=8,
        lora_alpha=16,
        train_steps=8,
        learning_rate=1e-2,
        merge_adaptor=True,
        num_preview_samples=0,
    )
    folder = tmp_path / "llama"
    _, tokenizer = tiny_causal_lm("llama")
    ids = prepare_tokenizer(tokenizer, "a2d", read_model_config(str(folder)))
    x = torch.randint(0, ids.tokenizer_size, (2, 10), generator=torch.Generator().manual_seed(9))
    base = from_pretrained(str(folder), "a2d", ids).eval()
    with torch.no_grad():
        base_logits = base(input_ids=x).logits
        adapted = PeftModel.from_pretrained(base, summary["output_path"]).eval()(input_ids=x).logits
        merged_model = AutoModelForMaskedLM.from_pretrained(summary["merged_model_path"]).eval()
        merged = merged_model(input_ids=x).logits
    assert merged.shape[-1] == ids.tokenizer_size == 101
    assert (adapted - base_logits).abs().max() > 1e-3  # the adaptor changed something
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    capsys.readouterr()  # the training job's output
    answers = []
    for argv in (
        ["--model", str(folder), "--adaptor", summary["output_path"]],
        ["--model", summary["merged_model_path"]],
    ):
        assert (
            generate.main([*argv, "--prompt", "sky?", "--max-new-tokens", "6", "--device", "cpu"])
            == 0
        )
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
