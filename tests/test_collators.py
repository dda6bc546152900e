"""Collators: exact padded tensors and Dream's seeded cut-offs."""

from __future__ import annotations

import pytest
import torch

from dllm_plugin.data.collators import DreamCollator, MDLMCollator
from dllm_plugin.rng import keyed_generator

PAD = 0


def feature(prompt: list[int], response: list[int], mask_prompt: bool = True, **extra) -> dict:
    ids = prompt + response
    labels = ([-100] * len(prompt) if mask_prompt else list(prompt)) + response
    return {"input_ids": ids, "labels": labels, "prompt_len": len(prompt), **extra}


def batch_features() -> list[dict]:
    return [
        feature([1, 2], [10, 11, 12, 13, 14], drop=""),  # response 5
        feature([3], [20, 21]),  # response 2
        feature([4, 5, 6], [30, 31, 32, 33]),  # response 4
    ]


# ------------------------------------------------------------------------------ MDLM


def test_mdlm_right_pads_and_trains_on_padding() -> None:
    out = MDLMCollator(pad_token_id=PAD)(batch_features())
    assert set(out) == {"input_ids", "labels", "prompt_len"}  # no attention_mask
    assert all(v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [
        [1, 2, 10, 11, 12, 13, 14],
        [3, 20, 21, 0, 0, 0, 0],
        [4, 5, 6, 30, 31, 32, 33],
    ]
    assert out["labels"].tolist() == [
        [-100, -100, 10, 11, 12, 13, 14],
        [-100, 20, 21, 0, 0, 0, 0],
        [-100, -100, -100, 30, 31, 32, 33],
    ]
    assert out["prompt_len"].tolist() == [2, 1, 3]


def test_mdlm_label_pad_and_multiple() -> None:
    out = MDLMCollator(pad_token_id=7, label_pad_token_id=-100, pad_to_multiple_of=4)(
        [feature([1], [2, 3], mask_prompt=False), feature([4], [5])]
    )
    assert out["input_ids"].tolist() == [[1, 2, 3, 7], [4, 5, 7, 7]]
    assert out["labels"].tolist() == [[1, 2, 3, -100], [-100, 5, -100, -100]]


def test_mdlm_accepts_tensors() -> None:
    f = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "prompt_len": 1}
    assert MDLMCollator(pad_token_id=PAD)([f])["input_ids"].tolist() == [[1, 2]]


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([], "empty batch"),
        ([{"labels": [1], "prompt_len": 0}], "no 'input_ids'"),
        ([feature([1], [2]), {"input_ids": [1], "prompt_len": 0}], "feature 1 has no 'labels'"),
        ([feature([1], [2]), {"input_ids": [1, 2], "labels": [1], "prompt_len": 1}], "feature 1"),
        ([{"input_ids": [1], "labels": [1], "prompt_len": 2}], "prompt_len"),
        (["not a dict"], "feature 0 must be a dict"),
    ],
)
def test_mdlm_validation(features, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MDLMCollator(pad_token_id=PAD)(features)


# ----------------------------------------------------------------------------- Dream


def expected_perbatch(features: list[dict], seed: int) -> dict:
    """Reimplementation of the draw: one randint over the batch from the batch's generator."""
    gen = keyed_generator(seed, [f["input_ids"] for f in features])
    chosen = int(torch.randint(len(features), (1,), generator=gen))
    kept = len(features[chosen]["input_ids"]) - features[chosen]["prompt_len"]
    trimmed = [
        {
            **f,
            "input_ids": f["input_ids"][: f["prompt_len"] + kept],
            "labels": f["labels"][: f["prompt_len"] + kept],
        }
        for f in features
    ]
    return MDLMCollator(pad_token_id=PAD)(trimmed)


@pytest.mark.parametrize("seed", range(6))
def test_dream_perbatch_cutoff_matches_seeded_draw(seed: int) -> None:
    features = batch_features()
    out = DreamCollator(pad_token_id=PAD, seed=seed)(features)
    want = expected_perbatch(features, seed)
    for key in ("input_ids", "labels", "prompt_len"):
        assert torch.equal(out[key], want[key])


def test_dream_perbatch_cutoff_invariants() -> None:
    features = batch_features()
    seen = set()
    for seed in range(30):  # the draw is fixed per (seed, batch): vary the seed
        out = DreamCollator(pad_token_id=PAD, seed=seed)(features)
        rows, prompts = out["input_ids"].tolist(), out["prompt_len"].tolist()
        resp = [sum(tok != PAD for tok in row[p:]) for row, p in zip(rows, prompts, strict=True)]
        kept = max(resp)  # the chosen example keeps its whole response
        assert kept in (5, 2, 4)
        for row, f, r in zip(rows, features, resp, strict=True):
            p = f["prompt_len"]
            assert r == min(len(f["input_ids"]) - p, kept)
            assert row[: p + r] == f["input_ids"][: p + r]  # prompt untouched, tail cut
            assert all(tok == PAD for tok in row[p + r :])
        seen.add(kept)
    assert seen == {5, 2, 4}  # every example was picked at least once


def test_dream_perbatch_equal_responses_is_plain_padding() -> None:
    features = [feature([1, 2], [3, 4]), feature([5], [6, 7])]
    out = DreamCollator(pad_token_id=PAD)(features)
    plain = MDLMCollator(pad_token_id=PAD)(features)
    assert all(torch.equal(out[k], plain[k]) for k in plain)


def test_dream_tail_cut_ratio_one() -> None:
    features = batch_features()  # min response 2 -> cut exactly 1 token off the tail
    coll = DreamCollator(pad_token_id=PAD, perbatch_cutoff=False, resp_cutoff_ratio=1.0)
    plain = MDLMCollator(pad_token_id=PAD)(features)
    out = coll(features)
    assert torch.equal(out["input_ids"], plain["input_ids"][:, :-1])
    assert torch.equal(out["labels"], plain["labels"][:, :-1])
    assert torch.equal(out["prompt_len"], plain["prompt_len"])


def test_dream_tail_cut_range_and_seeded_draw() -> None:
    features = [feature([1], list(range(10, 16))), feature([2, 3], list(range(20, 29)))]
    plain = MDLMCollator(pad_token_id=PAD)(features)  # width 11, min response 6
    coll = DreamCollator(pad_token_id=PAD, perbatch_cutoff=False, resp_cutoff_ratio=1.0, seed=5)
    cuts = set()
    for first in range(40):  # 40 batches differing in one token
        features[0]["input_ids"][0] = first
        plain = MDLMCollator(pad_token_id=PAD)(features)
        out = coll(features)
        gen = keyed_generator(5, [f["input_ids"] for f in features])
        torch.rand((), generator=gen)
        cut = int(torch.randint(1, 6, (1,), generator=gen))
        assert out["input_ids"].shape[1] == 11 - cut
        assert torch.equal(out["input_ids"], plain["input_ids"][:, : 11 - cut])
        cuts.add(cut)
    assert cuts == {1, 2, 3, 4, 5}


def test_dream_tail_cut_respects_pad_to_multiple() -> None:
    features = [feature([1], [2, 3, 4, 5])]  # width 5, min response 4
    coll = DreamCollator(
        pad_token_id=PAD, perbatch_cutoff=False, resp_cutoff_ratio=1.0, pad_to_multiple_of=8
    )
    for _ in range(10):
        out = coll(features)
        ids = out["input_ids"][0].tolist()
        kept = sum(tok != PAD for tok in ids)
        assert len(ids) == 8 and 2 <= kept <= 4
        assert ids[:kept] == [1, 2, 3, 4, 5][:kept]


def test_dream_tail_cut_skipped_for_short_responses() -> None:
    features = [feature([1], [2]), feature([3], [4, 5, 6])]
    coll = DreamCollator(pad_token_id=PAD, perbatch_cutoff=False, resp_cutoff_ratio=1.0)
    plain = MDLMCollator(pad_token_id=PAD)(features)
    assert all(torch.equal(coll(features)[k], plain[k]) for k in plain)


def test_dream_no_cut_options_is_plain_padding() -> None:
    features = batch_features()
    coll = DreamCollator(pad_token_id=PAD, perbatch_cutoff=False, resp_cutoff_ratio=0.0)
    plain = MDLMCollator(pad_token_id=PAD)(features)
    for _ in range(5):
        assert all(torch.equal(coll(features)[k], plain[k]) for k in plain)


def test_dream_ratio_ignored_with_perbatch_cutoff() -> None:
    features = batch_features()
    both = DreamCollator(pad_token_id=PAD, resp_cutoff_ratio=1.0, seed=3)
    perbatch = DreamCollator(pad_token_id=PAD, resp_cutoff_ratio=0.0, seed=3)
    for _ in range(20):
        a, b = both(features), perbatch(features)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_dream_reproducible_and_seed_sensitive() -> None:
    features = batch_features()

    def widths(seed: int) -> list[int]:
        coll = DreamCollator(pad_token_id=PAD, seed=seed)
        out = []
        for first in range(20):
            features[0]["input_ids"][0] = first
            out.append(coll(features)["input_ids"].shape[1])
        return out

    assert widths(11) == widths(11)
    assert widths(11) != widths(12)


def test_dream_label_pad_default_and_prompt_len_kept() -> None:
    coll = DreamCollator(pad_token_id=9, perbatch_cutoff=False)
    out = coll([feature([1], [2, 3]), feature([4], [5])])
    assert out["labels"].tolist() == [[-100, 2, 3], [-100, 5, 9]]
    assert out["prompt_len"].tolist() == [1, 1]


def test_dream_draw_depends_on_the_batch_not_on_history() -> None:
    """A resumed run skips batches without collating them: the cut must not depend on them."""
    batch_a = batch_features()
    batch_b = [{**f, "input_ids": [t + 1 for t in f["input_ids"]]} for f in batch_features()]
    coll = DreamCollator(pad_token_id=PAD, seed=3)
    first = coll(batch_a)
    coll(batch_b)
    again = coll(batch_a)
    fresh = DreamCollator(pad_token_id=PAD, seed=3)(batch_a)
    assert all(torch.equal(first[k], again[k]) and torch.equal(first[k], fresh[k]) for k in first)


def test_dream_validates_ratio() -> None:
    with pytest.raises(ValueError, match="resp_cutoff_ratio"):
        DreamCollator(pad_token_id=PAD, resp_cutoff_ratio=1.5)
