"""Packing: every packed example gets the logits and the loss it gets alone, no attention
crosses an example, positions restart, Dream's shift never crosses a boundary; the packer
and the packed collator.

Each model family is a tiny random fp32 model; the references run each example alone,
without padding, and compute the loss by brute force here (no project loss helper).
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from dllm_plugin.data.collators import FILLER_SEGMENT, PackedCollator
from dllm_plugin.data.packing import (
    PackOptions,
    best_fit_decreasing,
    pack_dataset,
    packing_waste,
    prepare_example,
)
from dllm_plugin.errors import ConfigError, ModelError
from dllm_plugin.methods import METHODS, Method, check_packing
from dllm_plugin.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from dllm_plugin.models.packing import packed_inputs_for, segment_positions
from dllm_plugin.rng import keyed_generator
from dllm_plugin.trainers import (
    DreamTrainer,
    DreamTrainingArguments,
    MDLMTrainer,
    MDLMTrainingArguments,
)

pytestmark = pytest.mark.usefixtures("single_thread")

V, PAD, BOS, MASK = 64, 0, 2, 63
EPS, SEED = 1e-3, 5
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def tiny(family: str) -> torch.nn.Module:
    """A tiny random model of the family, fp32, without dropout, in eval mode."""
    torch.manual_seed(0)
    if family in ("bert", "bert-eager"):
        model = BertForMaskedLM(
            BertConfig(vocab_size=V, max_position_embeddings=64, **SMALL, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
        )  # fmt: skip
        if family == "bert-eager":  # additive float masks instead of SDPA's bool masks
            model.config._attn_implementation = "eager"
    elif family == "roberta":
        model = RobertaForMaskedLM(
            RobertaConfig(vocab_size=V, max_position_embeddings=66, pad_token_id=1, **SMALL,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        )  # fmt: skip
    elif family == "distilbert":
        model = DistilBertForMaskedLM(
            DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                             max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
        )  # fmt: skip
    elif family == "modernbert":
        # Three layers, a sliding window of 4 inside the examples: global and local layers.
        model = ModernBertForMaskedLM(
            ModernBertConfig(vocab_size=V, max_position_embeddings=64, local_attention=4,
                             global_attn_every_n_layers=2, pad_token_id=PAD, bos_token_id=BOS,
                             eos_token_id=PAD, cls_token_id=BOS, sep_token_id=PAD,
                             **{**SMALL, "num_hidden_layers": 3})
        )  # fmt: skip
    elif family == "llada":
        model = LLaDAModelLM(
            LLaDAConfig(d_model=16, n_heads=2, n_kv_heads=1, n_layers=2, mlp_hidden_size=32,
                        vocab_size=V, embedding_size=V, max_sequence_length=64)
        )  # fmt: skip
    else:
        model = DreamModel(
            DreamConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=PAD, mask_token_id=MASK)
        )  # fmt: skip
    return model.eval()


FAMILIES = ["bert", "bert-eager", "roberta", "distilbert", "modernbert", "llada", "dream"]


def examples(lengths=(5, 9, 3, 7), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, MASK, (n,), generator=g).tolist() for n in lengths]


def packed_batch(rows: list[list[list[int]]], label_rows=None) -> dict[str, torch.Tensor]:
    """Rows of examples through the packed collator (labels = ids unless given)."""
    label_rows = label_rows or rows
    features = [
        {"input_ids": sum(r, []), "labels": sum(lab, []), "seq_lens": [len(e) for e in r]}
        for r, lab in zip(rows, label_rows, strict=True)
    ]
    return PackedCollator(pad_token_id=PAD)(features)


def packed_logits(model, batch) -> torch.Tensor:
    kwargs = packed_inputs_for(model.config)(model.config, batch["segment_ids"])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], **kwargs).logits


def alone_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def spans(row: list[list[int]]):
    start = 0
    for e in row:
        yield start, e
        start += len(e)


# ---- the model sees each example as if it were alone ---------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_example_logits_equal_the_example_alone(family):
    model = tiny(family)
    ex = examples()
    rows = [ex[:3], ex[3:]]  # row 1 is shorter: filler after its example
    batch = packed_batch(rows)
    assert batch["input_ids"].shape == (2, 17) and (batch["segment_ids"][1, 7:] == -1).all()
    logits = packed_logits(model, batch)
    for r, row in enumerate(rows):
        for start, e in spans(row):
            torch.testing.assert_close(
                logits[r, start : start + len(e)], alone_logits(model, e), rtol=0, atol=1e-5
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_no_attention_crosses_an_example(family):
    model = tiny(family)
    ex = examples()
    before = packed_logits(model, packed_batch([ex[:3]]))
    changed = [ex[0], [(t + 7) % 60 + 4 for t in ex[1]], ex[2]]
    after = packed_logits(model, packed_batch([changed]))
    a, b = len(ex[0]), len(ex[0]) + len(ex[1])
    torch.testing.assert_close(after[0, :a], before[0, :a], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[0, b:], before[0, b:], rtol=0, atol=1e-6)
    assert (after[0, a:b] - before[0, a:b]).abs().max() > 1e-3  # the changed example changed


def test_positions_restart_at_every_example():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, -1]])
    assert segment_positions(segments).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1],
        [0, 1, 2, 3, 4, 5, 6, 0],
    ]
    offsets = {"roberta": 2}  # RoBERTa numbers positions from its pad id (1) + 1
    for family in FAMILIES:
        config = tiny(family).config
        offset = offsets.get(family, 0)
        positions = packed_inputs_for(config)(config, segments)["position_ids"]
        assert positions.tolist() == (segment_positions(segments) + offset).tolist()


def test_unsupported_model_type_or_method_is_refused():
    with pytest.raises(ModelError, match="packing: model type 'electra'"):
        packed_inputs_for({"model_type": "electra"})
    check_packing(METHODS[("dream", "mdlm")], {"model_type": "Dream"})
    no_pack = Method("x", ("bert",), "trainers:MDLMTrainer", "sampling:generate_mdlm", "x",
                     "mdlm_loss_weight_type", packs=False)  # fmt: skip
    with pytest.raises(ConfigError, match="training_method 'x' does not train on packed rows"):
        check_packing(no_pack, {"model_type": "bert"})
    block = "training_method 'llada' with diffusion_type 'bd3lm' does not train on packed rows"
    with pytest.raises(ConfigError, match=block):
        check_packing(METHODS[("llada", "bd3lm")], {"model_type": "llada"})


# ---- the loss of a packed batch is the loss of its examples alone --------------------------
def make_trainer(family, model, tmp_path, **kw):
    dream = family == "dream"
    args_cls, cls = (
        (DreamTrainingArguments, DreamTrainer) if dream else (MDLMTrainingArguments, MDLMTrainer)
    )
    extra = {"loss_weight_type": "scheduler"} if dream else {}
    args = args_cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, seed=SEED,
                    per_device_train_batch_size=2, **{**extra, **kw})  # fmt: skip
    return cls(model=model, args=args, mask_token_id=MASK, bos_token_id=BOS)


def reference_loss(
    model, rows, label_rows, shift: bool, phase: int = 0, norm: str = "token"
) -> float:
    """Brute force: each example alone, its noise from its own key (seed, train, step 0,
    row, segment): t = eps + (1 - eps) u, then one uniform per token of the example only
    (the packed draw covers the batch's widest example: a longer stream, same prefix);
    weight 1/t; CE of every masked token; divided by the batch's maskable tokens (token),
    each example by its own maskable tokens and the number of examples (sequence), or
    by the number of examples (batch): examples, never packed rows."""
    sums, counts = [], []
    for r, (row, labels_row) in enumerate(zip(rows, label_rows, strict=True)):
        for j, (ids, labels) in enumerate(zip(row, labels_row, strict=True)):
            g = keyed_generator(SEED, phase, 0, r, j)
            t = EPS + (1 - EPS) * torch.rand(1, generator=g).item()
            u = torch.rand(1, len(ids), generator=g)[0]
            masked = [u[i].item() < t and labels[i] != -100 for i in range(len(ids))]
            noised = [MASK if m else tok for m, tok in zip(masked, ids, strict=True)]
            logits = alone_logits(model, noised).double()
            total = 0.0
            for i, m in enumerate(masked):
                if m:
                    src = i - 1 if shift else i
                    total += (1 / t) * -torch.log_softmax(logits[src], -1)[ids[i]].item()
            sums.append(total)
            counts.append(sum(lab != -100 for lab in labels))
    if norm == "token":
        return sum(sums) / sum(counts)
    if norm == "sequence":
        return sum(s / max(n, 1) for s, n in zip(sums, counts, strict=True)) / len(sums)
    return sum(sums) / len(sums)


@pytest.mark.parametrize(
    ("masked_only", "norm"),
    [(True, "token"), (False, "token"), (True, "sequence"), (True, "batch")],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_equals_the_examples_alone(family, masked_only, norm, tmp_path):
    model = tiny(family)
    ex = examples((6, 9, 4, 8, 5))
    rows = [ex[:3], ex[3:]]
    # a prompt (-100) at the start of every example: Dream's shift needs no BOS
    label_rows = [[[-100, -100] + e[2:] for e in row] for row in rows]
    trainer = make_trainer(
        family, model, tmp_path, score_masked_only=masked_only, loss_norm_type=norm
    )
    model.train()
    loss = trainer.compute_loss(model, packed_batch(rows, label_rows)).item()
    model.eval()
    expected = reference_loss(model, rows, label_rows, shift=family == "dream", norm=norm)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_evaluation_uses_the_plain_estimator(tmp_path):
    """In eval mode the same packed loss, from the evaluation keys, with uniform times
    and one mask, whatever timestep_sampling and complementary_masking say."""
    model = tiny("llada")
    ex = examples((6, 9, 4))
    rows, label_rows = [ex], [[[-100, *e[1:]] for e in ex]]
    trainer = make_trainer(
        "llada", model, tmp_path, timestep_sampling="stratified", complementary_masking=True
    )
    loss = trainer.compute_loss(model.eval(), packed_batch(rows, label_rows)).item()
    expected = reference_loss(model, rows, label_rows, shift=False, phase=1)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_dream_shift_never_scores_a_start_from_the_previous_example(tmp_path):
    """An example whose first token is trained gets a BOS of its own when packed: its
    first token is scored from that BOS, as alone, never from the example before it."""
    opts = PackOptions(max_length=32, eos_id=PAD, trailing_eos=0, shifted=True, bos_id=BOS)
    ex = examples((6, 9, 4))
    prompt_first = ([*ex[0]], [-100, -100, *ex[0][2:]])
    answer_first = ([*ex[1]], [*ex[1]])  # every token trained, the first one too
    assert prepare_example(*prompt_first, 0, opts) == prompt_first  # no BOS needed
    ids, labels = prepare_example(*answer_first, 0, opts)
    assert ids == [BOS, *ex[1]] and labels == [-100, *ex[1]]
    rows, label_rows = [[prompt_first[0], ids]], [[prompt_first[1], labels]]
    model = tiny("dream")
    trainer = make_trainer("dream", model, tmp_path)
    model.train()
    loss = trainer.compute_loss(model, packed_batch(rows, label_rows)).item()
    model.eval()
    assert loss == pytest.approx(reference_loss(model, rows, label_rows, shift=True), rel=1e-5)
    # Without its BOS the second example's first token is scorable: complementary masking
    # masks every maskable token in one of its two copies, so the trainer must refuse.
    unsafe = packed_batch(
        [[prompt_first[0], answer_first[0]]], [[prompt_first[1], answer_first[1]]]
    )
    trainer = make_trainer("dream", tiny("dream"), tmp_path, complementary_masking=True)
    with pytest.raises(ValueError, match="first token is scored by a right-shifted model"):
        trainer.compute_loss(trainer.model.train(), unsafe)


def test_packed_cart_weights_stay_inside_the_example(tmp_path):
    """Dream's CART weights count clean context of the example only: the packed loss
    equals the brute-force CART loss of each example alone."""
    model = tiny("dream")
    ex = examples((7, 7))
    labels = [[-100, *e[1:]] for e in ex]
    trainer = make_trainer("dream", model, tmp_path, loss_weight_type="cart[geo_p:0.3]")
    model.train()
    packed = trainer.compute_loss(model, packed_batch([ex], [labels])).item()
    view_rows = torch.tensor(ex)
    masked, ts = [], []
    for j in range(2):
        g = keyed_generator(SEED, 0, 0, 0, j)
        t = EPS + (1 - EPS) * torch.rand(1, generator=g)
        u = torch.rand(7, generator=g)
        masked.append((u < t) & (torch.tensor(labels[j]) != -100))
        ts.append(t)
    masked = torch.stack(masked)
    noised = torch.where(masked, MASK, view_rows)
    with torch.no_grad():
        logits = model.eval()(input_ids=noised).logits.double()
    total = 0.0
    for j in range(2):
        for i in range(7):
            if masked[j, i]:
                w = sum(
                    0.5 * 0.3 * 0.7 ** (abs(i - k) - 1)
                    for k in range(7)
                    if k != i and not masked[j, k]
                )
                total += w * -torch.log_softmax(logits[j, i - 1], -1)[ex[j][i]].item()
    assert packed == pytest.approx(total / 12, rel=1e-5)


# ---- the packer ---------------------------------------------------------------------------
def reference_bfd(lengths, capacity):
    """Best-fit decreasing, the slow obvious way."""
    bins, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if rooms[b] >= lengths[i]]
        if not fits:
            bins.append([i])
            rooms.append(capacity - lengths[i])
            continue
        best = min(fits, key=lambda b: (rooms[b], b))
        bins[best].append(i)
        rooms[best] -= lengths[i]
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_the_obvious_algorithm(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 65, (300,), generator=g).tolist()
    bins = best_fit_decreasing(lengths, 64)
    assert bins == reference_bfd(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    waste = packing_waste(lengths, bins, 64)
    assert waste == pytest.approx(1 - sum(lengths) / (64 * len(bins)))
    assert len(bins) <= math.ceil(sum(lengths) / 64) * 11 / 9 + 1  # BFD's known bound


def test_pack_dataset_keeps_every_example_with_its_trailing_eos():
    ex = examples((10, 3, 16, 7, 12, 5))
    prompt = 2
    features = datasets.Dataset.from_dict(
        {"input_ids": ex, "labels": [[-100] * prompt + e[prompt:] for e in ex]}
    )
    opts = PackOptions(max_length=16, eos_id=PAD, trailing_eos=4, seed=3)
    packed = pack_dataset(features, opts)
    again = pack_dataset(features, opts)
    assert packed.to_dict() == again.to_dict()  # the EOS draws are keyed by the seed
    found = []
    for row in packed:
        assert sum(row["seq_lens"]) == len(row["input_ids"]) <= 16
        start = 0
        for n in row["seq_lens"]:
            ids, labels = row["input_ids"][start : start + n], row["labels"][start : start + n]
            found.append((ids, labels))
            start += n
    assert len(found) == len(ex)
    eos_counts = []
    for e in ex:
        ids, labels = next(f for f in found if f[0][: len(e)] == e)
        tail = ids[len(e) :]
        assert tail == [PAD] * len(tail) and labels[len(e) :] == tail  # trained EOS
        assert labels[:prompt] == [-100] * prompt and labels[prompt : len(e)] == e[prompt:]
        assert len(e) + len(tail) <= 16
        eos_counts.append(len(tail))
    assert eos_counts[2] == 0  # a full-length (truncated) example gets no EOS
    assert all(0 <= k <= 4 for k in eos_counts) and any(k > 0 for k in eos_counts)


def test_packed_collator_layout():
    batch = packed_batch([[[5, 6], [7, 8, 9]], [[10]]], [[[-100, 6], [7, 8, 9]], [[10]]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, 9], [10, -100, -100, -100, -100]]
    f = FILLER_SEGMENT
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1, 1], [0, f, f, f, f]]
    with pytest.raises(ValueError, match="do not match"):
        PackedCollator(PAD)([{"input_ids": [1, 2], "labels": [1, 2], "seq_lens": [3]}])


# ---- configuration ------------------------------------------------------------------------
def test_defaults_keep_todays_behaviour_and_dream_cut_offs_are_flagged_under_packing():
    from dllm_plugin.config import build_job_config, defaults
    from dllm_plugin.methods import option_problems

    d = defaults()
    assert d["packing"] is False and d["timestep_sampling"] == "uniform"
    assert d["complementary_masking"] is False
    base = {"model_name": "m", "training_method": "dream", "perbatch_cutoff": False}
    padded = build_job_config(base)
    assert option_problems(METHODS[("dream", "mdlm")], padded) == []
    packed = build_job_config({**base, "packing": "true"})
    [problem] = option_problems(METHODS[("dream", "mdlm")], packed)
    assert problem.startswith("perbatch_cutoff: False has no effect with packing")


def test_native_packed_attention_runs_for_the_variable_length_kernel():
    """The runs the CUDA variable-length kernel gets: every example and every row's
    filler is one run, rows never merge (the kernel itself needs a GPU)."""
    from dllm_plugin.models.llada import packed_attention

    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, -1, -1]])
    mask = packed_attention(segments)
    cu_seqlens, longest = mask.runs
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 12, 13, 14, 15, 16, 18]
    assert cu_seqlens.dtype == torch.int32 and longest == 6
    same = segments[:, :, None] == segments[:, None, :]
    assert torch.equal(mask.keys[:, 0], same)


# ---- the run's data: packing changes the layout, not the examples --------------------------
@pytest.mark.parametrize("truncation", ["right", "filter"])
def test_packed_rows_hold_the_unpacked_examples(tmp_path, tiny_bert_dir, truncation):
    """Prompt masking and truncation behave as without packing: the job's packed rows hold
    exactly the examples the unpacked job trains on (same ids, same -100 prompt labels,
    the same ones truncated or dropped), each followed only by trained EOS."""
    import json

    from dllm_plugin.config import build_job_config
    from dllm_plugin.hosts import Host
    from dllm_plugin.run import prepare

    data = tmp_path / "rows.jsonl"
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    data.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Count to {n}.", "completion": " ".join(words[:n] * (1 + n // 4))}
            )
            + "\n"
            for n in range(1, 11)
        )
    )
    base = {"model_name": str(tiny_bert_dir), "dataset_name": str(data), "max_length": 24,
            "training_method": "bert", "truncation": truncation, "mask_prompt_loss": True,
            "eval_split_ratio": 0, "num_preview_samples": 0, "num_proc": 1}  # fmt: skip
    unpacked = prepare(build_job_config(base), Host())
    packed = prepare(build_job_config({**base, "packing": True}), Host())
    eos = unpacked.ids.eos_id
    want = sorted((r["input_ids"], r["labels"]) for r in unpacked.train)
    assert any(len(ids) == 24 for ids, _ in want) == (truncation == "right")
    found = []
    for row in packed.train:
        start = 0
        for n in row["seq_lens"]:
            ids, labels = row["input_ids"][start : start + n], row["labels"][start : start + n]
            start += n
            k = len(ids)
            while k and ids[k - 1] == eos and labels[k - 1] == eos and k > 1:
                k -= 1  # strip the trained trailing EOS (the example's own ends earlier)
            found.append((ids, labels, k))
    assert len(found) == len(want)
    matched = sorted(
        next((ids[:m], labels[:m]) for m in range(k, len(ids) + 1) if (ids[:m], labels[:m]) in want)
        for ids, labels, k in found
    )
    assert matched == want
