"""MMBench: option prompts, the July-2024 lmms-eval answer extraction, and CircularEval.

Extraction (`can_infer`, as in lmms-eval's `MMBench_Evaluator` of July 2024, which differs from
today's VLMEvalKit):
1. `can_infer_option`: split the answer on whitespace. Letters considered: A-E.
   - If exactly one bare letter is a token: when "A" is a token and there are more than 3
     tokens, "A" may be an article, so this step gives up; otherwise that letter.
   - Else, for each (prefix, suffix) in the fixed list below, in order: if exactly one letter
     appears as a token prefix+letter+suffix, return it.
   - An answer containing "Failed to obtain answer via API" is never parsed.
2. `can_infer_text`: lower-cased option texts (A-D, non-missing) that occur as substrings of
   the lower-cased answer; a unique hit gives its letter.
3. Otherwise unparseable. lmms-eval then asks a GPT judge; offline (here) it counts as wrong.

CircularEval: the dev split holds each question once with index i < 1e6 and its rotated copies
at i + k*1e6 (each copy with its own options and answer). A question scores 1 only if the
answer extracted for every copy present in the data equals that copy's answer.
"""
from __future__ import annotations

import math

CIRCULAR_STRIDE = 1_000_000
_LETTERS = "ABCDE"
_AFFIXES = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
            (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))
_API_FAILURE = "Failed to obtain answer via API"


def isna(x) -> bool:
    """pandas.isna for scalars: None or a float NaN."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def options_prompt(row, sys_prompt: str = "There are several options:") -> str:
    """'There are several options:\\nA. ..\\nB. ..' from the row's A-E columns.

    lmms-eval keeps a column when its value is truthy, not NaN and not the string "nan"."""
    text = sys_prompt + "\n"
    for k in _LETTERS:
        v = row.get(k)
        if k in row and v and not isna(v) and v != "nan":
            text += f"{k}. {v}\n"
    return text.rstrip("\n")


def choices(row) -> dict:
    """The A-D options that are not missing (lmms-eval's `build_choices`)."""
    return {k: row[k] for k in "ABCD" if k in row and not isna(row[k])}


def can_infer_option(answer: str):
    if _API_FAILURE in answer:
        return None
    tokens = [t.strip() for t in answer.split()]

    def hits(prefix="", suffix=""):
        return [c for c in _LETTERS if prefix + c + suffix in tokens]

    bare = hits()
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _AFFIXES:
        found = hits(prefix, suffix)
        if len(found) == 1:
            return found[0]
    return None


def can_infer_text(answer: str, options: dict):
    answer = answer.lower()
    found = [k for k, v in options.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, options: dict):
    """Letter extracted from a free-form answer, or None (unparseable)."""
    return can_infer_option(answer) or can_infer_text(answer, options)


def circular_groups(rows):
    """{main index: [rows of that question, its copies included]} for questions whose main row
    (index < 1e6) is in the data, in index order."""
    by_main: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: int(r["index"])):
        by_main.setdefault(int(r["index"]) % CIRCULAR_STRIDE, []).append(r)
    return {i: g for i, g in by_main.items() if any(int(r["index"]) < CIRCULAR_STRIDE for r in g)}
