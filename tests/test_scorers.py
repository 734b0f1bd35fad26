"""Scorers against the rules of the original ones (lmms-eval July 2024, LLaVA, m4c/EvalAI, MMMU).

Expected values are worked out by hand from those rules; each case names the rule it pins.
"""
import random

import pytest

from infllava_jax.evaluation import mmbench, mmmu, scorers
from infllava_jax.evaluation.vqa_norm import normalize_answer, vqa_accuracy


def _rows(task_rows):
    for i, r in enumerate(task_rows):
        r.setdefault("_qid", str(i))
    return task_rows


# ----------------------------------------------------------------------------- VQA normaliser

@pytest.mark.parametrize("raw, want", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"), ("eleven", "eleven"),
    ("the dog", "dog"), ("A cat", "cat"), ("an apple", "apple"), ("theater", "theater"),
    ("U.S.A.", "usa"), ("1,000", "1000"), ("3.5", "3.5"), ("3.", "3"), ("yes.", "yes"),
    ("Yes!", "yes"), ("dont", "don't"), ("Dont know", "don't know"), ("its", "its"),
    ("man's hat", "man 's hat"), ("red-white", "red white"), ("red - white", "red white"),
    ("t-shirt", "t shirt"), ("(left)", "left"), ("  Hello\tworld\n", "hello world"),
    ("What?", "what"), ("1,5 and 2-3", "15 and 2 3"), ("x=y", "x y"), ("x = y", "x y"),
    ("somebody'd", "somebodyd"), ("twas", "'twas"), ("Im", "im"), ("x/y", "x y"), ("a/b", "b"),
])
def test_vqa_normaliser(raw, want):
    assert normalize_answer(raw) == want


def test_vqa_normaliser_period_count_quirk():
    # the original passes re.UNICODE (=32) as `count`: only the first 32 periods are removed
    assert normalize_answer("." * 40) == "." * 8
    assert normalize_answer("a.b") == "ab"


def test_vqa_accuracy_leave_one_out():
    ten = ["two"] * 3 + ["2"] + ["three"] * 6
    # "2" and "two" normalise alike: 4 matches; leaving one of them out leaves 3 -> 1.0 each
    assert vqa_accuracy("2", ten) == pytest.approx(1.0)
    # 1 match: subsets without it have 1 match (1/3), the one without it... 9 subsets of 1/3, one of 0
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(9 / 10 / 3)
    # 3 matches: 7 subsets keep all 3 (1.0), 3 subsets keep 2 (2/3)
    three = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("Cat.", three) == pytest.approx((7 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("the cat", three) == pytest.approx((7 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("cats", three) == 0.0
    assert vqa_accuracy("x", []) == 0.0


def test_vqa_scorer_rows_and_missing():
    rows = _rows([{"answers": ["yes"] * 10}, {"answers": ["1000"] * 10}])
    m = scorers.score("textvqa", rows, {"0": "Yes", "1": "1,000"})
    assert m["accuracy"] == 1.0 and m["missing"] == 0
    m = scorers.score("ok_vqa", rows, {"0": "Yes"})
    assert m["accuracy"] == 0.5 and m["missing"] == 1


# ----------------------------------------------------------------------------- POPE

def test_pope_lmms_eval():
    gts = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["Yes", "yes.", "no", "no", "Yes", " NO "]
    rows = _rows([{"answer": g} for g in gts])
    m = scorers.score("pope", rows, {str(i): p for i, p in enumerate(preds)})
    # "yes." is not exactly "yes": wrong and neither TP nor FN
    tp, fp, fn = 1, 1, 1
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(0.5)           # lmms-eval: ground-truth share
    assert m["pred_yes_ratio"] == pytest.approx(2 / 6)
    assert m["unparsed"] == pytest.approx(1 / 6)


def test_pope_llava_parser_and_categories():
    lab = scorers.pope_llava_label
    assert lab("No, there is no dog.") == "no"
    assert lab("Yes, there is a dog. No doubt.") == "yes"       # only the first sentence
    assert lab("There is not a dog") == "no"
    assert lab("NO") == "yes"                                   # case-sensitive words
    assert lab("no.") == "no" and lab("Nope") == "yes" and lab("") == "yes"
    assert lab("no,") == "no"                                   # commas removed first
    rows = _rows([{"answer": "yes", "category": "random"}, {"answer": "no", "category": "random"},
                  {"answer": "yes", "category": "adversarial"}, {"answer": "no", "category": "adversarial"}])
    preds = {"0": "Yes", "1": "No.", "2": "There is no cat", "3": "No"}
    m = scorers.score("pope", rows, preds, scorer="llava")
    assert m["per_category"]["random"]["f1"] == 1.0
    assert m["per_category"]["adversarial"]["accuracy"] == 0.5
    assert m["per_category"]["adversarial"]["f1"] == 0.0
    assert m["f1"] == pytest.approx(0.5)                      # mean over categories
    assert m["yes_ratio"] == pytest.approx((0.5 + 0.0) / 2)   # predicted yes share


# ----------------------------------------------------------------------------- ScienceQA

SQA = [{"answer": 1, "choices": ["x", "y", "z"]}]


@pytest.mark.parametrize("pred, today, jul2024, llava", [
    ("B", 1, 1, 1), ("b", 1, 1, 0), ("B.", 1, 0, 0), ("B. y", 1, 0, 1), ("(B)", 0, 0, 0),
    ("B)", 0, 0, 0), ("A. B", 0, 0, 0), ("The answer is B.", 0, 0, 1), ("B y", 0, 0, 0),
    ("b.", 0, 0, 0), ("D", 0, 0, 0), ("The answer is D.", 0, 0, 0), ("", 0, 0, 0),
])
def test_scienceqa_variants(pred, today, jul2024, llava):
    rows = _rows([dict(r) for r in SQA])
    assert scorers.score("scienceqa_img", rows, {"0": pred})["accuracy"] == today
    assert scorers.score("scienceqa_img", rows, {"0": pred}, "lmms_eval_2024_07")["accuracy"] == jul2024
    assert scorers.score("scienceqa_img", rows, {"0": pred}, "llava")["accuracy"] == llava


def test_scienceqa_llava_options_beyond_choices():
    # an option letter past the number of choices is not a valid index
    assert scorers.scienceqa_llava_parse("D", 3) == -1
    assert scorers.scienceqa_llava_parse("C", 3) == 2
    # "The answer is B" without a trailing character does not match the regex
    assert scorers.scienceqa_llava_parse("The answer is B", 3) == -1
    assert scorers.scienceqa_llava_parse("The answer is A. The answer is B.", 3) == -1


# ----------------------------------------------------------------------------- MMBench

@pytest.mark.parametrize("answer, want", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B)", "B"), ("b", None), ("The answer is B", "B"),
    ("A man is fishing", None),             # "A" + more than 3 tokens: maybe an article
    ("A dog", "A"), ("A", "A"), ("Option: B.", "B"), ("A or B", None), ("A. B.", None),
    ("A) cat, B) dog", None), ("E", "E"), (":C", "C"), ("Failed to obtain answer via API B", None),
])
def test_mmbench_can_infer_option(answer, want):
    assert mmbench.can_infer_option(answer) == want


def test_mmbench_can_infer_text_fallback():
    opts = {"A": "a cat", "B": "a dog", "C": "fish", "D": "bird"}
    assert mmbench.can_infer("I see a cat here", opts) == "A"
    assert mmbench.can_infer("A man is fishing", opts) == "C"          # text fallback
    assert mmbench.can_infer("a cat and a dog", opts) is None           # two texts
    assert mmbench.can_infer("nothing", opts) is None


def _mm_rows():
    # question 0 with 3 rotations, question 1 with 2; answers rotate with the options
    base = [("cat", "dog", "fish"), ("dog", "fish", "cat"), ("fish", "cat", "dog")]
    rows = []
    for k, opts in enumerate(base):
        rows.append({"index": k * 1_000_000, "A": opts[0], "B": opts[1], "C": opts[2], "D": None,
                     "answer": "ABC"[opts.index("cat")], "_qid": str(k * 1_000_000)})
    for k in range(2):
        rows.append({"index": 1 + k * 1_000_000, "A": "x", "B": "y", "C": None, "D": None,
                     "answer": "AB"[k], "_qid": str(1 + k * 1_000_000)})
    return rows


def test_mmbench_circular_eval():
    rows = _mm_rows()
    good = {"0": "A", "1000000": "C.", "2000000": "(B)", "1": "A", "1000001": "B"}
    m = scorers.score("mmbench_en", rows, good)
    assert m["accuracy"] == 1.0 and m["questions"] == 2 and m["accuracy_single_pass"] == 1.0
    one_wrong_rotation = dict(good, **{"2000000": "A"})
    m = scorers.score("mmbench_en", rows, one_wrong_rotation)
    assert m["accuracy"] == 0.5 and m["accuracy_single_pass"] == 1.0
    unparseable = dict(good, **{"1000001": "I am not sure"})
    assert scorers.score("mmbench_en", rows, unparseable)["accuracy"] == 0.5
    by_text = dict(good, **{"1000000": "It is a cat"})               # option text, unique
    assert scorers.score("mmbench_en", rows, by_text)["accuracy"] == 1.0
    missing = {k: v for k, v in good.items() if k != "1000000"}
    m = scorers.score("mmbench_en", rows, missing)
    assert m["accuracy"] == 0.5 and m["missing"] == 1


def test_mmbench_prompt_and_options():
    from infllava_jax.evaluation.tasks import get_task
    r = {"question": "What?", "hint": None, "A": "x", "B": "y", "C": float("nan"), "D": "nan"}
    en = get_task("mmbench_en").text(r)
    assert en == ("What? There are several options:\nA. x\nB. y\n\n"
                  "Answer with the option's letter from the given choices directly.")
    r2 = dict(r, hint="nan")
    assert get_task("mmbench_en").text(r2) == en
    assert get_task("mmbench_cn").text(r2).startswith("nan What? There are several options:")
    assert get_task("mmbench_cn").text(r).endswith("\n\n请直接使用所提供的选项字母作为答案回答。")
    assert get_task("mmbench_en").text(dict(r, hint="H")).startswith("H What? ")


# ----------------------------------------------------------------------------- SEED, GQA, AI2D

@pytest.mark.parametrize("pred, ok", [("B", 1), ("b", 1), ("B. dog", 1), ("(B)", 0), ("Because", 1),
                                      ("", 0), ("C", 0), (" B ", 1)])
def test_seed_first_character(pred, ok):
    rows = _rows([{"answer": "B", "question_id": "q"}])
    assert scorers.score("seedbench", rows, {"0": pred})["accuracy"] == ok


@pytest.mark.parametrize("pred, gold, ok", [
    ("Yes", "yes", 1), ("yes.", "yes", 1), ("U.S.A.", "usa", 1), ("fire hydrant", "fire hydrant", 1),
    ("the table", "table", 0), ("tables", "table", 0), ("left!", "left", 1), ("Two", "2", 0),
    ("fire  hydrant", "fire hydrant", 0), ("t-shirt", "tshirt", 1),
])
def test_gqa_exact_match(pred, gold, ok):
    rows = _rows([{"answer": gold}])
    assert scorers.score("gqa", rows, {"0": pred})["accuracy"] == ok


@pytest.mark.parametrize("pred, ok", [("B", 1), ("b", 1), ("B.", 1), ("B. cat", 1), ("(B)", 1), ("B)", 1),
                                      ("B cat", 0), ("The answer is B", 0), ("C. B", 0), ("  B. x", 1)])
def test_ai2d(pred, ok):
    rows = _rows([{"answer": "1", "options": ["a", "b", "c"]}])
    assert scorers.score("ai2d", rows, {"0": pred})["accuracy"] == ok


# ----------------------------------------------------------------------------- ANLS

def test_anls_rules():
    a = scorers.anls_one
    assert a("Hello  World", "hello world") == 1.0          # case and whitespace runs ignored
    # length uses the raw strings: gold "ab  c" (5 chars) vs pred "abd" -> dist("ab c","abd")=2
    assert a("abd", "ab  c") == pytest.approx(1 - 2 / 5)
    assert a("", "") == 1.0
    q = scorers.anls_question
    assert q("abcdef", ["abcxyz"]) == pytest.approx(0.5)     # exactly at threshold: kept
    assert q("abcdefg", ["abcxyzw"]) == 0.0                  # 1 - 4/7 < 0.5
    assert q("abcdefgh", ["abcdxyzw"]) == pytest.approx(0.5)
    assert q("abcdefghi", ["abcdxyzwv"]) == 0.0              # 1 - 5/9 = 0.444
    assert q("1996", ["1995", "1996"]) == 1.0                # best answer
    assert q("199", ["1995"]) == pytest.approx(0.75)


def test_anls_scorers_and_july_binarisation():
    rows = _rows([{"answers": ["1995", "nineteen"]}, {"answers": ["abcdefgh"]}, {"answers": ["x"]}])
    preds = {"0": "199", "1": "abcdxyzw", "2": "y"}
    m = scorers.score("docvqa", rows, preds)
    assert m["anls"] == pytest.approx((0.75 + 0.5 + 0) / 3)
    m = scorers.score("infovqa", rows, preds, "lmms_eval_2024_07")
    assert m["anls"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- MMMU

def test_mmmu_multi_choice_parser():
    letters = ["A", "B", "C", "D"]
    ans = {"A": "red apple", "B": "blue sky", "C": "green grass", "D": "3"}
    rng = random.Random(0)
    p = lambda s: mmmu.parse_multi_choice(s, letters, ans, rng)
    assert p("(B)") == "B"
    assert p("B") == "B" and p("B.") == "B" and p("b") != "b"
    assert p("The answer is (C), not (A)") == "A"         # last bracketed occurrence wins
    assert p("A or B") == "B"                               # " B " occurs last
    assert p("I think the color of the sky is blue sky indeed") == "B"  # > 5 words, option text
    assert p("blue sky") in letters                          # <= 5 words: random fallback
    assert p("Answer: C.") == "C"


def test_mmmu_random_fallback_is_seeded():
    letters, ans = ["A", "B", "C", "D"], {k: k * 3 for k in "ABCD"}
    a = [mmmu.parse_multi_choice("???", letters, ans, random.Random(0)) for _ in range(3)]
    assert len(set(a)) == 1


def test_mmmu_open_parser():
    assert mmmu.parse_open("The answer is 42.") == [42.0]
    assert 1000.0 in mmmu.parse_open("so the total is 1,000 dollars")
    assert mmmu.eval_open("1,000", mmmu.parse_open("so the total is 1,000 dollars"))
    assert mmmu.eval_open("3.14159", mmmu.parse_open("x = 3.14"))       # 2-decimal rounding
    assert mmmu.eval_open("Paris", mmmu.parse_open("It is Paris, France"))  # substring
    assert not mmmu.eval_open("a", mmmu.parse_open("banana"))             # 1 char: " a"/"a "
    assert mmmu.eval_open("a", mmmu.parse_open("the answer is a"))
    assert mmmu.normalize("B") == [" b", "b "]
    assert mmmu.normalize("1,234.567") == [1234.57]


def test_mmmu_scorer():
    rows = _rows([
        {"id": "validation_Art_1", "question_type": "multiple-choice", "options": "['x', 'y']", "answer": "B",
         "question": "q"},
        {"id": "validation_Math_2", "question_type": "open", "options": "[]", "answer": "12", "question": "q"},
    ])
    assert scorers.score("mmmu", rows, {"0": "(B)", "1": "The result is 12"})["accuracy"] == 1.0
    assert scorers.score("mmmu", rows, {"0": "(A)", "1": "13"})["accuracy"] == 0.0
    assert mmmu.prompt(rows[0]) == ("q\nA. x\nB. y\n\nAnswer with the option's letter from the given "
                                    "choices directly.")


def test_mmmu_image_fields():
    row = {"question": "Compare <image 2> and <image 1>, again <image 2>", "question_type": "open"}
    assert mmmu.image_fields(row) == ["image_1", "image_2"]


# ----------------------------------------------------------------------------- bookkeeping

def test_unknown_scorer_and_task():
    with pytest.raises(KeyError, match="no scorer"):
        scorers.get_scorer("pope", "gpt")
    with pytest.raises(KeyError, match="judge"):
        scorers.get_scorer("mmvet")


def test_unknown_ids_counted():
    rows = _rows([{"answer": "yes"}])
    m = scorers.score("pope", rows, {"0": "yes", "7": "no"})
    assert m["unknown_ids"] == 1 and m["accuracy"] == 1.0
