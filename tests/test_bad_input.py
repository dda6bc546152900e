"""Every kind of bad input a user can make: exit 1, the reason as the one last line of
stdout and of stderr, no traceback, and nothing written into the output folder but a
run_summary.json that records the failure (errors found before the job starts write
nothing at all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import LLADA_SPECIALS, char_tokenizer, copy_fixture, write_rows

from dllm_plugin.cli import main as cli_main

ROWS = [{"prompt": f"What is {i} plus 1?", "completion": f"{i + 1}."} for i in range(12)]


def base_config(tmp_path: Path, model: Path) -> dict:
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    return {
        "model_name": str(model),
        "dataset_name": str(data),
        "training_method": "auto",
        "train_device": "cpu",
        "dtype": "float32",
        "batch_size": 2,
        "train_steps": 2,
        "max_length": 32,
        "eval_strategy": "no",
        "num_preview_samples": 0,
        "log_to_wandb": False,
        "output_dir": str(tmp_path / "out"),
    }


def run_job_file(tmp_path: Path, content: str | bytes, capsys) -> tuple[int, str, str]:
    job = tmp_path / "job.json"
    job.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = cli_main(["--input_file", str(job)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_failure(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1] == last, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
    assert last.startswith("FAILED: ")
    for fragment in fragments:
        assert fragment in last, last
    return last


def assert_nothing_written(out_dir: Path, reason: str | None = None) -> None:
    """Nothing, or only a run_summary.json recording the failure."""
    if not out_dir.exists():
        return
    names = sorted(p.name for p in out_dir.iterdir())
    assert names in ([], ["run_summary.json"]), names
    if names:
        summary = json.loads((out_dir / "run_summary.json").read_text())
        assert summary["status"] == "failed"
        if reason:
            assert reason in summary["reason"]


# ---- the job file ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", 'must hold a JSON object {"config": {...}}, got list'),
        ('{"experiment": {"name": "x"}}', 'has no "config" object'),
        ('{"model_name": "m", "batch_size": 2}', 'has no "config" object'),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (b'{"config": {"model_name": "\xff"}}', "is not UTF-8 text (byte 27 is 0xff)"),
        ('{"config": [1]}', "'config' in"),
    ],
    ids=["not-json", "array", "no-config", "bare-config", "deep", "not-utf8", "config-list"],
)
def test_bad_job_files(tmp_path, capsys, content, fragment):
    code, out, err = run_job_file(tmp_path, content, capsys)
    assert_one_line_failure(code, out, err, "input file", fragment)


def test_missing_job_file(tmp_path, capsys):
    code = cli_main(["--input_file", str(tmp_path / "nope.json")])
    captured = capsys.readouterr()
    assert_one_line_failure(code, captured.out, captured.err, "does not exist")


# ---- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"batch_size": "many"}, "batch_size: 'many' is not allowed: must be of type integer"),
        ({"lora_r": 200}, "lora_r: 200 is not allowed: must be <= 64"),
        ({"learning_rate": 2}, "learning_rate: 2 is not allowed: must be <= 1"),
        ({"dtype": "fp8"}, "dtype: 'fp8' is not allowed: must be one of"),
        ({"training_method": "gpt"}, "training_method: 'gpt' is not allowed: must be one of"),
        ({"gpu_ids": "0;1"}, "gpu_ids: '0;1' is not allowed"),
    ],
    ids=["wrong-type", "out-of-range", "out-of-range-float", "enum", "method", "gpu-ids"],
)
def test_bad_parameters(tmp_path, capsys, tiny_bert_session, overrides, fragment):
    config = {**base_config(tmp_path, tiny_bert_session), **overrides}
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    assert_one_line_failure(code, out, err, fragment)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_cannot_be_created_names_the_field(tmp_path, capsys, tiny_bert_session):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = {**base_config(tmp_path, tiny_bert_session), "output_dir": str(blocker / "out")}
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    assert_one_line_failure(code, out, err, "output_dir: cannot create", "a-file/out")


# ---- templates and data ----------------------------------------------------------------------
def write_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (
            lambda p: {"input_template": "{{ prompt ", "output_template": "{{ completion }}"},
            ["input_template is not a valid Jinja2 template"],
        ),
        (
            lambda p: {"input_template": "{{ question }}", "output_template": "{{ completion }}"},
            ["row 0: input_template uses a column or attribute that is missing", "question"],
        ),
        (
            lambda p: {"dataset_name": write_bytes(p, "bad.jsonl", b'{"prompt": "a"}\n{oops\n')},
            ["bad.jsonl' line 2 is not valid JSON"],
        ),
        (
            lambda p: {"dataset_name": write_bytes(p, "empty.jsonl", b"")},
            ["empty.jsonl' holds no rows"],
        ),
        (
            lambda p: {"dataset_name": write_bytes(p, "blank.jsonl", b"  \n\n\t\n")},
            ["blank.jsonl' holds no rows"],
        ),
        (
            lambda p: {
                "dataset_name": write_bytes(
                    p, "latin.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n'
                )
            },
            ["latin.jsonl' line 2 is not UTF-8 text (byte offset 50: 0xe9)"],
        ),
        (
            lambda p: {"dataset_name": str(p / "no-such-rows.jsonl")},
            ["dataset_name: the file or folder", "no-such-rows.jsonl", "does not exist"],
        ),
        (
            lambda p: {"dataset_name": str((p / "empty-folder").mkdir() or p / "empty-folder")},
            ["dataset folder", "empty-folder", "holds no data"],
        ),
    ],
    ids=[
        "bad-jinja",
        "missing-column",
        "malformed-jsonl",
        "empty-file",
        "blank-file",
        "not-utf8",
        "missing-dataset",
        "folder-without-data",
    ],
)
def test_bad_templates_and_data(tmp_path, capsys, tiny_bert_session, make, fragments):
    config = {**base_config(tmp_path, tiny_bert_session), **make(tmp_path)}
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    last = assert_one_line_failure(code, out, err, *fragments)
    assert_nothing_written(tmp_path / "out", last.removeprefix("FAILED: ")[:40])


# ---- models ------------------------------------------------------------------------------------
def test_model_path_that_does_not_exist(tmp_path, capsys, tiny_bert_session):
    config = {**base_config(tmp_path, tiny_bert_session), "model_name": str(tmp_path / "nowhere")}
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    assert_one_line_failure(code, out, err, "model_name: the folder", "nowhere", "does not exist")
    assert_nothing_written(tmp_path / "out")


def test_model_config_that_is_not_json(tmp_path, capsys):
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text("{model_type: bert")
    config = base_config(tmp_path, model)
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    assert_one_line_failure(code, out, err, "model_name:", "config.json' is not valid JSON")
    assert_nothing_written(tmp_path / "out")


def test_model_without_a_mask_token(tmp_path, capsys):
    model = copy_fixture("tiny-llada", tmp_path / "no-mask-llada")
    config_path = model / "config.json"
    model_config = json.loads(config_path.read_text())
    model_config.pop("mask_token_id", None)
    config_path.write_text(json.dumps(model_config))
    specials = {k: v for k, v in LLADA_SPECIALS.items() if k != "<|mdm_mask|>"}
    char_tokenizer(specials, eos_token="<|endoftext|>").save_pretrained(model)
    config = base_config(tmp_path, model)
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    assert_one_line_failure(code, out, err, "the tokenizer has no mask token")
    assert_nothing_written(tmp_path / "out")


def test_unknown_model_family(tmp_path, capsys):
    model = tmp_path / "gpt2-ish"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    config = base_config(tmp_path, model)
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    assert_one_line_failure(code, out, err, "unsupported model: model_type 'gpt2'")


def test_an_unexpected_error_keeps_its_traceback_and_ends_with_the_reason(
    tmp_path, capsys, tiny_bert_session, monkeypatch
):
    import dllm_plugin.run as run

    def broken(*args, **kwargs):
        raise RuntimeError("something the user cannot fix")

    monkeypatch.setattr(run, "load_model", broken)
    config = base_config(tmp_path, tiny_bert_session)
    code, out, err = run_job_file(tmp_path, json.dumps({"config": config}), capsys)
    assert code == 1
    assert "Traceback" in err
    assert err.strip().splitlines()[-1] == "FAILED: RuntimeError: something the user cannot fix"
    assert out.strip().splitlines()[-1] == "FAILED: RuntimeError: something the user cannot fix"
