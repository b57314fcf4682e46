"""Writes that never leave half an artifact: build beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedgen.errors import FedgenError

__all__ = ["atomic_dir", "atomic_file", "write_text", "write_json", "read_text_records"]


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix) that replaces `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, target)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


def write_json(path: str | Path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str))


def read_text_records(path: str | Path) -> list[dict]:
    """The objects of a JSON-lines file whose lines each carry a "text" string.

    Line i is record i (PHI truth indices rely on it), so lines end at "\\n" only: a note may
    hold other line breaks (U+2028, form feeds) that ``str.splitlines`` would split on.
    Every problem is a FedgenError naming the file and line.
    """
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise FedgenError(f"{path}: no such file") from None
    try:
        lines = content.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as error:
        raise FedgenError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise FedgenError(f"{path} line {number}: blank line (one JSON object per line)")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise FedgenError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise FedgenError(f'{path} line {number}: no "text" string in {line[:60]!r}')
        records.append(record)
    return records
