"""Writes that readers never see half done: a temporary sibling, then one rename.

Files (JSON, text, plots) and whole folders (models, adaptors) go through here; a crash
leaves the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary sibling of `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str))


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `dest` in one rename.

    Whether `dest` may be replaced at all is the caller's decision (outputs.py checks
    that it is empty or ours before training starts).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(dest)
    tmp = _sibling(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = _sibling(dest, "old")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:  # put the old folder back rather than leave none
        if old is not None:
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_folder(dest: Path) -> None:
    """Tidy up after a process killed inside atomic_folder: put back the old folder if it
    was killed between the two renames, and delete half-written temporaries."""
    dest, name = Path(dest), glob.escape(Path(dest).name)
    olds = sorted(dest.parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not dest.exists():
        logger.warning("restoring %s from %s (a save was interrupted)", dest, olds[-1].name)
        os.replace(olds.pop(), dest)
    for leftover in [*olds, *dest.parent.glob(f".{name}.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
