"""Nothing lost, nothing hung: destinations that are not ours survive, one job per
output_dir, bounded templates, max_length within the model's positions, honest run
summaries, generate's arguments checked before loading, bounded reading of huge rows,
and the same job twice gives the same result."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fake_tlab.runner import REPO, quiet_env
from helpers import fixture_model_dir, write_rows

from dllm_plugin import generate
from dllm_plugin.cli import main as cli_main
from dllm_plugin.data.sft import TokenizeOptions, build_sft_dataset
from dllm_plugin.data.templates import RowTemplates
from dllm_plugin.errors import DataError
from dllm_plugin.jobdir import LOCK_NAME

ROWS = [{"prompt": f"What is {i} plus 1?", "completion": f"{i + 1}."} for i in range(12)]


def job_file(folder: Path, model: Path, **overrides) -> Path:
    data = write_rows(folder / "rows.jsonl", ROWS)
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "auto",
        "train_device": "cpu",
        "dtype": "float32",
        "batch_size": 2,
        "train_steps": 4,
        "max_length": 32,
        "learning_rate": 1e-3,
        "eval_strategy": "no",
        "save_steps": 100,
        "logging_steps": 1,
        "num_preview_samples": 0,
        "log_to_wandb": False,
        "adaptor_name": "run",
        "output_dir": str(folder / "out"),
        **overrides,
    }
    path = folder / f"job-{len(list(folder.glob('job-*.json')))}.json"
    path.write_text(json.dumps({"config": config}))
    return path


def run_cli(job: Path, capsys) -> tuple[int, str]:
    code = cli_main(["--input_file", str(job)])
    out = capsys.readouterr().out
    return code, out.strip().splitlines()[-1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def popen(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=quiet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not happen:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)


# ---- destinations ------------------------------------------------------------------------
# Training waits at its first step while the gate file exists: the test decides when.
GATED_MAIN = """
import os, sys, time
import transformers
step = transformers.Trainer.training_step
gate = sys.argv[2]
def gated_step(self, *args, **kwargs):
    while os.path.exists(gate):
        time.sleep(0.05)
    return step(self, *args, **kwargs)
transformers.Trainer.training_step = gated_step
sys.path.insert(0, sys.argv[1])
sys.argv = ["main.py", *sys.argv[3:]]
import main
main.main()
"""


def foreign_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my thesis")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return path


@pytest.mark.parametrize("which", ["foreign", "base-model", "output-dir", "dataset-folder"])
def test_an_adaptor_destination_that_is_not_ours_survives(tmp_path, capsys, tiny_bert_dir, which):
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    write_rows(data_folder / "train.jsonl", ROWS)
    dest = {
        "foreign": foreign_folder(tmp_path / "important"),
        "base-model": tiny_bert_dir,
        "output-dir": tmp_path / "out",
        "dataset-folder": data_folder,
    }[which]
    if which == "output-dir":  # checkpoints of an earlier run
        foreign_folder(dest / "checkpoint-4")
    before = tree_digest(dest)
    job = job_file(
        tmp_path,
        tiny_bert_dir,
        lora=True,
        adaptor_output_dir=str(dest),
        dataset_name=str(data_folder),
    )
    code, last = run_cli(job, capsys)
    assert code == 1 and "adaptor_output_dir:" in last, last
    assert tree_digest(dest) == before
    assert not (tmp_path / "out" / "run_summary.json").exists()  # refused before it started


def test_a_full_model_destination_that_is_not_ours_survives(tmp_path, capsys, tiny_bert_dir):
    dest = foreign_folder(tmp_path / "out" / "models" / f"{tiny_bert_dir.name}_run")
    before = tree_digest(dest)
    code, last = run_cli(job_file(tmp_path, tiny_bert_dir), capsys)
    assert code == 1 and "holds files this trainer did not write" in last, last
    assert tree_digest(dest) == before


def test_our_own_earlier_outputs_and_legacy_adaptors_are_replaced(tmp_path, capsys, tiny_bert_dir):
    legacy = tmp_path / "adaptors" / "old"
    legacy.mkdir(parents=True)
    (legacy / "adapter_config.json").write_text("{}")  # written by the original plugin
    job = job_file(tmp_path, tiny_bert_dir, lora=True, adaptor_output_dir=str(legacy))
    assert run_cli(job, capsys)[0] == 0
    assert json.loads((legacy / ".dllm-trainer.json").read_text())["written_by"] == "dllm-trainer"
    assert run_cli(job, capsys)[0] == 0  # ours now: a rerun replaces it again


# ---- one job per output_dir ------------------------------------------------------------------
def test_two_jobs_on_one_output_dir_exactly_one_runs(tmp_path, tiny_bert_dir):
    gate = tmp_path / "gate"
    gate.touch()
    first = popen(
        "-c",
        GATED_MAIN,
        str(REPO),
        str(gate),
        "--input_file",
        str(job_file(tmp_path, tiny_bert_dir, train_steps=8)),
        cwd=tmp_path,
    )
    out = tmp_path / "out"
    wait_for(lambda: (out / LOCK_NAME).is_file(), first, "the first job's lock")
    started = time.monotonic()
    second = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            "--input_file",
            str(job_file(tmp_path, tiny_bert_dir)),
        ],
        cwd=tmp_path,
        env=quiet_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.poll() is None
    gate.unlink()
    assert second.returncode == 1
    last = second.stdout.strip().splitlines()[-1]
    assert f"pid {first.pid}" in last and "is in use by another job" in last, last
    assert time.monotonic() - started < 60  # at once: no data or weights were loaded
    output, _ = first.communicate(timeout=240)
    assert first.returncode == 0, output[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 8
    assert not (out / LOCK_NAME).exists()  # released


# ---- honest summaries --------------------------------------------------------------------------
def test_a_failed_rerun_does_not_leave_the_old_complete_summary(tmp_path, capsys, tiny_bert_dir):
    code, last = run_cli(job_file(tmp_path, tiny_bert_dir), capsys)
    assert code == 0, last
    bad = job_file(
        tmp_path, tiny_bert_dir, input_template="{{ nope }}", output_template="{{ completion }}"
    )
    code, last = run_cli(bad, capsys)
    assert code == 1
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["status"] == "failed" and "input_template" in summary["reason"]
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_killed_rerun_does_not_leave_the_old_complete_summary(tmp_path, capsys, tiny_bert_dir):
    assert run_cli(job_file(tmp_path, tiny_bert_dir), capsys)[0] == 0
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    gate.touch()  # the rerun waits at its first step until it is killed
    proc = popen(
        "-c",
        GATED_MAIN,
        str(REPO),
        str(gate),
        "--input_file",
        str(job_file(tmp_path, tiny_bert_dir)),
        cwd=tmp_path,
    )

    def rerun_is_training() -> bool:
        summary = json.loads((out / "run_summary.json").read_text())
        return summary.get("pid") == proc.pid and len(list(out.glob("tensorboard/*"))) == 2

    wait_for(rerun_is_training, proc, "the rerun's start")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "running" and summary["pid"] == proc.pid
    # the killed job's lock is stale: the next job takes it over and finishes
    code, _ = run_cli(job_file(tmp_path, tiny_bert_dir), capsys)
    assert code == 0
    assert json.loads((out / "run_summary.json").read_text())["status"] == "complete"


# ---- templates, lengths, empty values ------------------------------------------------------------
def test_a_template_that_would_run_forever_ends_within_its_limit_naming_the_row():
    nested = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    silent = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    for template in (nested, silent, '{{ "x" * 10 ** 10 }}'):
        started = time.monotonic()
        with pytest.raises(DataError, match=r"^row 3: input_template (took|produced|would)"):
            RowTemplates(template, "{{ a }}").render("input_template", {"a": "b"}, 3)
        assert time.monotonic() - started < 10


def test_max_length_above_the_position_limit_is_clamped_with_one_warning(
    tmp_path, capsys, tiny_bert_dir
):
    long_rows = [{"prompt": "word " * 40, "completion": "yes " * 300} for _ in range(4)]
    data = write_rows(tmp_path / "long.jsonl", long_rows)
    job = job_file(tmp_path, tiny_bert_dir, max_length=1024, dataset_name=str(data), train_steps=2)
    code = cli_main(["--input_file", str(job)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    warning = "max_length 1024 is more than this model's 128 positions: using max_length 128"
    assert [line for line in out.splitlines() if "positions" in line] == [
        line for line in out.splitlines() if line.endswith(warning)
    ]
    assert out.count(warning) == 1


def test_empty_answers_are_dropped_and_counted(minilm_tokenizer, caplog):
    import datasets

    rows = datasets.Dataset.from_list(
        [
            {"prompt": "a", "completion": "b"},
            {"prompt": "c", "completion": ""},
            {"prompt": "d", "completion": "e"},
        ]
    )
    kept = build_sft_dataset(
        rows, minilm_tokenizer, RowTemplates(), TokenizeOptions(32, "right", True), 1
    )
    assert len(kept) == 2
    assert "dropped 1 of 3 rows: 1 with an empty answer" in caplog.text


def test_a_missing_value_renders_as_an_empty_string():
    templates = RowTemplates("{{ instruction }}|{{ input }}", "{{ output }}")
    row = {"instruction": "Say hi", "input": None, "output": "hello"}
    assert templates.render("input_template", row, 0) == "Say hi|"


# ---- generate checks its arguments before loading the model --------------------------------------
@pytest.fixture
def no_weights_loaded(monkeypatch):
    monkeypatch.setattr(
        generate, "load_weights", lambda *a, **k: pytest.fail("weights were loaded")
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
        (["--steps", "0"], "--steps: must be >= 1, got 0"),
        (["--block-size", "-2"], "--block-size: must be >= 1, got -2"),
        (["--temperature", "-1"], "--temperature: must be >= 0, got -1.0"),
        (["--algorithm", "psychic"], "--algorithm: 'psychic' is not one of low_confidence, random"),
        (["--device", "cuda"], "--device: 'cuda' is not available here"),
        (["--prompt", "x" * 80], "is more than the model's limit of 64 positions"),
        (
            ["--adaptor", "/no/such/adaptor"],
            "--adaptor: '/no/such/adaptor' is not a LoRA adaptor folder",
        ),
    ],
)
def test_generate_argument_errors_name_the_flag_before_any_weight_loads(
    tmp_path, capsys, no_weights_loaded, extra, message
):
    model = fixture_model_dir("tiny-llada", tmp_path / "tiny-llada")
    args = ["--model", str(model), "--prompt", "hi", "--max-new-tokens", "8", *extra]
    assert generate.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"error: {err.splitlines()[-1].removeprefix('error: ')}"
    assert message in err and "Traceback" not in err, err


# ---- a 50 MB row -------------------------------------------------------------------------------------
def test_a_50_mb_row_is_skipped_with_little_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
        f.write('{"prompt": "' + "x" * 50_000_000 + '", "completion": "y"}\n')
        f.write(json.dumps({"prompt": "c", "completion": "d"}) + "\n")
    probe = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from dllm_plugin.data.sources import line_limit, load_local_dataset
        import datasets
        datasets.Dataset.from_list([{{"a": "b"}}])  # warm up the arrow machinery
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = load_local_dataset(Path({str(path)!r}), line_limit(1024))["train"]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(rows), (after - before) // 1024)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, grown_mb = map(int, done.stdout.split())
    assert count == 2
    assert grown_mb < 500, f"reading the file grew memory by {grown_mb} MB"


# ---- the same job twice -------------------------------------------------------------------------------
def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(next(folder.glob("models/*/model.safetensors")))


def test_the_same_job_twice_gives_the_same_losses_and_weights(tmp_path, capsys, minilm_path):
    """MiniLM ships without its MLM head: the fresh head must come from the job's seed."""
    runs = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        job = job_file(folder, minilm_path, training_method="bert", train_steps=4, seed=3)
        assert run_cli(job, capsys)[0] == 0
        summary = json.loads((folder / "out" / "run_summary.json").read_text())
        losses = [e["loss"] for e in summary["log_history"] if "loss" in e]
        runs.append((losses, weights(folder / "out")))
    (losses_one, w_one), (losses_two, w_two) = runs
    assert losses_one == losses_two and len(losses_one) == 4
    worst = max((w_one[k] - w_two[k]).abs().max().item() for k in w_one)
    assert worst <= 1e-6, worst
