"""Tests for the diffusion samplers.

Hand-made "oracle" modules make the expected output exact: they strongly favour a known
token per position, with a known confidence ordering, and record every input they see,
so the tests can check the schedule (what was committed when) and not only the result.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dllm_plugin.sampling import (
    DREAM_ALGORITHMS,
    SamplingConfig,
    clean_generation,
    generate_dream,
    generate_mdlm,
)

VOCAB = 60
PAD = 0
EOS = 58
MASK = 59
PROMPT = [5, 6, 7]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


class Oracle(nn.Module):
    """Favours ``answer[pos]`` at absolute position ``pos`` with strength ``base + slope*pos``.

    ``shift=1`` puts the score for token ``pos`` on raw position ``pos - 1`` (Dream layout).
    ``runner_up`` gives a weaker second choice per position (used when the first is a mask).
    """

    def __init__(
        self,
        answer: dict[int, int],
        *,
        shift: int = 0,
        base: float = 8.0,
        slope: float = 0.5,
        runner_up: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the sampler a device to read
        self.answer, self.shift, self.base, self.slope = answer, shift, base, slope
        self.runner_up = runner_up or {}
        self.calls: list[torch.Tensor] = []
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.calls.append(input_ids[0].clone())
        self.modes.append(self.training)
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, VOCAB)
        for raw in range(length):
            pos = raw + self.shift
            if pos in self.answer:
                logits[:, raw, self.answer[pos]] = self.base + self.slope * pos
            if pos in self.runner_up:
                logits[:, raw, self.runner_up[pos]] = self.base / 2
        return SimpleNamespace(logits=logits)


def answer_for(tokens: list[int], prompt: list[int] = PROMPT) -> dict[int, int]:
    """Absolute-position answer table for a generated span following ``prompt``."""
    return {len(prompt) + i: tok for i, tok in enumerate(tokens)}


def run_mdlm(model: nn.Module, prompts=None, **cfg) -> list[list[int]]:
    return generate_mdlm(
        model,
        prompts or [PROMPT],
        mask_id=MASK,
        stop_ids={EOS},
        pad_id=PAD,
        config=SamplingConfig(**cfg),
    )


def run_dream(model: nn.Module, prompts=None, **cfg) -> list[list[int]]:
    return generate_dream(
        model,
        prompts or [PROMPT],
        mask_id=MASK,
        stop_ids={EOS},
        pad_id=PAD,
        config=SamplingConfig(**cfg),
    )


def generated(call: torch.Tensor) -> torch.Tensor:
    return call[len(PROMPT) :]


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config).eval()


# --------------------------------------------------------------------------- basics


def test_clean_generation_cuts_at_first_stop_and_drops_mask_and_pad() -> None:
    tokens = [3, MASK, PAD, 4, EOS, 5, EOS]
    assert clean_generation(tokens, mask_id=MASK, stop_ids={EOS}, pad_id=PAD) == [3, 4]
    assert clean_generation([3, 4], mask_id=MASK, stop_ids=(), pad_id=None) == [3, 4]


@pytest.mark.parametrize(
    "kwargs", [{"steps": 0}, {"block_size": 0}, {"max_new_tokens": -1}, {"temperature": -1.0}]
)
def test_config_rejects_invalid_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_unknown_algorithms_are_rejected() -> None:
    oracle = Oracle({})
    with pytest.raises(ValueError, match="MDLM algorithm"):
        run_mdlm(oracle, algorithm="entropy")
    with pytest.raises(ValueError, match="Dream algorithm"):
        run_dream(oracle, algorithm="random")


def test_zero_new_tokens_gives_empty_outputs_without_forwards() -> None:
    oracle = Oracle({})
    assert run_mdlm(oracle, prompts=[PROMPT, [1]], max_new_tokens=0) == [[], []]
    assert run_dream(oracle, max_new_tokens=0) == [[]]
    assert oracle.calls == []


# --------------------------------------------------------------------------- MDLM


@pytest.mark.parametrize("algorithm", ["low_confidence", "random"])
@pytest.mark.parametrize("block_size", [4, 5, 12])
def test_mdlm_reproduces_oracle_answer(algorithm: str, block_size: int) -> None:
    answer = list(range(10, 22))
    oracle = Oracle(answer_for(answer))
    out = run_mdlm(oracle, max_new_tokens=12, steps=12, block_size=block_size, algorithm=algorithm)
    assert out == [answer]


@pytest.mark.parametrize(
    ("max_new", "block", "steps", "expected"),
    [
        (12, 4, 6, 6),  # 3 blocks x 2 steps
        (12, 4, 12, 12),  # 3 blocks x 4 steps
        (12, 4, 2, 3),  # fewer steps than blocks: at least one per block
        (10, 4, 9, 8),  # blocks 4, 4, 2 with 3 steps each; the short block needs only 2
        (8, 4, 64, 8),  # more steps than masks: extra steps would commit nothing
        (8, 32, 8, 8),  # block clipped to max_new_tokens
    ],
)
def test_mdlm_forward_count(max_new: int, block: int, steps: int, expected: int) -> None:
    answer = list(range(10, 10 + max_new))
    oracle = Oracle(answer_for(answer))
    out = run_mdlm(oracle, max_new_tokens=max_new, block_size=block, steps=steps)
    assert out == [answer]
    assert len(oracle.calls) == expected


def test_mdlm_commits_even_split_most_confident_first() -> None:
    # One block of 8 over 3 steps: 3, 3, 2 commits. Confidence grows with position, so
    # low_confidence must commit from the right end of the block.
    oracle = Oracle(answer_for(list(range(10, 18))))
    run_mdlm(oracle, max_new_tokens=8, block_size=8, steps=3)
    masked = [generated(c) == MASK for c in oracle.calls]
    assert [int(m.sum()) for m in masked] == [8, 5, 2]
    assert masked[1].tolist() == [True] * 5 + [False] * 3
    assert masked[2].tolist() == [True] * 2 + [False] * 6


def test_mdlm_blocks_complete_in_order_and_never_remask() -> None:
    # Later positions are MORE confident, so a sampler ignoring blocks would fill block 2 first.
    answer = list(range(10, 22))
    oracle = Oracle(answer_for(answer), slope=2.0)
    out = run_mdlm(oracle, max_new_tokens=12, block_size=4, steps=6)
    assert out == [answer]
    seen_block2 = False
    for prev, call in zip(oracle.calls, oracle.calls[1:] + [None], strict=True):
        gen = generated(prev)
        if (gen[4:8] != MASK).any() or (gen[8:] != MASK).any():
            seen_block2 = True
            assert (gen[:4] != MASK).all(), "block 2 started before block 1 was complete"
        if (gen[8:] != MASK).any():
            assert (gen[4:8] != MASK).all(), "block 3 started before block 2 was complete"
        if call is not None:
            nxt = generated(call)
            kept = gen != MASK
            assert torch.equal(nxt[kept], gen[kept]), "a committed token changed"
    assert seen_block2


def test_mdlm_stops_at_stop_id_and_skips_later_blocks() -> None:
    answer = [10, 11, 12, 13, 14, EOS, 16, 17, 18, 19, 20, 21]
    oracle = Oracle(answer_for(answer))
    out = run_mdlm(oracle, max_new_tokens=12, block_size=4, steps=6)
    assert out == [[10, 11, 12, 13, 14]]
    assert len(oracle.calls) == 4  # blocks 1 and 2 only (2 steps each)


def test_mask_predictions_fall_back_and_pad_is_stripped() -> None:
    # Positions 0-1 favour the mask token (second choice 20); position 2 favours pad.
    gen = {0: MASK, 1: MASK, 2: PAD, 3: 13}
    oracle = Oracle(answer_for(list(gen.values())), runner_up=answer_for([20, 21]))
    out = run_mdlm(oracle, max_new_tokens=4, block_size=4, steps=4)
    assert out == [[20, 21, 13]]
    dream_oracle = Oracle(answer_for(list(gen.values())), shift=1, runner_up=answer_for([20, 21]))
    assert run_dream(dream_oracle, max_new_tokens=4, steps=4) == [[20, 21, 13]]


def test_mdlm_eval_mode_during_sampling_and_restored_after() -> None:
    oracle = Oracle(answer_for([10, 11]))
    oracle.train()
    run_mdlm(oracle, max_new_tokens=2, steps=2)
    assert oracle.modes and not any(oracle.modes)
    assert oracle.training
    oracle.eval()
    run_dream(oracle, max_new_tokens=2, steps=2)
    assert not oracle.training


@pytest.mark.parametrize("algorithm", ["low_confidence", "random"])
def test_mdlm_bert_greedy_deterministic_and_seeded_sampling(
    bert: nn.Module, algorithm: str
) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]  # different lengths: processed one by one
    cfg = {"max_new_tokens": 10, "steps": 10, "block_size": 4, "algorithm": algorithm}
    for temperature in (0.0, 1.0):
        first = run_mdlm(bert, prompts, temperature=temperature, **cfg)
        assert first == run_mdlm(bert, prompts, temperature=temperature, **cfg)
        assert len(first) == 2
        for out in first:
            assert len(out) <= 10 and MASK not in out and PAD not in out and EOS not in out
    sampled = [run_mdlm(bert, prompts, temperature=1.0, seed=s, **cfg) for s in range(3)]
    assert sampled[0] != sampled[1] or sampled[0] != sampled[2], "seed has no effect"


# --------------------------------------------------------------------------- Dream


@pytest.mark.parametrize("algorithm", [*DREAM_ALGORITHMS, "low_confidence"])
def test_dream_reproduces_right_shifted_oracle(algorithm: str) -> None:
    answer = list(range(10, 22))
    oracle = Oracle(answer_for(answer), shift=1)  # token i scored at raw position i - 1
    out = run_dream(oracle, max_new_tokens=12, steps=6, algorithm=algorithm)
    assert out == [answer]


def test_dream_without_shift_would_fail_the_shifted_oracle() -> None:
    # Negative control: the same oracle unshifted is read one position late by the sampler.
    answer = list(range(10, 22))
    out = run_dream(Oracle(answer_for(answer)), max_new_tokens=12, steps=6)
    assert out != [answer]


@pytest.mark.parametrize("algorithm", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_forward_count_and_schedule(algorithm: str) -> None:
    # timesteps linspace(1, 1e-3, 5): commits int(8 * .24975)=1, int(7 * .3329)=2,
    # int(5 * .499)=2, then the remaining 3 at the last step.
    oracle = Oracle(answer_for(list(range(10, 18))), shift=1)
    out = run_dream(oracle, max_new_tokens=8, steps=4, algorithm=algorithm)
    assert out == [list(range(10, 18))]
    assert len(oracle.calls) == 4
    assert [int((generated(c) == MASK).sum()) for c in oracle.calls] == [8, 7, 5, 3]


def test_dream_maskgit_commits_most_confident_first() -> None:
    # Confidence grows with position: the first commits are at the end of the span.
    oracle = Oracle(answer_for(list(range(10, 18))), shift=1)
    run_dream(oracle, max_new_tokens=8, steps=4)
    assert (generated(oracle.calls[1]) != MASK).tolist() == [False] * 7 + [True]
    assert (generated(oracle.calls[2]) != MASK).tolist() == [False] * 5 + [True] * 3


def test_dream_origin_reveals_everything_within_steps() -> None:
    oracle = Oracle(answer_for(list(range(10, 26))), shift=1)
    out = run_dream(oracle, max_new_tokens=16, steps=5, algorithm="origin")
    assert out == [list(range(10, 26))]
    assert 1 <= len(oracle.calls) <= 5


def test_dream_stop_id_cuts_output() -> None:
    answer = [10, 11, EOS, 13]
    out = run_dream(Oracle(answer_for(answer), shift=1), max_new_tokens=4, steps=4)
    assert out == [[10, 11]]


@pytest.mark.parametrize("algorithm", DREAM_ALGORITHMS)
def test_dream_bert_all_algorithms_deterministic_and_seeded(
    bert: nn.Module, algorithm: str
) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cfg = {"max_new_tokens": 8, "steps": 4, "algorithm": algorithm}
    for temperature in (0.0, 0.8):
        first = run_dream(bert, prompts, temperature=temperature, **cfg)
        assert first == run_dream(bert, prompts, temperature=temperature, **cfg)
        for out in first:
            assert len(out) <= 8 and MASK not in out and PAD not in out and EOS not in out


# --------------------------------------------------------------------------- fixtures


def _load_fixture(name: str, model_type: str) -> nn.Module:
    """Load a tiny official-format checkpoint through the plugin's native models."""
    try:
        import dllm_plugin.models  # noqa: F401  (registers the native model types)
    except ImportError as exc:
        pytest.skip(f"dllm_plugin.models not importable yet: {exc}")
    from transformers import AutoModelForMaskedLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"dllm_plugin.models does not register model_type {model_type!r} yet")
    path = FIXTURES / name
    if not (path / "config.json").exists():
        pytest.skip(f"fixture {path} missing")
    return AutoModelForMaskedLM.from_pretrained(path).float().eval()


@pytest.mark.parametrize(
    ("name", "model_type", "mask_id", "eos_id", "generate"),
    [
        ("tiny-llada", "llada", 250, 249, generate_mdlm),
        ("tiny-dream", "Dream", 254, 250, generate_dream),
    ],
)
def test_fixture_models_generate_without_masks(
    name: str, model_type: str, mask_id: int, eos_id: int, generate
) -> None:
    model = _load_fixture(name, model_type)
    algorithm = "low_confidence" if generate is generate_mdlm else "maskgit_plus"
    config = SamplingConfig(max_new_tokens=8, steps=8, block_size=4, algorithm=algorithm)
    kwargs = {"mask_id": mask_id, "stop_ids": {eos_id}, "pad_id": eos_id, "config": config}
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    out = generate(model, prompts, **kwargs)
    assert out == generate(model, prompts, **kwargs)
    assert len(out) == 2
    for tokens in out:
        assert len(tokens) <= 8
        assert mask_id not in tokens
        assert all(0 <= t < 256 for t in tokens)
