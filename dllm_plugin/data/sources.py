"""Where rows come from: local files and folders, `save_to_disk` folders, the hub.

JSON Lines and CSV are read here line by line rather than by `datasets`' loaders, for
three reasons: an error names the file and the line (a malformed JSON line, bytes that
are not UTF-8, an empty file); a line far longer than any row `max_length` could use is
skipped and counted before it is parsed (a 50 MB line costs a bounded read, not
gigabytes); and an empty CSV cell stays an empty string (pandas would make it NaN, which
a template renders as "None"). Parquet and `save_to_disk` folders go through `datasets`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError, first_line

logger = logging.getLogger(__name__)

FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES = ("validation", "test", "valid", "eval", "dev")
MIN_LINE_LIMIT = 1 << 20  # bytes: never skip a line shorter than 1 MiB
BYTES_PER_TOKEN_LIMIT = 1024  # a line longer than this per max_length token is unusable


def line_limit(max_length: int) -> int:
    """The longest line worth parsing: 1 KiB per token of `max_length`, at least 1 MiB.

    Real tokenizers average a few bytes per token, so a longer row would be cut or
    dropped by truncation anyway; the bound is generous on purpose.
    """
    return max(MIN_LINE_LIMIT, BYTES_PER_TOKEN_LIMIT * int(max_length))


def load_local_dataset(path: Path, max_line_bytes: int) -> datasets.DatasetDict:
    """A DatasetDict from a file, a save_to_disk folder or a folder of data files
    (files named train*/validation*/test*/... become those splits)."""
    if path.is_file():
        return datasets.DatasetDict({"train": load_files([path], max_line_bytes)})
    if not path.is_dir():
        raise DataError(f"dataset_name: the file or folder {str(path)!r} does not exist")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"dataset folder {str(path)!r} cannot be read: {e}") from None
        return as_dataset_dict(loaded)
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in FILE_KINDS and not is_registry_record(p)
    )
    if not files:
        raise DataError(
            f"dataset folder {str(path)!r} holds no data: expected {', '.join(FILE_KINDS)} "
            "files or a save_to_disk folder"
        )
    by_split: dict[str, list[Path]] = {}
    for f in files:
        split = next(
            (s for s in ("train", *EVAL_SPLIT_NAMES) if f.stem.lower().startswith(s)), "train"
        )
        by_split.setdefault(split, []).append(f)
    return datasets.DatasetDict(
        {split: load_files(fs, max_line_bytes) for split, fs in by_split.items()}
    )


def is_registry_record(path: Path) -> bool:
    """Transformer Lab's own record of a dataset folder (index.json with a dataset_id),
    which sits beside the data files and is not a row."""
    if path.name != "index.json":
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "dataset_id" in record


def load_files(files: list[Path], max_line_bytes: int) -> datasets.Dataset:
    """One split from files of one kind; every file must hold at least one row."""
    kinds = {FILE_KINDS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(
            f"cannot load {', '.join(map(str, files))}: expected files of one kind among "
            f"{', '.join(FILE_KINDS)}"
        )
    kind = kinds.pop()
    if kind == "parquet":
        try:
            return datasets.load_dataset(
                "parquet", data_files=[str(f) for f in files], split="train"
            )
        except Exception as e:
            raise DataError(f"cannot read {', '.join(map(str, files))}: {e}") from None
    rows: list[dict[str, Any]] = []
    for f in files:
        found, skipped = read_rows(f, max_line_bytes)
        if skipped:
            logger.warning(
                "%s: skipped %d line(s) longer than %d bytes (no row that long fits max_length)",
                f,
                skipped,
                max_line_bytes,
            )
        if not found:
            raise DataError(f"dataset file {str(f)!r} holds no rows (it is empty or blank)")
        rows += found
    return rows_to_dataset(rows, files)


def read_rows(path: Path, max_line_bytes: int) -> tuple[list[dict[str, Any]], int]:
    """(rows, lines skipped as too long) of one JSON, JSON Lines or CSV file."""
    if path.suffix.lower() == ".csv":
        return _read_csv(path, max_line_bytes)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        return _read_json_array(path), 0
    return _read_json_lines(path, max_line_bytes)


def _bounded_lines(path: Path, limit: int) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, line bytes) per line; None for a line over `limit` bytes,
    which is skipped without ever holding more than `limit` bytes of it."""
    with open(path, "rb") as f:
        number, offset = 0, 0
        while True:
            chunk = f.readline(limit + 1)
            if not chunk:
                return
            number += 1
            start = offset
            offset += len(chunk)
            if len(chunk) > limit and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):  # drain the rest of the line
                    chunk = f.readline(limit + 1)
                    offset += len(chunk)
                yield number, start, None
                continue
            yield number, start, chunk


def _decode(path: Path, number: int, offset: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"dataset file {str(path)!r} line {number} is not UTF-8 text "
            f"(byte offset {offset + e.start}: 0x{raw[e.start]:02x})"
        ) from None


def _read_json_lines(path: Path, limit: int) -> tuple[list[dict[str, Any]], int]:
    rows, skipped = [], 0
    for number, offset, raw in _bounded_lines(path, limit):
        if raw is None:
            skipped += 1
            continue
        text = _decode(path, number, offset, raw)
        if number == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(
                f"dataset file {str(path)!r} line {number} is not valid JSON: {e}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"dataset file {str(path)!r} line {number} must be a JSON object (one row), "
                f"got {type(row).__name__}"
            )
        rows.append(row)
    return rows, skipped


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    text = _decode(path, 1, 0, raw) if raw else ""
    try:
        data = json.loads(text.lstrip("\ufeff"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"dataset file {str(path)!r} is not valid JSON: {e}") from None
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(
                f"dataset file {str(path)!r} item {index} must be a JSON object (one row), "
                f"got {type(row).__name__}"
            )
    return data


def _read_csv(path: Path, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Rows of a CSV file with a header line; empty cells are empty strings."""
    skipped = 0
    lines: list[str] = []
    for number, offset, raw in _bounded_lines(path, limit):
        if raw is None:
            skipped += 1
            continue
        text = _decode(path, number, offset, raw)
        lines.append(text.lstrip("\ufeff") if number == 1 else text)
    if not "".join(lines).strip():
        return [], skipped
    csv.field_size_limit(max(limit, csv.field_size_limit()))
    reader = csv.DictReader(io.StringIO("".join(lines)))
    rows = []
    try:
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(
                    f"dataset file {str(path)!r} line {reader.line_num}: the number of cells "
                    f"differs from the header's {len(reader.fieldnames or [])} columns"
                )
            rows.append(dict(row))
    except csv.Error as e:
        raise DataError(f"dataset file {str(path)!r} line {reader.line_num}: {e}") from None
    return rows, skipped


def rows_to_dataset(rows: list[dict[str, Any]], files: list[Path]) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as e:  # pyarrow: a column with values of different types
        raise DataError(
            f"dataset file(s) {', '.join(map(str, files))}: the rows do not share one type per "
            f"column ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_named_dataset(name: str, config_name: str | None = None) -> datasets.DatasetDict:
    """A dataset that is not a local path: the hub (or the HF cache)."""
    try:
        loaded = datasets.load_dataset(name, config_name)
    except Exception as e:
        raise DataError(
            f"dataset_name {name!r} is not a local file or folder and could not be loaded "
            f"from the hub ({first_line(e)})"
        ) from None
    return as_dataset_dict(loaded)


def as_dataset_dict(loaded: Any) -> datasets.DatasetDict:
    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    return datasets.DatasetDict({"train": loaded})
