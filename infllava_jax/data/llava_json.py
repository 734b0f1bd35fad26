"""Reading a LLaVA JSON / JSONL file into its list of records (docs/model.md section 7).

The file as a whole is checked here: one that cannot be read, is not a list, or has a JSONL line
that is not JSON is a DataFileError naming the file (and line). The records themselves are
checked later, one by one (examples.py): a bad one is skipped and counted. Both the grain
pipeline (pipeline.py) and the ArrayRecord build (arrayrecord.py) read through this module.
"""
from __future__ import annotations

import json

from infllava_jax.errors import InputError


class DataFileError(InputError):
    """A data file that cannot be read at all (the message names it, and the line for JSONL)."""


def read_llava_json(path: str) -> list:
    """A LLaVA JSON list (or JSONL, one record a line); DataFileError if the file itself is bad."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return [_jsonl_record(path, n, line) for n, line in enumerate(f, 1) if line.strip()]
            data = json.load(f)
    except OSError as e:
        raise DataFileError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: a LLaVA JSON file holds a list of records, got {type(data).__name__}")
    return data


def _jsonl_record(path: str, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
