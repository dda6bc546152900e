"""lm-evaluation-harness with our `dllm` model type, offline over a local task folder
(tests/helpers.py write_lm_eval_tasks), on a tiny LLaDA trained with LoRA to answer PAIRS
(conftest.py trained_llada); `eval_tasks` after training; the documented command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PAIRS, REPO, fixture_model_dir, one_torch_thread, write_rows

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (setup.sh --dev)")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dllm_plugin.cli import main as cli_main  # noqa: E402
from dllm_plugin.evaluation.lm_eval_model import MODEL_TYPE, DiffusionLM  # noqa: E402

MC = dict(mc_samples=8, mc_batch=16, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def evaluate(tasks_dir: Path, **model_args) -> dict:
    """simple_evaluate by model type name, as the CLI does (the registry builds the model)."""
    return lm_eval.simple_evaluate(
        model=MODEL_TYPE,
        model_args={**MC, "device": "cpu", **{k: str(v) for k, v in model_args.items()}},
        tasks=["pairs_gen", "pairs_mc"],
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
    )


def loglikelihoods(output: dict) -> list[list[float]]:
    """Per multiple-choice question: the log-likelihood of each choice."""
    samples = sorted(output["samples"]["pairs_mc"], key=lambda s: s["doc_id"])
    return [[resp[0] for resp in s["filtered_resps"]] for s in samples]


def generations(output: dict) -> list[str]:
    samples = sorted(output["samples"]["pairs_gen"], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


@pytest.fixture(scope="module")
def with_adaptor(trained_llada, lm_eval_tasks_dir) -> dict:
    return evaluate(
        lm_eval_tasks_dir,
        pretrained=trained_llada["base"],
        adaptor=trained_llada["adaptor"],
    )


def test_trained_model_answers_exactly_and_the_base_model_does_not(
    trained_llada, lm_eval_tasks_dir, with_adaptor
):
    assert with_adaptor["results"]["pairs_gen"]["exact_match,none"] == 1.0
    assert generations(with_adaptor) == [c for _, c in PAIRS]
    base = evaluate(lm_eval_tasks_dir, pretrained=trained_llada["base"])
    assert base["results"]["pairs_gen"]["exact_match,none"] < 1.0


def test_loglikelihood_prefers_the_trained_answer_over_a_distractor(with_adaptor):
    assert with_adaptor["results"]["pairs_mc"]["acc,none"] == 1.0
    for trained, distractor in loglikelihoods(with_adaptor):
        assert trained > distractor + 1.0  # nats: a clear preference, not a coin flip


def test_base_plus_adaptor_equals_the_merged_model(trained_llada, lm_eval_tasks_dir, with_adaptor):
    merged = evaluate(lm_eval_tasks_dir, pretrained=trained_llada["merged"])
    for ours, theirs in zip(loglikelihoods(with_adaptor), loglikelihoods(merged), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-4)
    assert generations(merged) == generations(with_adaptor)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_stop_sequences_are_honoured(trained_llada):
    lm = DiffusionLM(pretrained=str(trained_llada["merged"]), device="cpu", **MC)
    prompt = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    full, cut, text = lm.generate_until(
        [
            request("generate_until", prompt, {"until": ["\n"], "max_gen_toks": 8}),
            request("generate_until", prompt, {"until": ["Q:", "ll"], "max_gen_toks": 8}),
            request("generate_until", "", {"until": "o", "max_gen_toks": 4}),
        ]
    )
    assert full == "hello" and cut == "he"
    assert isinstance(text, str) and "o" not in text


@pytest.mark.parametrize("family", ["tiny-dream", "tiny-llada"])
def test_every_family_scores_deterministically(tmp_path, family):
    """A base model of each family: finite log-likelihoods that do not depend on the
    request order, a rolling log-likelihood, and generation (BERT: the next test)."""
    lm = DiffusionLM(pretrained=str(fixture_model_dir(family, tmp_path / family)), **MC)
    pairs = [("Q: sky?\nA:", " blue"), ("", "hello there"), ("hi", " two")]
    first = lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
    reverse = lm.loglikelihood([request("loglikelihood", *p) for p in reversed(pairs)])
    assert first == list(reversed(reverse))
    assert all(ll < 0 and not greedy for ll, greedy in first)
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", "hello there")])
    assert rolling == first[1][0]  # one window, no context: the same row, the same draws
    (text,) = lm.generate_until([request("generate_until", "hi", {"until": [], "max_gen_toks": 3})])
    assert isinstance(text, str)


def test_bert_wraps_rows_in_its_special_tokens(tiny_bert_dir):
    lm = DiffusionLM(pretrained=str(tiny_bert_dir), **MC)
    tok = lm.loaded.tokenizer
    context, continuation = lm._encode_pair("the sky is", " blue")
    row = lm._row(context, continuation)
    assert row.input_ids[0] == tok.cls_token_id and row.input_ids[-1] == tok.sep_token_id
    scored = [x for x, y in zip(row.input_ids, row.labels, strict=True) if y != -100]
    assert tok.decode(scored) == "blue"
    ((ll, _),) = lm.loglikelihood([request("loglikelihood", "the sky is", " blue")])
    assert ll < 0


def samples_file(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda s: s["doc_id"])


def test_the_documented_command_gives_the_same_numbers_in_a_new_process(
    trained_llada, lm_eval_tasks_dir, with_adaptor, tmp_path
):
    """README: python -m dllm_plugin.evaluation.lm_eval_cli --model dllm --model_args ...;
    a second run, in another process and through lm-eval's CLI, gives identical numbers."""
    out = tmp_path / "results"
    model_args = ",".join(
        [f"pretrained={trained_llada['base']}", f"adaptor={trained_llada['adaptor']}"]
        + [f"{k}={v}" for k, v in MC.items()]
    )
    command = [
        sys.executable, "-m", "dllm_plugin.evaluation.lm_eval_cli",
        "--model", "dllm",
        "--model_args", model_args,
        "--tasks", "pairs_gen,pairs_mc",
        "--include_path", str(lm_eval_tasks_dir),
        "--apply_chat_template",
        "--device", "cpu",
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    # one thread, as this process (tests/helpers.py one_torch_thread): the same arithmetic
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert results["pairs_gen"]["exact_match,none"] == 1.0
    assert results["pairs_mc"]["acc,none"] == 1.0
    # the samples file keeps each (log-likelihood, is_greedy) as strings
    again = [[float(r[0]) for r in s["filtered_resps"]] for s in samples_file(out, "pairs_mc")]
    assert again == loglikelihoods(with_adaptor)
    texts = [s["filtered_resps"][0] for s in samples_file(out, "pairs_gen")]
    assert texts == generations(with_adaptor)


# ---- eval_tasks: lm-eval on the trained model, inside the training job ------------------
def test_eval_tasks_run_after_training_into_the_summary(trained_llada):
    summary = trained_llada["summary"]
    assert summary["lm_eval"]["status"] == "complete"
    assert summary["lm_eval"]["results"]["pairs_gen"]["exact_match,none"] == 1.0
    for key in ("lm_eval/pairs_gen/exact_match", "lm_eval/pairs_mc/acc"):
        assert summary["metrics"][key] == 1.0 and summary["score"][key] == 1.0
    assert any("lm_eval/pairs_mc/acc" in entry for entry in summary["log_history"])


def job_file(tmp_path: Path, **overrides) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = fixture_model_dir("tiny-llada", tmp_path / "tiny-llada")
    data = write_rows(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "auto",
        "train_device": "cpu",
        "batch_size": 4,
        "train_steps": 2,
        "max_length": 64,
        "eval_strategy": "no",
        "save_steps": 1.0,
        "num_preview_samples": 0,
        "output_dir": str(tmp_path / "out"),
        "adaptor_name": "pairs",
        **overrides,
    }
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"config": config}))
    return job


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_a_task_that_needs_a_download_fails_after_the_model_is_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert cli_main(["--input_file", str(job_file(tmp_path, eval_tasks="arc_easy"))]) == 1
    line = last_line(capsys)
    assert line.startswith("FAILED: eval_tasks: lm-eval task 'arc_easy' needs a download")
    model = tmp_path / "out" / "models" / "tiny-llada_pairs"
    assert (model / "model.safetensors").is_file()
    assert line.endswith(f"the trained model is saved in {model}")
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["lm_eval"]["status"] == "failed" and summary["output_path"] == str(model)


def test_without_lm_eval_eval_tasks_fail_at_once_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert cli_main(["--input_file", str(job_file(tmp_path, eval_tasks="pairs_gen"))]) == 1
    line = last_line(capsys)
    assert line.startswith("FAILED: eval_tasks: lm-evaluation-harness is not installed")
    assert "pip install 'dllm-trainer[eval]'" in line
    assert not (tmp_path / "out" / "models").exists()  # before any training


def test_the_trainer_does_not_import_lm_eval():
    code = (
        "import sys, dllm_plugin.run, dllm_plugin.cli; "
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_task_and_missing_file_fail_before_training(tmp_path, capsys):
    assert cli_main(["--input_file", str(job_file(tmp_path, eval_tasks="no_such_task_xyz"))]) == 1
    assert "eval_tasks: unknown lm-eval task 'no_such_task_xyz'" in last_line(capsys)
    missing = str(tmp_path / "nope" / "task.yaml")
    assert cli_main(["--input_file", str(job_file(tmp_path / "b", eval_tasks=missing))]) == 1
    assert f"eval_tasks: {missing!r} does not exist" in last_line(capsys)


def test_the_readme_demo_task_asks_what_the_demo_trains_on(monkeypatch):
    """dllm_plugin/demo/lm_eval/demo_chat.yaml (the README's example) loads offline from
    the repository root and renders a row as the trainer's column inference does."""
    import json as json_module

    from dllm_plugin.data.templates import RowTemplates, row_to_messages

    monkeypatch.chdir(REPO)
    manager = TaskManager(
        include_path=str(REPO / "dllm_plugin/demo/lm_eval"), include_defaults=False
    )
    task = manager.load(["demo_chat"])["tasks"]["demo_chat"]
    docs = list(task.eval_docs)
    lines = (REPO / "dllm_plugin/demo/chat_demo.jsonl").read_text().splitlines()
    assert len(docs) == len(lines)
    for doc, line in zip(docs[:20], lines[:20], strict=True):
        messages = row_to_messages(json_module.loads(line), 0, RowTemplates("", "", ""))
        assert task.doc_to_text(doc) == messages[-2]["content"]
        assert task.doc_to_target(doc) == messages[-1]["content"]
