"""Read local data files (jsonl, json, csv, tsv) or hub datasets into records that remember where
they came from, so every later error can name the file and line.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

LOCAL_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "data/train.jsonl line 12"


def read_records(spec: str, split: str = "train") -> list[Record]:
    """Records from a local file (by extension) or, for anything else, a hub dataset name."""
    ext = os.path.splitext(spec)[1].lower()
    if os.path.isfile(spec):
        if ext not in LOCAL_EXTENSIONS:
            raise DataError(f"{spec}: unsupported file type '{ext}' (expected one of {', '.join(LOCAL_EXTENSIONS)})")
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_delimited, ".tsv": _read_delimited}
        try:
            records = readers[ext](spec)
        except UnicodeDecodeError as e:
            raise DataError(f"{spec}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise DataError(f"{spec}: cannot read file: {e.strerror}") from None
    elif ext in LOCAL_EXTENSIONS or os.sep in spec and os.path.exists(os.path.dirname(spec) or "."):
        raise DataError(f"{spec}: data file not found")
    elif os.path.isdir(spec):
        raise DataError(f"{spec}: is a directory; expected a .jsonl/.json/.csv/.tsv file")
    else:
        records = _read_hub(spec, split)
    if not records:
        raise DataError(f"{spec}: no examples (the file is empty)")
    return records


def _read_jsonl(path: str) -> list[Record]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {i}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(obj, f"{path} line {i}"))
    return out


def _read_json(path: str) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):  # {"data": [...]} or {"train": [...]}: the single list inside
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or an object holding exactly one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    out = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(item).__name__}")
        out.append(Record(item, f"{path} item {i}"))
    return out


def _read_delimited(path: str) -> list[Record]:
    tsv = path.lower().endswith(".tsv")
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        # TSV (GLUE style) has no quoting: a '"' inside a sentence is just a character.
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return []
            header = [h.strip() for h in header]
            if len(set(header)) != len(header) or any(not h for h in header):
                raise DataError(f"{path} line 1: header needs distinct, non-empty column names, got {header}")
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path} line {line}: expected {len(header)} fields ({', '.join(header)}), "
                                    f"got {len(row)}")
                out.append(Record(dict(zip(header, row)), f"{path} line {line}"))
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: malformed {'TSV' if tsv else 'CSV'}: {e}") from None
    return out


def _read_hub(name: str, split: str) -> list[Record]:
    """A Hugging Face hub dataset via `datasets` (needs network; not reachable offline)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{name}' is not a local file, and reading hub datasets needs the `datasets` "
                        f"package (pip install 'memtune[hub]')") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (network, missing split, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"'{name}': not a local file, and loading it as a hub dataset failed: {first}") from None
    return [Record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(ds)]
