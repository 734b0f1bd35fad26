"""Scorers, written from the rules of the original ones (lmms-eval as of July 2024 unless named).

Every scorer takes the task's data rows and one prediction per row (`None` = missing, always
wrong) and returns metrics as fractions in [0, 1]. `SCORERS[task]` maps scorer names to
functions; the first entry is the default (lmms-eval's rule; docs/evaluation.md).

| task | scorer | rule |
|---|---|---|
| pope | lmms_eval | pred.lower().strip() must equal "yes"/"no" exactly; acc, P, R, F1 pooled; yes_ratio = share of *ground-truth* "yes" (what lmms-eval reports), pred_yes_ratio = share of predicted "yes" |
| pope | llava | LLaVA eval_pope.py: text before the first ".", "," removed, split on " "; "No"/"no"/"not" among the words -> no, else yes; per category acc/P/R/F1/yes_ratio (predicted); top level = mean over categories |
| scienceqa_img | lmms_eval | pred.lower() == letter, or pred matches ^[A-Z]\\. with that letter (today's lmms-eval) |
| scienceqa_img | lmms_eval_2024_07 | the July-2024 code lower-cased pred first, so only pred.lower() == letter counted |
| scienceqa_img | llava | LLaVA eval_science_qa.py: pred in A-E; else "X. " prefix; else one "The answer is X." |
| mmbench_en/cn | lmms_eval | CircularEval with July-2024 `can_infer`, no GPT judge (mmbench.py) |
| seedbench | lmms_eval | first character of the stripped prediction == answer (case-insensitive) |
| gqa | lmms_eval | exact match after lower-casing and deleting string.punctuation |
| textvqa, ok_vqa | lmms_eval | VQA soft accuracy with the EvalAI/m4c normaliser (vqa_norm.py) |
| ai2d | lmms_eval | ^\\s*([A-Z])\\. -> letter, then exact match ignoring case and punctuation |
| mmmu | lmms_eval | official MMMU parsers (mmmu.py) |
| docvqa, infovqa | lmms_eval | ANLS (threshold 0.5, max over answers) |
| docvqa, infovqa | lmms_eval_2024_07 | the July-2024 framework scored list targets one answer at a time and kept any(score) -> 1.0: a binarised ANLS |
"""
from __future__ import annotations

import random
import re
import string
from collections import defaultdict
from typing import Callable, Sequence

from infllava_jax.evaluation import mmbench, mmmu
from infllava_jax.evaluation.vqa_norm import vqa_accuracy

Pred = str | None
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs)) / len(xs) if xs else 0.0


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def letter(i) -> str:
    return chr(ord("A") + int(i))


def exact_match(pred: str, gold: str, *, ignore_case=True, ignore_punctuation=True) -> bool:
    """HF `evaluate` exact_match for one pair (lower, then delete string.punctuation; numpy's
    string arrays drop trailing NULs)."""
    p, g = pred.rstrip("\0"), gold.rstrip("\0")
    if ignore_case:
        p, g = p.lower(), g.lower()
    if ignore_punctuation:
        p, g = p.translate(_NO_PUNCT), g.translate(_NO_PUNCT)
    return p == g


# ----------------------------------------------------------------------------- POPE

def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return p, r, _ratio(2 * p * r, p + r)


def pope_lmms_eval(rows, preds: Sequence[Pred]) -> dict:
    pairs = [((p or "").lower().strip() if p is not None else None, str(r["answer"]).lower().strip())
             for r, p in zip(rows, preds)]
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision, recall, f1 = _prf(tp, fp, fn)
    gt_yes, gt_no = sum(g == "yes" for _, g in pairs), sum(g == "no" for _, g in pairs)
    return dict(accuracy=_mean(p == g for p, g in pairs), precision=precision, recall=recall, f1=f1,
                yes_ratio=_ratio(gt_yes, gt_yes + gt_no),
                pred_yes_ratio=_mean(p == "yes" for p, _ in pairs),
                unparsed=_mean(p not in ("yes", "no") for p, _ in pairs))


def pope_llava_label(text: str) -> str:
    """LLaVA eval_pope.py: 'no' if No/no/not is a word of the first sentence, else 'yes'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_llava(rows, preds: Sequence[Pred]) -> dict:
    cats: dict[str, list] = defaultdict(list)
    for r, p in zip(rows, preds):
        cats[str(r.get("category", "all"))].append(
            (None if p is None else pope_llava_label(p), str(r["answer"]).lower().strip()))
    per = {}
    for c, pairs in sorted(cats.items()):
        # LLaVA: label "no" -> negative, anything else -> positive
        tp = sum(p == "yes" and g != "no" for p, g in pairs)
        fp = sum(p == "yes" and g == "no" for p, g in pairs)
        tn = sum(p == "no" and g == "no" for p, g in pairs)
        fn = sum(p == "no" and g != "no" for p, g in pairs)
        precision, recall, f1 = _prf(tp, fp, fn)
        per[c] = dict(accuracy=_ratio(tp + tn, len(pairs)), precision=precision, recall=recall, f1=f1,
                      yes_ratio=_mean(p == "yes" for p, _ in pairs))
    out = {k: _mean(m[k] for m in per.values()) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    out["per_category"] = per
    return out


# ----------------------------------------------------------------------------- ScienceQA

def _sqa_target(row) -> str:
    return letter(row["answer"])


def scienceqa_lmms_eval(rows, preds) -> dict:
    def ok(row, pred):
        if pred is None:
            return False
        target, pred = _sqa_target(row).lower(), pred.strip()
        if pred.lower() == target:
            return True
        return len(pred) >= 2 and pred[0].isupper() and pred[1] == "." and pred[0].lower() == target
    return dict(accuracy=_mean(ok(r, p) for r, p in zip(rows, preds)))


def scienceqa_lmms_eval_2024_07(rows, preds) -> dict:
    return dict(accuracy=_mean(p is not None and p.strip().lower() == _sqa_target(r).lower()
                               for r, p in zip(rows, preds)))


_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_llava_parse(text: str, num_choices: int, options=("A", "B", "C", "D", "E")) -> int:
    """LLaVA eval_science_qa.py: the predicted choice index, or -1."""
    options = list(options)
    if text in options:
        ans = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        ans = text[0]
    else:
        found = _SQA_ANSWER_IS.findall(text)
        ans = found[0] if len(found) == 1 else "FAILED"
    allowed = options[:num_choices]
    return allowed.index(ans) if ans in allowed else -1


def scienceqa_llava(rows, preds) -> dict:
    return dict(accuracy=_mean(
        p is not None and scienceqa_llava_parse(p, len(r["choices"])) == int(r["answer"])
        for r, p in zip(rows, preds)))


# ----------------------------------------------------------------------------- MMBench

def mmbench_circular(rows, preds) -> dict:
    pred_of = {int(r["index"]): p for r, p in zip(rows, preds)}
    hits = []
    single = []
    for main, group in mmbench.circular_groups(rows).items():
        ok = []
        for r in group:
            p = pred_of[int(r["index"])]
            got = None if p is None else mmbench.can_infer(p.strip(), mmbench.choices(r))
            ok.append(got is not None and got == r["answer"])
            if int(r["index"]) == main:
                single.append(ok[-1])
        hits.append(all(ok))
    return dict(accuracy=_mean(hits), accuracy_single_pass=_mean(single), questions=len(hits))


# ----------------------------------------------------------------------------- SEED, GQA, AI2D

def seed_lmms_eval(rows, preds) -> dict:
    def ok(r, p):
        if p is None:
            return False
        p = p.strip()
        return p[:1].lower().strip() == str(r["answer"]).lower().strip()
    return dict(accuracy=_mean(ok(r, p) for r, p in zip(rows, preds)))


def gqa_lmms_eval(rows, preds) -> dict:
    return dict(accuracy=_mean(p is not None and exact_match(p.strip(), str(r["answer"]))
                               for r, p in zip(rows, preds)))


_AI2D_LETTER = re.compile(r"^\s*([A-Z])\.")


def ai2d_filter(text: str) -> str:
    m = _AI2D_LETTER.match(text)
    return m.group(1) if m else text


def ai2d_lmms_eval(rows, preds) -> dict:
    return dict(accuracy=_mean(
        p is not None and exact_match(ai2d_filter(p).strip(), letter(int(r["answer"])))
        for r, p in zip(rows, preds)))


# ----------------------------------------------------------------------------- VQA accuracy

def vqa_lmms_eval(rows, preds) -> dict:
    return dict(accuracy=_mean(0.0 if p is None else vqa_accuracy(p.strip(), r.get("answers"))
                               for r, p in zip(rows, preds)))


# ----------------------------------------------------------------------------- ANLS

def levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        cur = [j]
        for i, ca in enumerate(a, 1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[-1]))
        prev = cur
    return prev[-1]


def anls_one(pred: str, gold: str) -> float:
    """1 - normalised distance. Distance on lower-cased, whitespace-collapsed strings; the length
    is max(len(gold.upper()), len(pred.upper())) of the *raw* strings, as lmms-eval computes it."""
    g = " ".join(gold.strip().lower().split())
    p = " ".join(pred.strip().lower().split())
    length = max(len(gold.upper()), len(pred.upper()))
    return 1.0 - (0.0 if length == 0 else levenshtein(g, p) / length)


def anls_question(pred: str, answers, threshold: float = 0.5) -> float:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        return 0.0
    best = max(anls_one(pred, str(a)) for a in answers)
    return 0.0 if best < threshold else best


def anls_lmms_eval(rows, preds) -> dict:
    return dict(anls=_mean(0.0 if p is None else anls_question(p.strip(), r["answers"])
                           for r, p in zip(rows, preds)))


def anls_lmms_eval_2024_07(rows, preds) -> dict:
    def one(r, p):
        if p is None:
            return 0.0
        answers = r["answers"]
        answers = [answers] if isinstance(answers, str) else list(answers)
        return 1.0 if any(anls_question(p.strip(), [a]) for a in answers) else 0.0
    return dict(anls=_mean(one(r, p) for r, p in zip(rows, preds)))


# ----------------------------------------------------------------------------- MMMU

def mmmu_parse(row, pred: str, rng: random.Random):
    if row.get("question_type") == "multiple-choice":
        opts = mmmu.options_list(row)
        letters = [letter(i) for i in range(len(opts))]
        return mmmu.parse_multi_choice(pred, letters, dict(zip(letters, opts)), rng)
    return mmmu.parse_open(pred)


def mmmu_lmms_eval(rows, preds, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ok = []
    for r, p in zip(rows, preds):
        if p is None:
            ok.append(False)
            continue
        parsed = mmmu_parse(r, p.strip(), rng)
        answer = r["answer"]
        if r.get("question_type") == "multiple-choice":
            ok.append(parsed in answer if isinstance(answer, list) else parsed == answer)
        else:
            ok.append(mmmu.eval_open(answer, parsed))
    return dict(accuracy=_mean(ok))


def hires_synth_exact(rows, preds) -> dict:
    """The synthetic hi-res set: GQA's exact match, overall and per question type."""
    rows, preds = list(rows), list(preds)
    out = gqa_lmms_eval(rows, preds)
    for t in sorted({r["type"] for r in rows}):
        pairs = [(r, p) for r, p in zip(rows, preds) if r["type"] == t]
        out[f"accuracy_{t}"] = gqa_lmms_eval([r for r, _ in pairs], [p for _, p in pairs])["accuracy"]
    return out


# ----------------------------------------------------------------------------- registry

SCORERS: dict[str, dict[str, Callable]] = {
    "pope": {"lmms_eval": pope_lmms_eval, "llava": pope_llava},
    "scienceqa_img": {"lmms_eval": scienceqa_lmms_eval, "lmms_eval_2024_07": scienceqa_lmms_eval_2024_07,
                      "llava": scienceqa_llava},
    "mmbench_en": {"lmms_eval": mmbench_circular},
    "mmbench_cn": {"lmms_eval": mmbench_circular},
    "seedbench": {"lmms_eval": seed_lmms_eval},
    "gqa": {"lmms_eval": gqa_lmms_eval},
    "textvqa": {"lmms_eval": vqa_lmms_eval},
    "ok_vqa": {"lmms_eval": vqa_lmms_eval},
    "ai2d": {"lmms_eval": ai2d_lmms_eval},
    "mmmu": {"lmms_eval": mmmu_lmms_eval},
    "hires_synth": {"lmms_eval": hires_synth_exact},
    "docvqa": {"lmms_eval": anls_lmms_eval, "lmms_eval_2024_07": anls_lmms_eval_2024_07},
    "infovqa": {"lmms_eval": anls_lmms_eval, "lmms_eval_2024_07": anls_lmms_eval_2024_07},
}


def get_scorer(task: str, name: str | None = None) -> tuple[str, Callable]:
    if task not in SCORERS:
        raise KeyError(f"no scorer for task {task!r} (judge tasks are scored by a GPT judge); "
                       f"tasks with scorers: {sorted(SCORERS)}")
    table = SCORERS[task]
    name = name or next(iter(table))
    if name not in table:
        raise KeyError(f"task {task!r} has no scorer {name!r}; choose one of {sorted(table)}")
    return name, table[name]


def score(task: str, rows: Sequence[dict], predictions: dict[str, str], scorer: str | None = None) -> dict:
    """Metrics of `predictions` ({question id as string: text}) over `rows` (each with `_qid`).

    Texts are stripped first (lmms-eval strips generate_until outputs before scoring). Rows
    without a prediction count as wrong and are reported as `missing`; predictions whose id is
    not in the data are reported as `unknown_ids`."""
    name, fn = get_scorer(task, scorer)
    preds = [predictions.get(r["_qid"]) for r in rows]
    preds = [None if p is None else p.strip() for p in preds]
    out = fn(rows, preds)
    known = {r["_qid"] for r in rows}
    out.update(n=len(rows), missing=sum(p is None for p in preds),
               unknown_ids=sum(k not in known for k in predictions), scorer=name)
    return out


def main_metric(metrics: dict) -> float:
    return float(metrics["anls"] if "anls" in metrics else metrics["accuracy"])
