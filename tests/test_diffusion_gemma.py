"""DiffusionGemma: the block-diffusion SFT recipe against a brute-force reference, the
frozen router, shared LoRA adaptors, GA invariance, 4-bit, gradient checkpointing, the
soft-capped chunked head and chunked self-conditioning, family set-up and options.

End-to-end runs (main.py, reload, generation, resume, processes) are in
test_diffusion_gemma_e2e.py. Everything runs on a random 2-layer model (4 experts,
vocabulary 128) built from a config in helpers.py.
"""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DGEMMA_VOCAB,
    gemma_char_tokenizer,
    grad_recorder,
    tiny_diffusion_gemma,
    tiny_diffusion_gemma_dir,
)
from transformers import DynamicCache

from dllm_plugin.config import build_job_config
from dllm_plugin.data.collators import CanvasCollator
from dllm_plugin.diffusion.chunked_ce import chunked_linear_cross_entropy
from dllm_plugin.diffusion.diffusion_gemma_recipe import cache_argument, num_blocks
from dllm_plugin.diffusion.noise import draw_canvas_noise
from dllm_plugin.diffusion.soft_embedding import soft_embeddings
from dllm_plugin.diffusion_gemma_trainer import (
    DiffusionGemmaTrainer,
    DiffusionGemmaTrainingArguments,
)
from dllm_plugin.errors import ConfigError, ModelError
from dllm_plugin.methods import check_method_options, resolve_method
from dllm_plugin.models.diffusion_gemma import prepare_base
from dllm_plugin.models.families import (
    detect_family,
    position_limit,
    prepare_tokenizer,
    read_model_config,
)
from dllm_plugin.models.loading import LoadOptions, load_model
from dllm_plugin.rng import keyed_generator

BLOCK = 8
SEED = 5
CONVERSATIONS = [
    ("hi", "hello there"),  # one block
    ("what colour is the sky at noon?", "blue"),  # long prompt: the sliding window cuts it
    ("1+1?", "two, and some more words than a block"),  # several blocks
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is many times faster than two on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    tok = gemma_char_tokenizer()
    prepare_tokenizer(tok, "diffusion_gemma", {})
    return tok


def features(tokenizer, conversations=CONVERSATIONS) -> list[dict]:
    """Tokenised rows as the data path makes them (prompt = the generation prompt)."""
    rows = []
    for prompt, answer in conversations:
        messages = [{"role": "user", "content": prompt}]
        p = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}])[
            "input_ids"
        ]
        assert full[: len(p)] == p
        rows.append(
            {"input_ids": full, "labels": [-100] * len(p) + full[len(p) :], "prompt_len": len(p)}
        )
    return rows


def make_trainer(tmp_path, model, **options) -> DiffusionGemmaTrainer:
    args = DiffusionGemmaTrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=3,
        seed=SEED,
        **options,
    )
    return DiffusionGemmaTrainer(model=model, args=args)


# ---- the noise -----------------------------------------------------------------------------
def test_block_noise_is_the_documented_keyed_stream():
    blocks = torch.tensor([1, 3, 0, 2])
    noise = draw_canvas_noise(blocks, BLOCK, 100, 1e-3, 0.5, 7, 0, 4, 10)
    for row, n in enumerate(blocks.tolist()):
        g = keyed_generator(7, 0, 4, 10 + row)
        t = 1e-3 + (1 - 1e-3) * torch.rand(1, generator=g)
        u_block, u_coin = torch.rand(2, generator=g).tolist()
        corrupt = torch.rand(BLOCK, generator=g) < t
        tokens = torch.randint(0, 100, (BLOCK,), generator=g)
        assert noise.t[row] == t[0]
        assert noise.block[row] == min(int(u_block * n), max(n - 1, 0))
        assert bool(noise.self_condition[row]) == (u_coin < 0.5)
        assert torch.equal(noise.corrupt[row], corrupt) and torch.equal(noise.tokens[row], tokens)
    # A row's draws do not depend on the other rows.
    alone = draw_canvas_noise(blocks[2:3], BLOCK, 100, 1e-3, 0.5, 7, 0, 4, 12)
    assert torch.equal(alone.tokens[0], noise.tokens[2]) and alone.t[0] == noise.t[2]


# ---- the loss against a brute-force reference ----------------------------------------------
def softcap(logits: torch.Tensor) -> torch.Tensor:
    return torch.tanh(logits.double() / 30.0) * 30.0


def brute_force_loss(model, batch, noise, weight: float, scope: str) -> float:
    """The recipe computed the way generation runs the model, one row at a time.

    Per row: the encoder reads prompt + the clean blocks before the scored one into the
    inference cache (sliding layers keep sliding_window - 1 keys); the decoder denoises
    the noised block at the positions that follow (pass 1, then pass 2 with pass 1's
    logits when the row's coin came up); CE over every position of the block. The
    encoder loss: the model's encoder over the row alone, its head, the soft-cap, next-
    token CE. Token means over the batch.
    """
    text = model.config.get_text_config()
    diffusion, n_diffusion, encoder, n_encoder = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for r in range(batch["input_ids"].shape[0]):
            prompt, response = int(batch["prompt_len"][r]), int(batch["response_len"][r])
            row = batch["input_ids"][r, : prompt + response]
            start = prompt + int(noise.block[r]) * BLOCK
            clean = row[start : start + BLOCK]
            noised = torch.where(noise.corrupt[r], noise.tokens[r], clean)
            cache = {cache_argument(model): DynamicCache(config=text)}  # its name: 5.24 / older
            model.model.encoder(input_ids=row[None, :start], **cache)
            step = {**cache, "decoder_input_ids": noised[None]}
            first = model(**step).logits
            second = model(
                **step, self_conditioning_logits=first if noise.self_condition[r] else None
            ).logits
            diffusion += F.cross_entropy(second[0].double(), clean, reduction="sum").item()
            n_diffusion += BLOCK
            hidden = model.model.encoder(input_ids=row[None]).last_hidden_state
            logits = softcap(model.lm_head(hidden))[0, :-1]
            first_target = 1 if scope == "sequence" else prompt
            ce = F.cross_entropy(logits, row[1:], reduction="none")[first_target - 1 :]
            encoder += ce.sum().item()
            n_encoder += ce.numel()
    return diffusion / n_diffusion + weight * encoder / n_encoder


@pytest.mark.parametrize(
    ("attention", "masked_only", "scope", "weight"),
    [
        ("sdpa", True, "sequence", 1.0),
        ("sdpa", False, "response", 0.7),
        ("eager", True, "response", 1.0),
    ],
)
def test_loss_equals_brute_force(tmp_path, tokenizer, attention, masked_only, scope, weight):
    model = tiny_diffusion_gemma(seed=1, attn=attention)
    trainer = make_trainer(
        tmp_path, model, score_masked_only=masked_only, encoder_loss_scope=scope,
        encoder_loss_weight=weight,
    )  # fmt: skip
    batch = CanvasCollator(0, 1, BLOCK)(features(tokenizer))
    model.train()  # no dropout in this model; train mode is what compute_loss sees
    loss = trainer.compute_loss(model, batch)
    # The trainer's draws for step 0, rows 0..2 (the keyed stream tested above).
    noise = draw_canvas_noise(
        num_blocks(batch, BLOCK), BLOCK, DGEMMA_VOCAB, 1e-3, 0.5, SEED, 0, 0, 0
    )
    assert noise.self_condition.tolist() == [True, True, False]  # both kinds of rows
    assert noise.block.tolist()[2] > 0 and noise.corrupt.any() and not noise.corrupt.all()
    assert batch["prompt_len"][1] > model.config.get_text_config().sliding_window
    expected = brute_force_loss(model, batch, noise, weight, scope)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_chunked_and_full_logits_paths_give_the_same_gradients(tmp_path, tokenizer):
    batch = CanvasCollator(0, 1, BLOCK)(features(tokenizer))
    grads = []
    for masked_only in (True, False):
        model = tiny_diffusion_gemma(seed=2)
        prepare_base(model)
        trainer = make_trainer(tmp_path, model, score_masked_only=masked_only)
        model.train()
        trainer.compute_loss(model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # The embedding gets gradient through the self-conditioning input too.
    assert "model.encoder.language_model.embed_tokens.weight" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6)


def test_router_and_vision_tower_get_no_gradient(tmp_path, tokenizer):
    folder = tiny_diffusion_gemma_dir(tmp_path / "model")
    model = load_model(str(folder), "diffusion_gemma", LoadOptions(dtype="float32")).model
    trainer = make_trainer(tmp_path / "out", model)
    batch = CanvasCollator(0, 1, BLOCK)(features(tokenizer))
    model.train()
    trainer.compute_loss(model, batch).backward()
    params = dict(model.named_parameters())
    router = [n for n in params if ".router." in n]
    assert len(router) == 2 * 3  # per layer: proj, scale, per_expert_scale
    for name in router:
        assert not params[name].requires_grad and params[name].grad is None, name
    assert all(p.grad is None for n, p in params.items() if "vision" in n)
    trained = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("self_attn.q_proj", "mlp.down_proj", "experts.gate_up_proj", "embed_tokens",
                 "self_conditioning.gate_proj"):  # fmt: skip
        assert any(part in n for n in trained), part


# ---- gradient accumulation ------------------------------------------------------------------
def run_steps(tmp_path, tokenizer, batch_size: int, accumulation: int):
    answers = ["a", "two words", "a longer answer over blocks", "xyz", "ok", "yes", "no", "hm"]
    rows = features(tokenizer, [(f"q{i}?" * (1 + i % 3), a) for i, a in enumerate(answers)])
    recorder = grad_recorder()
    model = tiny_diffusion_gemma(seed=3)
    prepare_base(model)
    args = DiffusionGemmaTrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=11,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    trainer = DiffusionGemmaTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=CanvasCollator(0, 1, BLOCK),
        callbacks=[recorder],
    )
    trainer.train()
    history = trainer.state.log_history
    return [h["loss"] for h in history if "loss" in h], recorder.grads


def test_loss_and_gradients_do_not_depend_on_gradient_accumulation(tmp_path, tokenizer):
    """Rows of different lengths: padding is masked out, so batch widths may differ."""
    losses_1, grads_1 = run_steps(tmp_path / "a", tokenizer, 4, 1)
    losses_2, grads_2 = run_steps(tmp_path / "b", tokenizer, 2, 2)
    assert len(losses_1) == len(losses_2) == 2
    assert losses_1 == pytest.approx(losses_2, rel=1e-5)
    assert losses_1[0] > 5.0  # diffusion + encoder CE near 2 ln(128): not scaled away
    for name, grad in grads_1[0].items():
        torch.testing.assert_close(grad, grads_2[0][name], rtol=1e-4, atol=1e-6)


# ---- LoRA, gradient checkpointing, 4-bit ---------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_diffusion_gemma_dir(tmp_path_factory.mktemp("tiny-dgemma"))


def adaptor_modules(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, BaseTunerLayer)
    }


def test_lora_wraps_only_the_text_stack_projections_once(model_dir):
    loaded = load_model(str(model_dir), "diffusion_gemma", LoadOptions(lora=True, dtype="float32"))
    wrapped = adaptor_modules(loaded.model)
    expected = {
        f"model.{tree}layers.{i}.{name}"
        for tree in ("encoder.language_model.", "decoder.")
        for i in range(2)
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )  # fmt: skip
    } | {
        f"model.{tree}layers.0.self_attn.v_proj" for tree in ("encoder.language_model.", "decoder.")
    }
    assert set(wrapped) == expected  # layer 1 is full attention: no v_proj
    assert sorted(loaded.lora_targets) == sorted(n for n in expected if ".encoder." in n)
    # One adaptor per projection, used by both passes.
    for name, module in wrapped.items():
        if ".decoder." in name:
            twin = name.replace("decoder.", "encoder.language_model.")
            assert module is wrapped[twin], name
    lora = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 13 and all("lora_" in n for n in lora)


def test_lora_target_names_are_checked_against_this_family(model_dir):
    with pytest.raises(ModelError, match="proj match no Linear module") as err:
        load_model(
            str(model_dir),
            "diffusion_gemma",
            LoadOptions(lora=True, lora_target_modules="q_proj,proj"),
        )
    assert "router" not in str(err.value) and "linear" not in str(err.value)
    loaded = load_model(
        str(model_dir), "diffusion_gemma", LoadOptions(lora=True, lora_target_modules="q_proj")
    )
    assert len(adaptor_modules(loaded.model)) == 4


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tokenizer, model_dir, lora):
    batch = CanvasCollator(0, 1, BLOCK)(features(tokenizer))
    grads = []
    for checkpointing in (False, True):
        opts = LoadOptions(
            dtype="float32", lora=lora, lora_dropout=0.0, gradient_checkpointing=checkpointing
        )
        model = load_model(str(model_dir), "diffusion_gemma", opts).model
        trainer = make_trainer(tmp_path, model)
        model.train()
        trainer.compute_loss(model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7)


def test_4bit_quantises_the_text_projections_and_trains(tmp_path, tokenizer, model_dir):
    from dllm_plugin.models.loading import check_bitsandbytes

    try:
        check_bitsandbytes()
    except ModelError as e:
        pytest.skip(str(e))
    opts = LoadOptions(dtype="float32", lora=True, load_in_4bit=True, lora_dropout=0.0)
    model = load_model(str(model_dir), "diffusion_gemma", opts).model
    from bitsandbytes.nn import Linear4bit

    modules = dict(model.get_base_model().named_modules(remove_duplicate=False))
    quantised = {
        n.removesuffix(".base_layer") for n, m in modules.items() if isinstance(m, Linear4bit)
    }
    assert quantised == set(adaptor_modules(model))  # both trees' projections, nothing else
    for kept in ("lm_head", "router.proj", "self_conditioning.gate_proj", "q_proj.linear"):
        found = [m for n, m in modules.items() if n.endswith(kept)]
        assert found and all(type(m) is torch.nn.Linear for m in found), kept
    # The experts (3-D parameters) stay unquantised in their dtype, not upcast.
    experts = model.get_base_model().model.encoder.language_model.layers[0].experts
    assert experts.gate_up_proj.dtype == torch.float32 and not experts.gate_up_proj.requires_grad
    trainer = make_trainer(tmp_path, model)
    model.train()
    loss = trainer.compute_loss(model, CanvasCollator(0, 1, BLOCK)(features(tokenizer)))
    loss.backward()
    assert 5.0 < loss.item() < 15.0
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert len(lora_grads) == 13 and all(g is not None for g in lora_grads)


# ---- the chunked head pieces ----------------------------------------------------------------
def test_chunked_softcapped_ce_matches_capped_logits():
    torch.manual_seed(0)
    hidden = (3 * torch.randn(13, 8)).requires_grad_()
    weight = (3 * torch.randn(50, 8)).requires_grad_()
    bias = torch.randn(50).requires_grad_()
    targets = torch.randint(0, 50, (13,))
    targets[3] = -100
    token_weights = torch.rand(13)
    total, ce = chunked_linear_cross_entropy(
        hidden, weight, bias, targets, token_weights, chunk_size=4, softcap=5.0
    )
    total.backward()
    ours = [hidden.grad, weight.grad, bias.grad]
    for t in (hidden, weight, bias):
        t.grad = None
    capped = torch.tanh((hidden @ weight.T + bias) / 5.0) * 5.0
    reference = F.cross_entropy(capped, targets, reduction="none", ignore_index=-100)
    (token_weights * reference).sum().backward()
    torch.testing.assert_close(ce, reference.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(ours, [hidden.grad, weight.grad, bias.grad], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_soft_embeddings_match_the_models_self_conditioning_input():
    """softmax(capped logits) @ E * scale, as the decoder computes it, gradient to E."""
    torch.manual_seed(0)
    hidden = torch.randn(11, 16)
    embed = torch.randn(40, 16).requires_grad_()
    scale = torch.tensor(4.0)
    ours = soft_embeddings(hidden, embed, embed, scale, 30.0, chunk_rows=3)
    upstream = torch.randn_like(ours)
    (ours * upstream).sum().backward()
    grad = embed.grad
    embed.grad = None
    logits = torch.tanh((hidden @ embed.detach().T) / 30.0) * 30.0
    reference = logits.softmax(-1) @ embed * scale
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, embed.grad, rtol=1e-5, atol=1e-6)


# ---- family and options ---------------------------------------------------------------------
def test_family_detection_and_tokenizer_setup(model_dir, tokenizer):
    config = read_model_config(str(model_dir))
    assert detect_family(config) == "diffusion_gemma"
    assert (
        detect_family({"architectures": ["DiffusionGemmaForBlockDiffusion"]}) == "diffusion_gemma"
    )
    assert resolve_method("auto", "diffusion_gemma", "m").name == "diffusion_gemma"
    assert position_limit(config, "diffusion_gemma") == 512  # from text_config
    ids = prepare_tokenizer(gemma_char_tokenizer(), "diffusion_gemma", config)
    # No mask token; padding is the tokenizer's own pad (masked out, not trained).
    assert (ids.mask_id, ids.eos_id, ids.pad_id, ids.bos_id) == (None, 1, 0, 2)
    assert ids.stop_ids == (1, 4)  # <eos>, <turn|>
    # The answer span the data path supervises: the answer and its turn end, not the header.
    row = features(tokenizer, [("hi", "yo")])[0]
    answer = tokenizer.decode(row["input_ids"][row["prompt_len"] :])
    assert answer == "yo<turn|>\n"


def test_canvas_collator_fills_answers_with_eos_to_whole_blocks():
    rows = [
        {"input_ids": [2, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8], "prompt_len": 2},
        {"input_ids": [2, 5, 6, 9, 9, 9, 9, 9, 9, 9, 9, 9], "labels": [0] * 12, "prompt_len": 3},
    ]
    batch = CanvasCollator(pad_token_id=0, eos_token_id=1, block_size=4)(rows)
    assert batch["input_ids"].tolist() == [
        [2, 5, 6, 7, 8, 1] + [0] * 9,
        [2, 5, 6] + [9] * 9 + [1, 1, 1],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 9, [1] * 15]
    assert batch["prompt_len"].tolist() == [2, 3] and batch["response_len"].tolist() == [4, 12]


@pytest.mark.parametrize(
    "option",
    [
        {"loss_weight_type": "scheduler"},
        {"mdlm_loss_weight_type": "uniform"},
        {"noise_schedule": "cosine"},
        {"perbatch_cutoff": False},
        {"loss_norm_type": "sequence"},
        {"mask_prompt_loss": False},
        {"block_size": 64},
        {"timestep_sampling": "stratified"},
        {"complementary_masking": True},
    ],
)
def test_options_of_other_methods_are_config_errors(option):
    (name,) = option
    with pytest.raises(
        ConfigError, match=f"{name}: .* has no effect with training_method 'diffusion_gemma'"
    ):
        build_job_config({"model_name": "m", "training_method": "diffusion_gemma", **option})
    cfg = build_job_config({"model_name": "m", "training_method": "auto", **option})
    with pytest.raises(ConfigError):  # auto: checked once the model's family is known
        check_method_options(resolve_method("auto", "diffusion_gemma", "m"), cfg)


def test_packing_and_bd3lm_are_config_errors():
    from dllm_plugin.methods import check_packing, method_row

    with pytest.raises(ConfigError, match="packing: training_method 'diffusion_gemma' does not"):
        check_packing(method_row("diffusion_gemma"), {"model_type": "diffusion_gemma"})
    with pytest.raises(ConfigError, match="diffusion_type: 'bd3lm' is not available"):
        build_job_config(
            {"model_name": "m", "training_method": "diffusion_gemma", "diffusion_type": "bd3lm"}
        )


def test_diffusion_gemma_options_are_manifest_parameters_with_the_recipe_defaults():
    cfg = build_job_config({"model_name": "m", "training_method": "diffusion_gemma"})
    assert (cfg.canvas_length, cfg.encoder_loss_weight, cfg.encoder_loss_scope) == (
        0,
        1.0,
        "sequence",
    )
    assert (cfg.self_conditioning_prob, cfg.time_epsilon) == (0.5, 1e-3)
    from dllm_plugin.methods import METHODS
    from dllm_plugin.training_args import method_options

    options = method_options(
        cfg, METHODS[("diffusion_gemma", "mdlm")], DiffusionGemmaTrainingArguments
    )
    assert options["self_conditioning_prob"] == 0.5 and "loss_weight_type" not in options


# ---- evaluation ----------------------------------------------------------------------------
def test_lm_eval_generates_with_the_models_sampler_and_refuses_loglikelihood(tokenizer):
    """No masked-diffusion ELBO for this method: lm-eval's log-likelihoods are refused in
    one line; generate_until answers with the method's sampler (the model's generate)."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from dllm_plugin.evaluation.lm_eval_model import DiffusionLM, Loaded
    from dllm_plugin.sampling import SamplingConfig

    model = tiny_diffusion_gemma(seed=2)
    ids = prepare_tokenizer(tokenizer, "diffusion_gemma", {})
    method = resolve_method("auto", "diffusion_gemma", "m")
    lm = DiffusionLM(loaded=Loaded(model, tokenizer, ids, method), max_new_tokens=8, seed=5)
    with pytest.raises(ModelError, match="loglikelihood: training_method 'diffusion_gemma'"):
        lm.loglikelihood([SimpleNamespace(args=("hi", " yo"))])
    [text] = lm.generate_until([SimpleNamespace(args=("hi", {"max_gen_toks": 8, "until": []}))])
    prompt = [*lm._prefix, *lm._encode("hi")]
    config = SamplingConfig(max_new_tokens=8, steps=8, block_size=8, seed=5)
    tokens = method.sampler_function()(
        model, [prompt], mask_id=None, stop_ids=ids.stop_ids, pad_id=ids.pad_id, config=config
    )[0]
    assert text == tokenizer.decode(tokens, skip_special_tokens=True) and len(tokens) > 0
