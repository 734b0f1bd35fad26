"""MMMU: prompts and the official response parsers (MMMU-Benchmark eval_utils, as lmms-eval uses them).

Multiple choice (`parse_multi_choice`):
  strip the characters , . ! ? ; : ' from both ends (one character class after another), pad
  with a space on each side; candidates are the letters found as "(X)"; if none, as "X "; if
  none, as "X."; if none and the response has more than 5 words, the options whose text occurs
  in it (case-insensitive). Several candidates: the one occurring last wins ("(X)" or " X " or
  the option text, by rfind; ties and misses (-1) go to the first candidate). No candidate: a
  random letter (a seeded `random.Random`, consumed in data order).
Open questions (`parse_open`):
  lower-case, strip, strip "."; split into lines (the original also splits on ". " before a
  capital, which can never match after lower-casing); in each line keep the shortest tail after
  one of "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result " (and
  "=" in the last line); no such tail anywhere -> the whole response. Add every number found in
  those tails; normalise each: a number (commas dropped, Python float) rounded to 2 decimals, else
  lower-cased text, and a one-character text becomes [" x", "x "].
  Correct when a normalised numeric prediction equals a normalised answer, or a normalised
  answer string is a substring of a string prediction.
"""
from __future__ import annotations

import ast
import random
import re

MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
_IMAGE_REF = re.compile(r"<image \d+>")


def options_list(row) -> list:
    """`options` is a Python-literal string in the HF dataset; jsonl may give a list."""
    opts = row.get("options")
    if opts is None or opts == "":
        return []
    return list(ast.literal_eval(opts)) if isinstance(opts, str) else list(opts)


def prompt(row) -> str:
    q = row["question"]
    if row.get("question_type") == "multiple-choice":
        opts = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options_list(row)))
        return f"{q}\n{opts}\n\n{MC_PROMPT}"
    return f"{q}\n\n{OPEN_PROMPT}"


def image_fields(row) -> list[str]:
    """Image columns referenced as `<image k>` in the prompt, de-duplicated, sorted by name."""
    refs = {m.strip("<>").replace(" ", "_") for m in _IMAGE_REF.findall(prompt(row))}
    return sorted(refs)


# ----------------------------------------------------------------------------- multiple choice

def parse_multi_choice(response: str, letters: list[str], index2ans: dict, rng: random.Random) -> str:
    for ch in ",.!?;:'":
        response = response.strip(ch)
    response = f" {response} "
    by_content, bracketed = False, False
    cands = [c for c in letters if f"({c})" in response]
    if cands:
        bracketed = True
    else:
        cands = [c for c in letters if f"{c} " in response]
        if not cands:
            cands = [c for c in letters if f"{c}." in response]
    if not cands and len(response.split()) > 5:
        cands = [c for c, a in index2ans.items() if str(a).lower() in response.lower()]
        by_content = bool(cands)
    if not cands:
        return rng.choice(letters)
    if len(cands) == 1:
        return cands[0]
    if by_content:
        pos = [response.lower().rfind(str(index2ans[c]).lower()) for c in cands]
    elif bracketed:
        pos = [response.rfind(f"({c})") for c in cands]
    else:
        pos = [response.rfind(f" {c} ") for c in cands]
    return cands[max(range(len(cands)), key=lambda i: (pos[i], -i))]


# ----------------------------------------------------------------------------- open questions

_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEYS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def extract_numbers(text: str) -> list[str]:
    return _NUM_COMMAS.findall(text) + _NUM_SCI.findall(text) + _NUM_SIMPLE.findall(text)


def _as_number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def normalize(text: str) -> list:
    text = text.strip()
    x = _as_number(text)
    if x is not None:
        return [round(x, 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_tails(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    tails = []
    for i, line in enumerate(lines):
        keys = _KEYS + (("=",) if i == len(lines) - 1 else ())
        best = None
        for k in keys:
            if k in line:
                tail = line.split(k)[-1].strip()
                if not best or len(tail) < len(best):
                    best = tail
        if best and best.strip() not in _TRIVIAL:
            tails.append(best)
    return tails or [response]


def parse_open(response: str) -> list:
    tails = _key_tails(response)
    preds = tails + [n for t in tails for n in extract_numbers(t)]
    out = []
    for p in preds:
        for v in normalize(p):
            if v not in out:
                out.append(v)
    return out


def eval_open(answer, preds: list) -> bool:
    golds = []
    for a in (answer if isinstance(answer, list) else [answer]):
        golds.extend(normalize(str(a)))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False
