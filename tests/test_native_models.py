"""Tests for the native LLaDA and Dream implementations in ``dllm_plugin.models``.

Parity is checked against logits written by the official modelling code into the shared
fixtures (``../shared/fixtures`` relative to the repo root). Models are tiny and loaded once
per module so the whole file runs in a few seconds on two CPU cores.
"""

import importlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import dllm_plugin.models as native
from dllm_plugin.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
FAMILIES = ["tiny-llada", "tiny-dream"]
MODEL_CLASSES = {"tiny-llada": LLaDAModelLM, "tiny-dream": DreamModel}
FP32_TOL = 1e-4


def _fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"shared fixture {path} is missing (expected ../shared/fixtures/{name})")
    return path


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box OpenMP contention made
    each forward ~100x slower (0.27 s vs 2 ms). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """fp32 model (via AutoModelForMaskedLM, no remote code) and reference tensors, by family."""
    out = {}
    for name in FAMILIES:
        path = _fixture_dir(name)
        model = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
        out[name] = (model, load_file(path / "reference.safetensors"))
    return out


def _head(model: nn.Module) -> nn.Module:
    return model.get_output_embeddings()


def _logits(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _random_model(
    model_cls: type, config: transformers.PretrainedConfig, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # non-trivial norms/biases so every weight matters for equality
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    return model


def _blocks(model: nn.Module) -> nn.ModuleList:
    backbone = model.model
    return backbone.transformer.blocks if hasattr(backbone, "transformer") else backbone.layers


def _saved_keys(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return set(handle.keys())


# --------------------------------------------------------------------------------------
# Parity with the official modelling code
# --------------------------------------------------------------------------------------


def test_fp32_logits_match_reference(loaded, family) -> None:
    model, ref = loaded[family]
    diff = (_logits(model, input_ids=ref["input_ids"]) - ref["logits"]).abs().max().item()
    print(f"{family} fp32 max abs diff: {diff:.3g}")
    assert diff <= FP32_TOL


def test_padded_batch_matches_reference_at_real_positions(loaded, family) -> None:
    model, ref = loaded[family]
    real = ref["padded_attention_mask"].bool()
    assert (~real).any(), "fixture should contain padding"
    logits = _logits(
        model, input_ids=ref["padded_input_ids"], attention_mask=ref["padded_attention_mask"]
    )
    assert torch.isfinite(logits).all()
    diff = (logits - ref["padded_logits"])[real].abs().max().item()
    print(f"{family} padded (real positions) max abs diff: {diff:.3g}")
    assert diff <= FP32_TOL


def test_padding_changes_real_positions(loaded, family) -> None:
    """Guards against a mask that is silently ignored."""
    model, ref = loaded[family]
    masked = _logits(
        model, input_ids=ref["padded_input_ids"], attention_mask=ref["padded_attention_mask"]
    )
    unmasked = _logits(model, input_ids=ref["padded_input_ids"])
    real = ref["padded_attention_mask"].bool()
    assert (masked - unmasked)[real].abs().max() > 1e-2


def test_bf16_close_to_reference(family) -> None:
    """bf16 weights: compare with the reference bf16 run and with the fp32 reference.

    Measured on CPU: LLaDA 0.0 vs ``logits_bf16``; Dream 0.039 (the reference run kept
    Dream's RoPE ``inv_freq`` buffer in bf16; we keep it in fp32). The reference's own bf16
    run is 0.043 (LLaDA) / 0.050 (Dream) away from fp32, with |logits| up to ~4.1.
    """
    path = _fixture_dir(family)
    ref = load_file(path / "reference.safetensors")
    model = transformers.AutoModelForMaskedLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = _logits(model, input_ids=ref["input_ids"])
    assert logits.dtype == torch.bfloat16
    to_bf16_ref = (logits.float() - ref["logits_bf16"]).abs().max().item()
    to_fp32 = (logits.float() - ref["logits"]).abs().max().item()
    ref_noise = (ref["logits_bf16"] - ref["logits"]).abs().max().item()
    print(
        f"{family} bf16: vs logits_bf16 {to_bf16_ref:.3g}, vs fp32 {to_fp32:.3g}, ref noise {ref_noise:.3g}"
    )
    assert to_bf16_ref <= 0.1
    assert to_fp32 <= 2.0 * ref_noise


def test_cpu_autocast_bf16_runs(loaded, family) -> None:
    """The trainer's ``bf16=True, use_cpu=True`` path: fp32 weights under CPU autocast."""
    model, ref = loaded[family]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(
            input_ids=ref["input_ids"], attention_mask=ref["padded_attention_mask"]
        ).logits
        plain = model(input_ids=ref["input_ids"]).logits
    assert torch.isfinite(logits).all()
    assert (plain.float() - ref["logits"]).abs().max() < 0.1


def test_fp16_runs(loaded, family) -> None:
    model, ref = loaded[family]
    half = type(model)(model.config).to(torch.float16).eval()
    half.load_state_dict(model.state_dict())
    logits = _logits(half, input_ids=ref["input_ids"])
    assert logits.dtype == torch.float16
    assert (logits.float() - ref["logits"]).abs().max() < 0.1


# --------------------------------------------------------------------------------------
# Loading, saving, registration
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("auto_cls", [transformers.AutoModel, transformers.AutoModelForMaskedLM])
@pytest.mark.parametrize("trust", [None, False, True])
def test_auto_classes_load_without_remote_code(family, auto_cls, trust) -> None:
    """The fixtures' config has ``auto_map``; our registered classes must win regardless."""
    path = _fixture_dir(family)
    assert "auto_map" in json.loads((path / "config.json").read_text())
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    model = auto_cls.from_pretrained(path, **kwargs)
    assert type(model) is MODEL_CLASSES[family]
    assert type(model.config).__module__.startswith("dllm_plugin.")


def test_llada_causal_lm_auto_class() -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(_fixture_dir("tiny-llada"))
    assert type(model) is LLaDAModelLM


def test_registration_is_idempotent() -> None:
    native.register_native_models()
    importlib.reload(native)
    assert transformers.AutoConfig.for_model("llada").__class__.__name__ == "LLaDAConfig"
    assert transformers.AutoConfig.for_model("Dream").__class__.__name__ == "DreamConfig"


def test_save_reload_roundtrip_keeps_official_keys(loaded, family, tmp_path) -> None:
    model, ref = loaded[family]
    model.save_pretrained(tmp_path)
    assert _saved_keys(tmp_path) == _saved_keys(_fixture_dir(family))
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    before = _logits(model, input_ids=ref["input_ids"])
    assert torch.equal(_logits(reloaded, input_ids=ref["input_ids"]), before)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model.config.model_type


def test_state_dict_keys_are_the_official_ones(loaded, family) -> None:
    model, _ = loaded[family]
    assert set(model.state_dict()) == _saved_keys(_fixture_dir(family))


def test_config_keeps_unknown_fields(tmp_path) -> None:
    config = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, some_future_field=7)
    config.save_pretrained(tmp_path)
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, LLaDAConfig) and again.some_future_field == 7
    assert again.hidden_size == 32 and again.num_attention_heads == 2


# --------------------------------------------------------------------------------------
# Trainer interface
# --------------------------------------------------------------------------------------


def test_identity_head_returns_final_hidden_states(loaded, family) -> None:
    model, ref = loaded[family]
    head = _head(model)
    assert isinstance(head, nn.Linear)
    full = model(input_ids=ref["input_ids"], output_hidden_states=True)
    model.set_output_embeddings(nn.Identity())
    try:
        hidden = _logits(model, input_ids=ref["input_ids"])
    finally:
        model.set_output_embeddings(head)
    assert _head(model) is head
    assert hidden.shape[-1] == model.config.hidden_size
    assert torch.equal(hidden, full.hidden_states[-1])
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.allclose(head(hidden), full.logits, atol=1e-6)


def test_fully_padded_row_stays_finite(loaded, family) -> None:
    model, ref = loaded[family]
    mask = torch.ones_like(ref["input_ids"])
    mask[1] = 0
    logits = _logits(model, input_ids=ref["input_ids"], attention_mask=mask)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits[0], ref["logits"][0], atol=FP32_TOL)


def test_fixture_loads_every_weight(family) -> None:
    _, info = transformers.AutoModel.from_pretrained(_fixture_dir(family), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_inputs_embeds_and_tuple_output(loaded, family) -> None:
    model, ref = loaded[family]
    ids = ref["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    from_embeds = _logits(model, inputs_embeds=embeds)
    assert torch.equal(from_embeds, _logits(model, input_ids=ids))
    with torch.no_grad():
        as_tuple = model(input_ids=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], from_embeds)


def test_extra_kwargs_are_ignored_and_no_loss(loaded, family) -> None:
    model, ref = loaded[family]
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], labels=ref["input_ids"], num_items_in_batch=3)
    assert out.loss is None
    assert model.accepts_loss_kwargs is False


def test_attention_is_bidirectional(loaded, family) -> None:
    """Changing the last token must change the first position's logits."""
    model, ref = loaded[family]
    ids = ref["input_ids"][:1].clone()
    before = _logits(model, input_ids=ids)
    ids[0, -1] = (ids[0, -1] + 1) % 200
    assert (_logits(model, input_ids=ids)[0, 0] - before[0, 0]).abs().max() > 1e-4


def test_gradient_checkpointing_gives_same_gradients(loaded, family) -> None:
    model, ref = loaded[family]
    model = type(model)(model.config)
    model.load_state_dict(loaded[family][0].state_dict())
    model.train()
    ids, weights = (
        ref["input_ids"],
        torch.randn(ref["logits"].shape, generator=torch.Generator().manual_seed(0)),
    )

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (model(input_ids=ids).logits * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    calls = []
    first_norm = next(
        m for n, m in model.named_modules() if n.endswith(("attn_norm", "input_layernorm"))
    )
    handle = first_norm.register_forward_hook(lambda *_: calls.append(1))
    model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in _blocks(model))
    try:
        checkpointed = grads()
    finally:
        handle.remove()
        model.gradient_checkpointing_disable()
    assert len(calls) == 2, "the block forward should be replayed during backward"
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


def test_class_attributes(family) -> None:
    cls = MODEL_CLASSES[family]
    assert cls.supports_gradient_checkpointing and cls._supports_sdpa
    assert cls.base_model_prefix == "model"
    assert cls._no_split_modules == ["LLaDABlock" if cls is LLaDAModelLM else "DreamDecoderLayer"]


# --------------------------------------------------------------------------------------
# Other geometries ("held-back-like" checks)
# --------------------------------------------------------------------------------------


def _llada_config(**overrides) -> LLaDAConfig:
    base = dict(
        d_model=96,
        n_heads=6,
        n_kv_heads=3,
        n_layers=3,
        mlp_hidden_size=128,
        vocab_size=300,
        embedding_size=320,
        max_sequence_length=64,
        eos_token_id=299,
        pad_token_id=299,
        mask_token_id=298,
    )
    return LLaDAConfig(**{**base, **overrides})


def _dream_config(**overrides) -> DreamConfig:
    base = dict(
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        num_hidden_layers=3,
        intermediate_size=128,
        vocab_size=300,
        max_position_embeddings=64,
        pad_token_id=299,
        eos_token_id=299,
        bos_token_id=297,
        mask_token_id=298,
    )
    return DreamConfig(**{**base, **overrides})


GEOMETRIES = {
    "llada-gqa": (LLaDAModelLM, lambda: _llada_config()),
    "llada-mha-hd32": (LLaDAModelLM, lambda: _llada_config(n_heads=3, n_kv_heads=3)),
    "llada-bias-tied": (
        LLaDAModelLM,
        lambda: _llada_config(include_bias=True, bias_for_layer_norm=None, weight_tying=True),
    ),
    "dream-gqa": (DreamModel, lambda: _dream_config()),
    "dream-mha-hd32": (
        DreamModel,
        lambda: _dream_config(num_attention_heads=3, num_key_value_heads=3),
    ),
    "dream-tied": (DreamModel, lambda: _dream_config(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_other_geometries_roundtrip(geometry, tmp_path) -> None:
    model_cls, make_config = GEOMETRIES[geometry]
    model = _random_model(model_cls, make_config())
    ids = torch.randint(0, 298, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    logits = _logits(model, input_ids=ids, attention_mask=mask)
    assert logits.shape == (2, 12, model.get_output_embeddings().out_features)
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    keys = _saved_keys(tmp_path)
    head_key = "lm_head.weight" if model_cls is DreamModel else "model.transformer.ff_out.weight"
    assert (head_key in keys) == (not model.config.tie_word_embeddings)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is model_cls
    assert torch.equal(_logits(reloaded, input_ids=ids, attention_mask=mask), logits)
    if model.config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_gqa_groups_consecutive_query_heads() -> None:
    """Expanding the kv heads with repeat_interleave into an MHA model gives the same logits."""
    gqa = _random_model(LLaDAModelLM, _llada_config())
    mha = LLaDAModelLM(_llada_config(n_kv_heads=6)).eval()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = state[key].view(3, 16, 96).repeat_interleave(2, dim=0).reshape(96, 96)
    mha.load_state_dict(state)
    ids = torch.randint(0, 298, (1, 10), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(_logits(gqa, input_ids=ids), _logits(mha, input_ids=ids), atol=1e-5)


def test_full_mask_and_position_ids(loaded, family) -> None:
    """A dllm-style [B, 1, L, L] keep-mask equals the 2-D path; position_ids are honoured."""
    model, ref = loaded[family]
    ids, pad = ref["padded_input_ids"], ref["padded_attention_mask"]
    full = (pad[:, None, :, None] * pad[:, None, None, :]).bool()
    if family == "tiny-llada":  # LLaDA masks pad keys only: pad queries still see real keys
        full = pad[:, None, None, :].expand(2, 1, 16, 16).bool()
    assert torch.equal(
        _logits(model, input_ids=ids, attention_mask=full),
        _logits(model, input_ids=ids, attention_mask=pad),
    )
    positions = torch.arange(16)[None].expand(2, -1)
    assert torch.equal(
        _logits(model, input_ids=ids, position_ids=positions), _logits(model, input_ids=ids)
    )
    shifted = _logits(model, input_ids=ids, position_ids=positions + 3)
    assert not torch.allclose(shifted, _logits(model, input_ids=ids))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alibi", True),
        ("block_type", "sequential"),
        ("layer_norm_type", "default"),
        ("activation_type", "swiglu"),
    ],
)
def test_llada_refuses_unsupported_configs(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        LLaDAModelLM(_llada_config(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_act", "gelu"),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("head_dim", 32),
    ],
)
def test_dream_refuses_unsupported_configs(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        DreamModel(_dream_config(**{field: value}))


def test_dream_accepts_consistent_head_dim_key() -> None:
    model = DreamModel(_dream_config(head_dim=16))
    assert model.model.layers[0].self_attn.q_proj.out_features == 96


def test_additive_masks_are_refused(loaded) -> None:
    model, ref = loaded["tiny-llada"]
    additive = torch.zeros(2, 1, 16, 16)
    additive[..., -1] = float("-inf")
    with pytest.raises(ValueError, match="additive"):
        model(input_ids=ref["input_ids"], attention_mask=additive)
