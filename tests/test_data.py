"""Rows -> messages (templates and inference), tokenisation with prompt masking, truncation, loading."""

from __future__ import annotations

import datasets
import pytest
from helpers import write_rows

from dllm_plugin.data.sft import (
    TokenizeOptions,
    build_sft_dataset,
    split_train_eval,
    tokenize_messages,
)
from dllm_plugin.data.sources import line_limit, load_local_dataset
from dllm_plugin.data.templates import RowTemplates, row_to_messages
from dllm_plugin.diffusion.loss import IGNORE_INDEX
from dllm_plugin.errors import DataError


def user_answer(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# ---- templates ---------------------------------------------------------------------
def test_templates_render_columns_and_system_message():
    t = RowTemplates("Q: {{ question | upper }}", "{{ answer }}!", "Be brief.")
    msgs = row_to_messages({"question": "why", "answer": "because"}, 0, t)
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: WHY"},
        {"role": "assistant", "content": "because!"},
    ]


def test_template_missing_column_names_column_row_and_columns():
    t = RowTemplates("{{ questoin }}", "{{ answer }}")
    with pytest.raises(DataError) as err:
        row_to_messages({"question": "q", "answer": "a"}, 7, t)
    message = str(err.value)
    assert "row 7" in message and "questoin" in message and "answer, question" in message


def test_template_syntax_error_names_the_template():
    with pytest.raises(DataError, match="input_template is not a valid Jinja2 template"):
        RowTemplates("{{ oops", "{{ a }}")


def test_only_one_template_is_an_error():
    with pytest.raises(DataError, match="output_template is empty but input_template is set"):
        RowTemplates("{{ q }}", "  ")


def test_template_sandbox_blocks_attribute_escape():
    t = RowTemplates("{{ q.__class__.__mro__ }}", "{{ a }}")
    with pytest.raises(DataError):
        row_to_messages({"q": "x", "a": "y"}, 0, t)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"instruction": "Add.", "input": "1 + 2", "output": "3"},
            user_answer("Add.\n\n1 + 2", "3"),
        ),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, user_answer("Say hi.", "hi")),
        ({"instruction": "Say hi.", "output": "hi"}, user_answer("Say hi.", "hi")),
        ({"prompt": "p", "completion": "c"}, user_answer("p", "c")),
        ({"prompt": "p", "response": "r"}, user_answer("p", "r")),
        ({"question": "q", "answer": "a"}, user_answer("q", "a")),
        (
            {"text": "Hello there\n\nGeneral Kenobi\n\nyes"},
            user_answer("Hello there", "General Kenobi\n\nyes"),
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, *user_answer("u", "a")]},
            [{"role": "system", "content": "s"}, *user_answer("u", "a")],
        ),
        (
            {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
            user_answer("u", "a"),
        ),
    ],
)
def test_column_inference(row, expected):
    assert row_to_messages(row, 0, RowTemplates()) == expected


def test_instruction_template_is_added_to_inferred_rows():
    msgs = row_to_messages(
        {"prompt": "p", "completion": "c"}, 0, RowTemplates(instruction_template="sys")
    )
    assert msgs[0] == {"role": "system", "content": "sys"}


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (
            {"foo": "x", "bar": "y"},
            "row 3: cannot tell prompt from answer; its columns are bar, foo",
        ),
        ({"text": "no blank line here"}, "row 3: column 'text' has no blank line"),
        ({"prompt": ["a"], "completion": "c"}, "row 3: column 'prompt' must be text, got list"),
        (
            {"messages": [{"role": "user", "content": "u"}]},
            "row 3: the last message in 'messages' must be from the assistant",
        ),
        ({"messages": []}, "row 3: column 'messages' must be a non-empty list"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "row 3: messages[0] needs a role"),
    ],
)
def test_inference_errors_name_row_and_columns(row, fragment):
    with pytest.raises(DataError) as err:
        row_to_messages(row, 3, RowTemplates())
    assert fragment in str(err.value)


# ---- tokenisation --------------------------------------------------------------------
def test_prompt_masking_on_real_chat_template(minilm_tokenizer):
    tok = minilm_tokenizer
    msgs = user_answer("What is the capital of France?", "Paris.")
    feats = tokenize_messages(msgs, tok, TokenizeOptions(128, "right", True))
    ids, labels, plen = feats["input_ids"], feats["labels"], feats["prompt_len"]
    assert (
        tok.decode(ids)
        == "[CLS] user : what is the capital of france? [SEP] assistant : paris. [SEP]"
    )
    assert tok.decode(ids[:plen]) == "[CLS] user : what is the capital of france? [SEP] assistant :"
    assert labels[:plen] == [IGNORE_INDEX] * plen
    assert labels[plen:] == ids[plen:]
    assert tok.decode(labels[plen:]) == "paris. [SEP]"
    unmasked = tokenize_messages(msgs, tok, TokenizeOptions(128, "right", False))
    assert unmasked["labels"] == unmasked["input_ids"] == ids


def test_truncation_right_cuts_and_drops_long_prompts(minilm_tokenizer):
    tok = minilm_tokenizer
    msgs = user_answer("short question", "a rather long answer with many words in it")
    full = tokenize_messages(msgs, tok, TokenizeOptions(128, "right", True))
    plen = full["prompt_len"]
    cut = tokenize_messages(msgs, tok, TokenizeOptions(plen + 3, "right", True))
    assert cut["input_ids"] == full["input_ids"][: plen + 3] and len(cut["labels"]) == plen + 3
    dropped = tokenize_messages(msgs, tok, TokenizeOptions(plen - 1, "right", True))
    assert "prompt alone longer than max_length" in dropped["drop"]
    at_limit = tokenize_messages(msgs, tok, TokenizeOptions(plen, "right", True))
    assert at_limit["drop"] == "" and len(at_limit["input_ids"]) == plen


def test_truncation_filter_drops_long_examples(minilm_tokenizer):
    tok = minilm_tokenizer
    msgs = user_answer("q", "one two three four")
    n = len(tokenize_messages(msgs, tok, TokenizeOptions(128, "filter", True))["input_ids"])
    assert tokenize_messages(msgs, tok, TokenizeOptions(n, "filter", True))["drop"] == ""
    assert (
        "longer than max_length"
        in tokenize_messages(msgs, tok, TokenizeOptions(n - 1, "filter", True))["drop"]
    )


def test_build_dataset_reports_drops_and_empty_is_an_error(minilm_tokenizer, caplog):
    rows = datasets.Dataset.from_list(
        [{"prompt": "hi", "completion": "hello"}, {"prompt": "a " * 80, "completion": "x"}]
    )
    built = build_sft_dataset(
        rows, minilm_tokenizer, RowTemplates(), TokenizeOptions(32, "filter", True), 1
    )
    assert len(built) == 1 and set(built.column_names) == {"input_ids", "labels", "prompt_len"}
    assert "dropped 1 of 2 rows: 1 longer than max_length 32 (truncation=filter)" in caplog.text
    with pytest.raises(DataError, match="no train rows left after truncation: all 2 were dropped"):
        build_sft_dataset(
            rows, minilm_tokenizer, RowTemplates(), TokenizeOptions(4, "filter", True), 1
        )


def test_build_dataset_bad_row_fails_with_its_index(minilm_tokenizer):
    rows = datasets.Dataset.from_list(
        [{"prompt": "p", "completion": "c"}, {"prompt": None, "completion": "c"}]
    )
    with pytest.raises(DataError, match="row 1: cannot tell prompt from answer"):
        build_sft_dataset(
            rows, minilm_tokenizer, RowTemplates(), TokenizeOptions(32, "right", True), 1
        )


# ---- loading and splits ----------------------------------------------------------------
ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(12)]


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_load_file_kinds(tmp_path, kind):
    path = tmp_path / f"data.{kind}"
    frame = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        write_rows(path, ROWS)
    elif kind == "json":
        frame.to_json(path, lines=False)
    elif kind == "csv":
        frame.to_csv(path)
    else:
        frame.to_parquet(path)
    dsd = load_local_dataset(path, line_limit(64))
    assert list(dsd) == ["train"] and dsd["train"][3] == ROWS[3]


def test_load_folder_of_split_files_and_save_to_disk(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_rows(folder / "train.jsonl", ROWS[:8])
    write_rows(folder / "test.jsonl", ROWS[8:])
    dsd = load_local_dataset(folder, line_limit(64))
    assert len(dsd["train"]) == 8 and len(dsd["test"]) == 4
    train, evalset = split_train_eval(dsd, 0.1, 0)
    assert len(train) == 8 and len(evalset) == 4
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    assert len(load_local_dataset(saved, line_limit(64))["train"]) == 12


def test_eval_split_ratio_and_small_datasets():
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    train, evalset = split_train_eval(dsd, 0.25, 0)
    assert (len(train), len(evalset)) == (9, 3)
    assert split_train_eval(dsd, 0.0, 0)[1] is None
    small = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:9])})
    assert split_train_eval(small, 0.25, 0)[1] is None


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda p: p / "missing.jsonl", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no"),
        (
            lambda p: (p / "bad.jsonl").write_text('{"a": 1}\n{not json\n') and p / "bad.jsonl",
            r"bad.jsonl' line 2 is not valid JSON",
        ),
        (lambda p: ((p / "e.jsonl").write_text(""), p / "e.jsonl")[1], "holds no rows"),
        (lambda p: (p / "w.jsonl").write_text(" \n\t\n") and p / "w.jsonl", "holds no rows"),
        (
            lambda p: ((p / "b.jsonl").write_bytes(b'{"a": "ok"}\n{"a": "\xff"}\n'), p / "b.jsonl")[
                1
            ],
            r"b.jsonl' line 2 is not UTF-8 text \(byte offset 19: 0xff\)",
        ),
        (
            lambda p: (p / "l.jsonl").write_text("[1, 2]\n") and p / "l.jsonl",
            "must be a JSON object",
        ),
        (
            lambda p: (p / "c.csv").write_text("a,b\n1,2,3\n") and p / "c.csv",
            r"c.csv' line 2: the number of cells differs",
        ),
    ],
)
def test_load_errors_name_the_path(tmp_path, setup, fragment):
    with pytest.raises(DataError, match=fragment):
        load_local_dataset(setup(tmp_path), line_limit(64))


def test_empty_csv_cells_are_empty_strings_not_none(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nSay hi,,hello\n")
    row = load_local_dataset(path, line_limit(64))["train"][0]
    assert row == {"instruction": "Say hi", "input": "", "output": "hello"}
    assert row_to_messages(row, 0, RowTemplates())[0]["content"] == "Say hi"


def test_a_line_too_long_for_max_length_is_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    long_row = '{"prompt": "' + "x" * (line_limit(8) + 10) + '", "completion": "y"}\n'
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n' + long_row + '{"prompt": "c", "completion": "d"}\n'
    )
    rows = load_local_dataset(path, line_limit(8))["train"]
    assert [r["prompt"] for r in rows] == ["a", "c"]
    assert "skipped 1 line(s) longer than" in caplog.text
