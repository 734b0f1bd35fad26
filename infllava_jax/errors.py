"""The one base class of errors in what a user gave us (files, records, ids), not bugs.

Entry points (train.py, eval.py, python -m infllava_jax.chat) print such an error as one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input, with a one-line message that names the file (and key, record, line or position)."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (third-party errors can span pages)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
