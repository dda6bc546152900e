"""MDLM and Dream losses against brute-force references; invariance under gradient accumulation."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from helpers import grad_recorder, tiny_bert_mlm
from transformers import BertForMaskedLM

from dllm_plugin.data.collators import MDLMCollator, PackedCollator
from dllm_plugin.data.packing import PackOptions, pack_dataset
from dllm_plugin.rng import keyed_generator
from dllm_plugin.trainers import (
    DreamTrainer,
    DreamTrainingArguments,
    MDLMTrainer,
    MDLMTrainingArguments,
)

pytestmark = pytest.mark.usefixtures("single_thread")

V, MASK, PAD, BOS = 40, 39, 38, 37
EPS = 1e-3


def tiny_bert(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return tiny_bert_mlm(V)


def toy_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt
    labels[1, :2] = -100
    ids[2, 9:] = PAD  # padding keeps real labels (the SFT recipe)
    labels[2, 9:] = PAD
    return {"input_ids": ids, "labels": labels}


def make_trainer(cls, tmp_path, model, **cfg):
    config_cls = DreamTrainingArguments if cls is DreamTrainer else MDLMTrainingArguments
    args = config_cls(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=3,
        seed=5,
        **cfg,
    )
    return cls(model=model, args=args, mask_token_id=MASK, bos_token_id=BOS)


def reference_noise(seed: int, labels: torch.Tensor, schedule: str):
    """The documented draw: per row a generator keyed (seed, 0, step 0, row); t then uniforms."""
    ts, masked = [], []
    for row in range(labels.shape[0]):
        g = keyed_generator(seed, 0, 0, row)
        t = EPS + (1 - EPS) * torch.rand(1, generator=g)
        p = t if schedule == "linear" else torch.cos(math.pi / 2 * (1 - t))
        u = torch.rand(1, labels.shape[1], generator=g)
        ts.append(t)
        masked.append((u < p[:, None]) & (labels[row : row + 1] != -100))
    return torch.cat(ts), torch.cat(masked)


def weight_of(schedule: str, t: float) -> float:
    if schedule == "linear":
        return 1 / t
    # -alpha'(t) / (1 - alpha(t)) with alpha = 1 - cos(pi/2 (1 - t))
    return (math.pi / 2) * math.sin(math.pi / 2 * (1 - t)) / math.cos(math.pi / 2 * (1 - t))


def brute_force_mdlm(model, batch, t, masked, schedule, weighting, norm, shift=False, cart_p=None):
    ids, labels = batch["input_ids"], batch["labels"]
    noised = torch.where(masked, torch.full_like(ids, MASK), ids)
    with torch.no_grad():
        logits = model(input_ids=noised).logits.double()
    b, length = ids.shape
    maskable = labels != -100
    total, per_row = 0.0, [0.0] * b
    for i in range(b):
        for j in range(length):
            if not masked[i, j]:
                continue
            src = j - 1 if shift else j
            ce = -torch.log_softmax(logits[i, src], -1)[ids[i, j]].item()
            if cart_p is not None:
                w = sum(
                    0.5 * cart_p * (1 - cart_p) ** (abs(j - k) - 1)
                    for k in range(length)
                    if k != j and not masked[i, k]
                )
            elif weighting == "uniform":
                w = 1.0
            else:
                w = weight_of(schedule, t[i].item())
            per_row[i] += w * ce
            total += w * ce
    if norm == "token":
        return total / maskable.sum().item()
    if norm == "sequence":
        return sum(per_row[i] / max(maskable[i].sum().item(), 1) for i in range(b)) / b
    return total / b


@pytest.mark.parametrize("masked_only", [True, False])
@pytest.mark.parametrize(
    ("schedule", "weighting", "norm"),
    [
        ("linear", "scheduler", "token"),
        ("cosine", "scheduler", "sequence"),
        ("linear", "uniform", "batch"),
        ("cosine", "uniform", "token"),
    ],
)
def test_mdlm_loss_equals_brute_force(tmp_path, schedule, weighting, norm, masked_only):
    model = tiny_bert()
    trainer = make_trainer(
        MDLMTrainer,
        tmp_path,
        model,
        noise_schedule=schedule,
        loss_weight_type=weighting,
        loss_norm_type=norm,
        score_masked_only=masked_only,
    )
    batch = toy_batch()
    model.eval()  # no dropout anyway; eval keeps the reference forward identical
    model.train()
    loss = trainer.compute_loss(model, batch)
    t, masked = reference_noise(5, batch["labels"], schedule)
    assert masked.any()
    expected = brute_force_mdlm(model, batch, t, masked, schedule, weighting, norm)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_dream_loss_shifted_with_bos_and_cart_equals_brute_force(tmp_path):
    model = tiny_bert(3)
    trainer = make_trainer(DreamTrainer, tmp_path, model, loss_weight_type="cart[geo_p:0.3]")
    batch = toy_batch(2)
    batch["labels"][2, :3] = -100  # row 0 and 2 start with prompt, row 1 too after BOS prepend
    ids, labels = trainer.model_inputs(batch["input_ids"], batch["labels"])
    loss = trainer.compute_loss(model, batch)
    t, masked = reference_noise(5, labels, "linear")
    expected = brute_force_mdlm(
        model,
        {"input_ids": ids, "labels": labels},
        t,
        masked,
        "linear",
        "cart",
        "token",
        shift=True,
        cart_p=0.3,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dream_scheduler_weighting_shifted(tmp_path):
    model = tiny_bert(4)
    trainer = make_trainer(DreamTrainer, tmp_path, model, loss_weight_type="scheduler")
    batch = toy_batch(3)
    batch["labels"][:, 0] = -100  # no BOS needed
    loss = trainer.compute_loss(model, batch)
    t, masked = reference_noise(5, batch["labels"], "linear")
    expected = brute_force_mdlm(model, batch, t, masked, "linear", "scheduler", "token", shift=True)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dream_bos_rule(tmp_path):
    trainer = make_trainer(DreamTrainer, tmp_path, tiny_bert())
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    all_prompt = torch.tensor([[-100, 6, 7], [-100, -100, 10]])
    out_ids, out_labels = trainer.model_inputs(ids, all_prompt)
    assert torch.equal(out_ids, ids) and torch.equal(out_labels, all_prompt)
    one_scored = torch.tensor([[-100, 6, 7], [8, 9, 10]])
    out_ids, out_labels = trainer.model_inputs(ids, one_scored)
    assert out_ids.tolist() == [[BOS, 5, 6, 7], [BOS, 8, 9, 10]]
    assert out_labels.tolist() == [[-100, -100, 6, 7], [-100, 8, 9, 10]]


def test_bad_loss_options_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="cart"):
        make_trainer(MDLMTrainer, tmp_path, tiny_bert(), loss_weight_type="cart")
    with pytest.raises(ValueError, match="loss_norm_type"):
        make_trainer(MDLMTrainer, tmp_path, tiny_bert(), loss_norm_type="tokens")


# ---- gradient accumulation invariance ---------------------------------------------------
def run_steps(tmp_path, batch_size: int, accumulation: int, norm: str, packing=False, **extra):
    """Two optimizer steps; losses and the first step's gradients.

    Padded rows have equal lengths: padding is trained as end-of-answer, so a row's
    padding (and with it the loss) depends on how wide its batch is; only equal widths
    make GA comparable. Packed rows hold examples of varied lengths: each example sees
    only itself, so the width of a micro-batch does not matter.
    """
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(20 if packing else 8):
        n = 4 + (i * 5) % 9 if packing else 9
        ids = torch.randint(0, 30, (n,), generator=g).tolist()
        plen = 1 + i % 3
        rows.append({"input_ids": ids, "labels": [-100] * plen + ids[plen:], "prompt_len": plen})
    dataset = datasets.Dataset.from_list(rows)
    collator = MDLMCollator(pad_token_id=PAD)
    if packing:
        opts = PackOptions(max_length=24, eos_id=PAD, trailing_eos=3, seed=0)
        dataset = pack_dataset(dataset.remove_columns("prompt_len"), opts)
        assert len(dataset) >= 8 and max(len(r) for r in dataset["seq_lens"]) >= 2
        collator = PackedCollator(pad_token_id=PAD)
    recorder = grad_recorder()
    args = MDLMTrainingArguments(
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
        loss_norm_type=norm,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        **extra,
    )
    trainer = MDLMTrainer(
        model=tiny_bert(7),
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        mask_token_id=MASK,
        callbacks=[recorder],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, recorder.grads


@pytest.mark.parametrize(
    ("norm", "packing", "estimator"),
    [
        ("token", False, {}),
        ("sequence", False, {}),
        ("token", True, {}),
        ("sequence", True, {}),
        ("batch", False, {"timestep_sampling": "stratified"}),
        ("token", False, {"complementary_masking": True}),
        ("sequence", True, {"timestep_sampling": "stratified", "complementary_masking": True}),
    ],
)
def test_loss_and_gradients_do_not_depend_on_gradient_accumulation(
    tmp_path, norm, packing, estimator
):
    losses_1, grads_1 = run_steps(tmp_path / "a", 4, 1, norm, packing, **estimator)
    losses_2, grads_2 = run_steps(tmp_path / "b", 2, 2, norm, packing, **estimator)
    assert len(losses_1) == len(losses_2) == 2
    assert losses_1 == pytest.approx(losses_2, rel=1e-5)
    assert losses_1[0] > (0.3 if norm == "batch" else 1.0)  # a real loss, not a scaled-away one
    for name, grad in grads_1[0].items():
        torch.testing.assert_close(grad, grads_2[0][name], rtol=1e-4, atol=1e-6)
