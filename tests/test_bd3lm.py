"""Block diffusion (BD3LM): the attention layout, the noise, the loss against brute force,
the block sampler with and without key/value reuse, and a trained model's answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import PAIRS, run_pairs_job, shared_fixture, tiny_bert_mlm
from transformers import AutoModelForMaskedLM

from dllm_plugin import generate
from dllm_plugin.block_sampler import (
    _BlockModel,
    generate_bd3lm,
    generate_bd3lm_shifted,
    supports_kv_cache,
)
from dllm_plugin.data.collators import MDLMCollator
from dllm_plugin.diffusion.blocks import (
    attention_mask_for,
    bd3lm_keep_mask,
    bd3lm_position_ids,
    block_causal_keep_mask,
    draw_block_noise,
)
from dllm_plugin.diffusion.schedules import LinearSchedule
from dllm_plugin.rng import keyed_generator
from dllm_plugin.sampling import SamplingConfig
from dllm_plugin.trainers import (
    BD3LMTrainer,
    BD3LMTrainingArguments,
    DreamBD3LMTrainer,
    DreamBD3LMTrainingArguments,
)

EPS = 1e-3


# ---- the layout ---------------------------------------------------------------------------
def allowed_by_definition(q: int, k: int, length: int, block: int) -> bool:
    """BD3LM's attention, case by case: noised block b sees itself and the clean blocks
    before b; clean block b sees the clean blocks up to b; clean never sees noised."""
    q_noised, k_noised = q < length, k < length
    q_block, k_block = (q % length) // block, (k % length) // block
    if q_noised and k_noised:
        return q_block == k_block
    if q_noised:
        return k_block < q_block
    if k_noised:
        return False
    return k_block <= q_block


@pytest.mark.parametrize(("length", "block"), [(4, 1), (4, 2), (8, 4), (12, 3), (12, 12), (16, 4)])
def test_attention_mask_matches_its_definition(length, block):
    keep = bd3lm_keep_mask(length, block)
    expected = torch.tensor(
        [
            [allowed_by_definition(q, k, length, block) for k in range(2 * length)]
            for q in range(2 * length)
        ]
    )
    assert torch.equal(keep, expected)
    causal = block_causal_keep_mask(length, block)
    assert torch.equal(causal, keep[length:, length:])  # the clean half is the sampler's prefix
    assert bd3lm_position_ids(length).tolist() == list(range(length)) * 2


def test_attention_mask_formats():
    keep = block_causal_keep_mask(4, 2)
    llada = AutoModelForMaskedLM.from_pretrained(shared_fixture("tiny-llada"))
    assert attention_mask_for(llada, keep).dtype == torch.bool
    eager = SimpleNamespace(
        config=SimpleNamespace(_attn_implementation="eager"),
        parameters=lambda: iter([torch.zeros(1)]),
    )
    additive = attention_mask_for(eager, keep)
    assert additive.shape == (1, 1, 4, 4) and bool((additive[0, 0][keep] == 0).all())
    assert bool((additive[0, 0][~keep] == torch.finfo(torch.float32).min).all())
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="flash_attention_2"):
        attention_mask_for(flash, keep)


# ---- noise --------------------------------------------------------------------------------
def reference_block_noise(seed, phase, step, labels, block):
    """The documented draw: per row, times from a generator keyed (..., row, "t"), one per
    block, and mask uniforms from one keyed (..., row, "mask")."""
    ts, masked = [], []
    rows, length = labels.shape
    for row in range(rows):
        n_blocks = -(-length // block)
        t_blocks = EPS + (1 - EPS) * torch.rand(
            n_blocks, generator=keyed_generator(seed, phase, step, row, "t")
        )
        t = torch.tensor([float(t_blocks[j // block]) for j in range(length)])
        u = torch.rand(length, generator=keyed_generator(seed, phase, step, row, "mask"))
        ts.append(t)
        masked.append((u < t) & (labels[row] != -100))
    return torch.stack(ts), torch.stack(masked)


def test_block_noise_is_one_time_per_block_and_does_not_depend_on_the_batch_width():
    labels = torch.full((3, 12), 7)
    labels[0, :5] = -100
    t, masked = draw_block_noise(labels != -100, 4, LinearSchedule(), EPS, 9, 0, 2, 0)
    ref_t, ref_masked = reference_block_noise(9, 0, 2, labels, 4)
    assert torch.allclose(t, ref_t) and torch.equal(masked, ref_masked)
    assert not masked[0, :5].any()
    assert all(len(set(t[r, b * 4 : b * 4 + 4].tolist())) == 1 for r in range(3) for b in range(3))
    wider = torch.cat([labels, torch.full((3, 8), -100)], dim=1)
    t2, masked2 = draw_block_noise(wider != -100, 4, LinearSchedule(), EPS, 9, 0, 2, 0)
    assert torch.equal(t2[:, :12], t) and torch.equal(masked2[:, :12], masked)


# ---- collator -----------------------------------------------------------------------------
def test_collator_fills_each_answer_to_whole_blocks_and_leaves_batch_padding_unscored():
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5], "prompt_len": 2},
        {
            "input_ids": list(range(1, 11)),
            "labels": [-100] * 3 + list(range(4, 11)),
            "prompt_len": 3,
        },
    ]
    batch = MDLMCollator(pad_token_id=9, block_size=4)(features)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 9, 9, 9, 9, 9, 9, 9]
    assert batch["labels"][0].tolist() == [-100, -100, 3, 4, 5, 9, 9, 9] + [-100] * 4
    assert batch["labels"][1].tolist() == [-100] * 3 + list(range(4, 11)) + [9, 9]
    shifted = MDLMCollator(pad_token_id=9, block_size=4, ignore_first_token=True)(
        [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "prompt_len": 0}]
    )
    assert shifted["labels"][0].tolist() == [-100, 2, 3, 9]


# ---- the loss against a brute-force loop ----------------------------------------------------
def features(vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((11, 3), (6, 2), (14, 5)):
        ids = torch.randint(0, vocab - 12, (length,), generator=g).tolist()
        rows.append(
            {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_len": prompt}
        )
    return rows


def brute_force_bd3lm(model, batch, t, masked, mask_id, block, shift, cart_p=None):
    """Per row and block: one forward of [clean earlier blocks ; noised block] under the
    block-causal mask; CE at the block's masked positions (shifted: from the position to
    the left), weight 1/t of the block (or CART over the tokens the block sees), over the
    batch's maskable count."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, length = ids.shape
    noised = torch.where(masked, torch.full_like(ids, mask_id), ids)
    total = 0.0
    for r in range(rows):
        for b in range(length // block):
            lo, hi = b * block, (b + 1) * block
            if not masked[r, lo:hi].any():
                continue
            seq = torch.cat([ids[r, :lo], noised[r, lo:hi]])[None]
            keep = torch.tensor([[j // block <= i // block for j in range(hi)] for i in range(hi)])
            with torch.no_grad():
                logits = (
                    model(
                        input_ids=seq,
                        attention_mask=keep[None, None],
                        position_ids=torch.arange(hi)[None],
                    )
                    .logits[0]
                    .double()
                )
            for i in range(lo, hi):
                if not masked[r, i]:
                    continue
                ce = -torch.log_softmax(logits[i - 1 if shift else i], -1)[ids[r, i]].item()
                if cart_p is None:
                    w = 1.0 / t[r, i].item()
                else:
                    seen = [j for j in range(hi) if j != i and (j < lo or not masked[r, j])]
                    w = sum(0.5 * cart_p * (1 - cart_p) ** (abs(i - j) - 1) for j in seen)
                total += w * ce
    return total / (labels != -100).sum().item()


def tiny_a2d_qwen2(attn: str):
    from dllm_plugin.models.a2d import A2DQwen2Config, A2DQwen2ForMaskedLM

    torch.manual_seed(0)
    config = A2DQwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = attn
    return A2DQwen2ForMaskedLM(config)


def tiny_bert(vocab: int = 64):
    torch.manual_seed(0)
    return tiny_bert_mlm(vocab)


MODELS = {
    # name: (build, mask id, pad id)
    "bert": (tiny_bert, 63, 62),
    "a2d-qwen2": (lambda: tiny_a2d_qwen2("sdpa"), 63, 62),
    "llada": (lambda: AutoModelForMaskedLM.from_pretrained(shared_fixture("tiny-llada")), 250, 249),
}


def make_trainer(cls, tmp_path, model, mask_id, **options):
    arguments = DreamBD3LMTrainingArguments if cls is DreamBD3LMTrainer else BD3LMTrainingArguments
    args = arguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, seed=5, **options)
    return cls(model=model, args=args, mask_token_id=mask_id, bos_token_id=None)


@pytest.mark.parametrize("masked_only", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_loss_equals_brute_force(tmp_path, name, masked_only):
    build, mask_id, pad_id = MODELS[name]
    model = build()
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = MDLMCollator(pad_token_id=pad_id, block_size=4)(features(vocab, 1))
    trainer = make_trainer(
        BD3LMTrainer, tmp_path, model, mask_id, block_size=4, score_masked_only=masked_only
    )
    model.train()
    loss = trainer.compute_loss(model, batch)
    t, masked = reference_block_noise(5, 0, 0, batch["labels"], 4)
    assert masked.any() and (~masked & (batch["labels"] != -100)).any()
    expected = brute_force_bd3lm(model.eval(), batch, t, masked, mask_id, 4, shift=False)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weighting", ["cart[geo_p:0.3]", "scheduler"])
def test_dream_loss_shifted_across_blocks_equals_brute_force(tmp_path, weighting):
    """Dream: a block's first token is scored from the clean copy's previous token."""
    model = AutoModelForMaskedLM.from_pretrained(shared_fixture("tiny-dream"))
    batch = MDLMCollator(pad_token_id=250, block_size=4, ignore_first_token=True)(features(254, 2))
    trainer = make_trainer(
        DreamBD3LMTrainer, tmp_path, model, 254, block_size=4, loss_weight_type=weighting
    )
    model.train()
    loss = trainer.compute_loss(model, batch)
    t, masked = reference_block_noise(5, 0, 0, batch["labels"], 4)
    starts = masked[:, 4::4]
    assert starts.any(), "no block-start position is masked: the cross-block shift is untested"
    cart_p = 0.3 if weighting.startswith("cart") else None
    expected = brute_force_bd3lm(model.eval(), batch, t, masked, 254, 4, shift=True, cart_p=cart_p)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- the evaluation bound (class methods: evaluation/elbo.py, lm-eval) ----------------------
def bound_draws(n: int, seed: int) -> tuple[torch.Tensor, list, list]:
    """(u, generators, an identical second set of generators) for n draws."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u, *[[torch.Generator().manual_seed(seed + i) for i in range(n)] for _ in range(2)]


def brute_force_bound(model, ids, masked, weight, mask_id, block, shift):
    """Per row: each block scored by a forward of [clean earlier blocks ; noised block]
    under the block-causal mask; sum of weight * CE over the masked positions."""
    noised = torch.where(masked, torch.full_like(ids, mask_id), ids)
    totals = []
    for r in range(ids.shape[0]):
        total = 0.0
        for lo in range(0, ids.shape[1], block):
            hi = lo + block
            seq = torch.cat([ids[r, :lo], noised[r, lo:hi]])[None]
            keep = torch.tensor([[j // block <= i // block for j in range(hi)] for i in range(hi)])
            with torch.no_grad():
                logits = model(
                    input_ids=seq,
                    attention_mask=keep[None, None],
                    position_ids=torch.arange(hi)[None],
                ).logits[0]
            for i in range(lo, hi):
                if masked[r, i]:
                    source = logits[i - 1 if shift else i].double()
                    total += weight[r, i].item() * -torch.log_softmax(source, -1)[ids[r, i]].item()
        totals.append(total)
    return torch.tensor(totals, dtype=torch.float64)


BOUND_MODELS = {
    # name: (build, trainer, mask id)
    "bert": (tiny_bert, BD3LMTrainer, 63),
    "llada": (lambda: MODELS["llada"][0](), BD3LMTrainer, 250),
    "dream": (
        lambda: AutoModelForMaskedLM.from_pretrained(shared_fixture("tiny-dream")),
        DreamBD3LMTrainer,
        254,
    ),
}


@pytest.mark.parametrize("name", list(BOUND_MODELS))
def test_block_bound_equals_brute_force(name):
    """The held-out bound of block diffusion: per block, MDLM's count form at its own
    level, scored in the training layout; rows are filled to whole blocks with masks."""
    from dllm_plugin.models.families import TokenIds

    build, trainer, mask_id = BOUND_MODELS[name]
    model = build().eval()
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt of 3; answers of 7 end mid-block
    view_ids, view_labels = trainer.model_view(ids, labels, None)
    u, generators, same = bound_draws(3, 11)
    token_ids = TokenIds(mask_id=mask_id, eos_id=1, pad_id=0, bos_id=None, stop_ids=(1,))
    scorer = trainer.with_block_size(4)
    with torch.no_grad():
        bound = scorer.nll_bound(model, None, view_ids, view_labels, u, generators, token_ids)
    filled = torch.cat([view_ids, torch.full((3, 2), mask_id)], 1)
    scored = torch.cat([view_labels, torch.full((3, 2), -100)], 1) != -100
    masked, weight = trainer.elbo_noise(scored, u, same, block_size=4)
    for r in range(3):  # MDLM's count form in every block: weights sum to its scored tokens
        for lo in range(0, 12, 4):
            n = int(scored[r, lo : lo + 4].sum())
            assert weight[r, lo : lo + 4].sum().item() == pytest.approx(n)
            assert masked[r, lo : lo + 4].sum() >= min(n, 1)
    expected = brute_force_bound(
        model, filled, masked, weight, mask_id, 4, shift=trainer.shift_logits
    )
    torch.testing.assert_close(bound.double(), expected, rtol=1e-5, atol=1e-5)


def test_block_bound_with_one_block_is_the_mdlm_bound():
    from dllm_plugin.models.families import TokenIds
    from dllm_plugin.trainers import MDLMTrainer

    model = tiny_bert().eval()
    ids = torch.randint(0, 60, (4, 8), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :2] = -100
    u, generators, same = bound_draws(4, 2)
    token_ids = TokenIds(mask_id=63, eos_id=62, pad_id=62, bos_id=None, stop_ids=(62,))
    with torch.no_grad():
        block = BD3LMTrainer.with_block_size(8).nll_bound(
            model, None, ids, labels, u, generators, token_ids
        )
        mdlm = MDLMTrainer.nll_bound(model, None, ids, labels, u, same, token_ids)
    torch.testing.assert_close(block, mdlm, rtol=1e-5, atol=1e-6)


def test_block_bound_needs_the_trained_block_size():
    from dllm_plugin.errors import ModelError
    from dllm_plugin.methods import method_row

    with pytest.raises(ModelError, match="block size the model was trained with is unknown"):
        method_row("llada", "bd3lm").bound_scorer(None)
    assert method_row("llada", "bd3lm").bound_scorer(8).block_size == 8
    assert method_row("llada").bound_scorer(8) is method_row("llada").trainer_class()


def test_eager_attention_takes_an_additive_mask(tmp_path):
    batch = MDLMCollator(pad_token_id=62, block_size=4)(features(64, 3))
    losses = []
    for attn in ("sdpa", "eager"):
        model = tiny_a2d_qwen2(attn)
        trainer = make_trainer(BD3LMTrainer, tmp_path / attn, model, 63, block_size=4)
        losses.append(trainer.compute_loss(model.train(), batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_rows_outputs_do_not_depend_on_trailing_padding_blocks():
    model = AutoModelForMaskedLM.from_pretrained(shared_fixture("tiny-llada")).eval()
    ids = torch.randint(0, 240, (1, 8), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([ids, torch.full((1, 8), 249)], dim=1)
    outs = []
    for x in (ids, padded):
        length = x.shape[1]
        with torch.no_grad():
            outs.append(
                model(
                    input_ids=torch.cat([x, x], 1),
                    attention_mask=bd3lm_keep_mask(length, 4)[None, None],
                    position_ids=bd3lm_position_ids(length)[None],
                ).logits[0, :8]
            )
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


# ---- the block sampler ------------------------------------------------------------------
def query_lengths(model):
    """Record every forward's number of query tokens."""
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    return seen


SAMPLERS = {
    "llada": ("tiny-llada", generate_bd3lm, 250),
    "dream": ("tiny-dream", generate_bd3lm_shifted, 254),
    "a2d-qwen2": (None, generate_bd3lm, 63),
}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_with_and_without_key_value_reuse_gives_identical_tokens(name, temperature):
    fixture, sampler, mask_id = SAMPLERS[name]
    model = (
        tiny_a2d_qwen2("sdpa")
        if fixture is None
        else AutoModelForMaskedLM.from_pretrained(shared_fixture(fixture))
    )
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, vocab - 12, (n,), generator=g).tolist() for n in (9, 8, 3)]
    config = SamplingConfig(
        max_new_tokens=13, steps=13, block_size=4, temperature=temperature, seed=2
    )
    assert supports_kv_cache(model)
    seen = query_lengths(model)
    reused = sampler(
        model, prompts, mask_id=mask_id, stop_ids=[], pad_id=None, config=config, reuse_cache=True
    )
    assert seen and set(seen) == {4}  # every forward (denoising and commit) reads one block
    seen.clear()
    full = sampler(
        model, prompts, mask_id=mask_id, stop_ids=[], pad_id=None, config=config, reuse_cache=False
    )
    assert reused == full and all(len(r) == 13 for r in reused)
    assert max(seen) > 4  # without reuse the prefix is read again


def test_sampler_without_a_cache_runs_bert_and_stops_at_a_stop_id():
    model = tiny_bert()
    assert not supports_kv_cache(model)
    config = SamplingConfig(max_new_tokens=8, steps=8, block_size=4)
    out = generate_bd3lm(
        model, [[5, 6, 7, 8, 9]], mask_id=63, stop_ids=[], pad_id=None, config=config
    )
    assert len(out[0]) == 8

    class AlwaysStop(torch.nn.Module):
        """Predicts the stop id everywhere; counts forwards."""

        def forward(
            self, input_ids, position_ids=None, attention_mask=None, cache=None, use_cache=None
        ):
            self.calls = getattr(self, "calls", 0) + 1
            logits = torch.zeros(*input_ids.shape, 16)
            logits[..., 3] = 5.0
            return SimpleNamespace(logits=logits)

    stopper = AlwaysStop()
    config = SamplingConfig(max_new_tokens=40, steps=40, block_size=4)
    out = generate_bd3lm(
        stopper, [[1, 2, 1, 2, 1, 2]], mask_id=15, stop_ids=[3], pad_id=None, config=config
    )
    assert out == [[]]
    assert stopper.calls == 1 + 2  # one prompt block committed, then one block of 2 masks


@pytest.mark.parametrize(
    ("fixture", "shift", "mask_id"), [("tiny-llada", False, 250), ("tiny-dream", True, 254)]
)
def test_sampler_sees_a_block_exactly_as_training_does(fixture, shift, mask_id):
    """One block alignment: the denoising forward of block b (prompt tail included, block
    grid from the first token) gives the training layout's logits for noised block b."""
    model = AutoModelForMaskedLM.from_pretrained(shared_fixture(fixture)).eval()
    x0 = torch.randint(0, 240, (12,), generator=torch.Generator().manual_seed(8))
    xt = x0.clone()
    xt[9:] = mask_id  # block 2 holds the prompt's tail (8) and three masks
    layout = torch.cat([torch.cat([x0[:8], xt[8:]]), x0])[None]
    with torch.no_grad():
        train = model(
            input_ids=layout,
            attention_mask=bd3lm_keep_mask(12, 4)[None, None],
            position_ids=bd3lm_position_ids(12)[None],
        ).logits[0]
        runner = _BlockModel(model, mask_id, 4, reuse=True)
        last = None
        for start in (0, 4):
            last = runner.commit(x0[start : start + 4], start)
        block_logits, _ = runner.denoise(xt, 8)
    expected = train[8:12].clone()
    if shift:  # columns 8..11 are scored by 7 (clean copy: 12 + 7) and noised 8..10
        expected = torch.cat([train[12 + 7][None], train[8:11]])
        block_logits = torch.cat([last[None], block_logits[:-1]])
    expected[:, mask_id] = -torch.inf
    torch.testing.assert_close(block_logits, expected.float(), rtol=0, atol=1e-5)


# ---- training end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_dream(tmp_path_factory):
    """Dream (right-shifted) trained with bd3lm, blocks of 4, on four prompt/answer pairs
    (PAIRS x 3, PAIRS held out); the block sampler's calls recorded (block sizes)."""
    from dllm_plugin import block_sampler

    original = block_sampler.generate_bd3lm_shifted
    block_sizes: list[int] = []

    def recorded(model, prompts, **kwargs):
        block_sizes.append(kwargs["config"].block_size)
        return original(model, prompts, **kwargs)

    recorded.algorithms = original.algorithms
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(block_sampler, "generate_bd3lm_shifted", recorded)
        summary = run_pairs_job(
            tmp_path_factory.mktemp("bd3lm"),
            "tiny-dream",
            held_out=True,
            diffusion_type="bd3lm",
            block_size=4,
            perbatch_cutoff=False,
            train_steps=120,
            max_length=80,
            logging_steps=50,
            save_steps=1.0,
            num_preview_samples=4,
            preview_max_new_tokens=8,
        )
    return {**summary, "block_sizes": block_sizes}


def test_trained_model_generates_the_trained_answers(trained_dream):
    samples = trained_dream["samples"]
    assert trained_dream["diffusion_type"] == "bd3lm"
    assert [s["generated"] for s in samples] == [answer for _, answer in PAIRS]
    assert all(s["before_training"] != s["reference"] for s in samples)


def test_held_out_bound_falls_and_accuracy_uses_the_block_sampler(trained_dream):
    """The held-out ELBO is the block-diffusion bound (finite, falls with training); the
    answers of answer accuracy come from the block sampler with the trained block size."""
    held_out = trained_dream["held_out"]
    before, after = held_out["before_training"], held_out["after_training"]
    assert math.isfinite(before["nll_bound"]) and math.isfinite(after["nll_bound"])
    assert 0 < after["nll_bound"] < before["nll_bound"] / 2
    assert after["nll_bound_se"] >= 0
    assert before["exact_match"] < 1.0 and after["exact_match"] == 1.0
    assert [a["generated"] for a in held_out["answers"]] == [answer for _, answer in PAIRS]
    # previews (4 before, 4 after) and accuracy (4 before, 4 after): all block by block
    assert len(trained_dream["block_sizes"]) >= 16
    assert set(trained_dream["block_sizes"]) == {4}


def test_generate_command_samples_with_the_trained_block_size(trained_dream, capsys):
    folder = trained_dream["output_path"]
    recipe = json.loads(Path(folder, "diffusion_recipe.json").read_text())
    assert recipe == {"training_method": "dream", "diffusion_type": "bd3lm", "block_size": 4}
    argv = ["--model", folder, "--prompt", "sky?", "--max-new-tokens", "8", "--device", "cpu"]
    assert generate.main(argv) == 0
    assert capsys.readouterr().out.strip() == "blue"
    assert generate.main([*argv, "--block-size", "8"]) == 1
    assert "trained with block diffusion in blocks of 4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_a2d(tmp_path_factory):
    """A tiny Qwen2 turned bidirectional by a2d, trained with bd3lm in blocks of 4 (too
    small to learn PAIRS' answers exactly in this many steps: its bound falls)."""
    return run_pairs_job(
        tmp_path_factory.mktemp("a2d-bd3lm"),
        "qwen2",
        held_out=True,
        training_method="a2d",
        diffusion_type="bd3lm",
        block_size=4,
        train_steps=60,
        learning_rate=1e-2,
        logging_steps=30,
        eval_generate_samples=2,
        preview_max_new_tokens=8,
    )


def test_a2d_model_trained_with_blocks_evaluates_through_lm_eval(trained_a2d, monkeypatch):
    """lm-eval's model class loads the saved a2d model with its recipe (bd3lm, blocks of
    4): log-likelihoods from the block bound, deterministic; generation block by block."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (setup.sh --dev)")
    from lm_eval.api.instance import Instance

    from dllm_plugin import block_sampler
    from dllm_plugin.evaluation.lm_eval_model import DiffusionLM

    held_out = trained_a2d["held_out"]
    assert held_out["after_training"]["nll_bound"] < held_out["before_training"]["nll_bound"]
    lm = DiffusionLM(
        pretrained=trained_a2d["output_path"], device="cpu", mc_samples=4, mc_batch=16, seed=3
    )
    assert lm.loaded.block_size == 4 and lm.loaded.model.config.model_type == "a2d-qwen2"
    assert lm.loaded.model.config.is_causal is False

    def request(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    prompts = [lm.apply_chat_template([{"role": "user", "content": p}]) for p, _ in PAIRS]
    pairs = [(p, a) for p, (_, a) in zip(prompts, PAIRS, strict=True)]
    first = lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
    reverse = lm.loglikelihood([request("loglikelihood", *p) for p in reversed(pairs)])
    assert first == list(reversed(reverse))
    assert all(math.isfinite(ll) and ll < 0 and not greedy for ll, greedy in first)
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", "hello there")])
    assert math.isfinite(rolling) and rolling < 0
    block_sizes = []
    original = block_sampler.generate_bd3lm

    def recorded(model, prompts, **kwargs):
        block_sizes.append(kwargs["config"].block_size)
        return original(model, prompts, **kwargs)

    monkeypatch.setattr(block_sampler, "generate_bd3lm", recorded)
    (text,) = lm.generate_until([request("generate_until", prompts[1], {"max_gen_toks": 6})])
    assert isinstance(text, str) and block_sizes == [4]


# ---- configuration ------------------------------------------------------------------------
def test_configuration_checks(tmp_path, tiny_bert_dir):
    from dllm_plugin.config import build_job_config
    from dllm_plugin.errors import ConfigError, ModelError
    from dllm_plugin.methods import method_row, resolve_method

    with pytest.raises(ConfigError, match="diffusion_type: 'sedd' is not allowed"):
        build_job_config({"diffusion_type": "sedd"})
    with pytest.raises(
        ConfigError,
        match="perbatch_cutoff: False has no effect with training_method 'llada' with diffusion_type 'bd3lm'",
    ):
        build_job_config(
            {"training_method": "llada", "diffusion_type": "bd3lm", "perbatch_cutoff": False}
        )
    assert method_row("dream", "bd3lm").trainer_class() is DreamBD3LMTrainer
    with pytest.raises(ModelError, match="model_type 'roberta'"):
        resolve_method("auto", "bert", "m", "bd3lm", "roberta")
    assert resolve_method("auto", "bert", "m", "bd3lm", "bert").name == "bert"
    with pytest.raises(ConfigError, match="block_size: 64 is more than max_length 48"):
        method_row("bert", "bd3lm").row_length(48, 64)
    assert method_row("bert", "bd3lm").row_length(50, 16) == 48
    assert method_row("bert", "mdlm").row_length(50, 16) == 50
    # the reference noise above assumes the trainers' default time_epsilon
    assert BD3LMTrainingArguments.__dataclass_fields__["time_epsilon"].default == EPS
