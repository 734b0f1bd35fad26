"""The EvalAI / m4c VQA answer normaliser and the VQA soft accuracy (TextVQA, OK-VQA).

Behaviour (read from the m4c `EvalAIAnswerProcessor` that LLaVA ships and lmms-eval copies;
both apply it to the prediction *and* to every ground-truth answer), step by step:

1. lower-case; delete every "," and "?"; "'s" -> " 's"; strip.
2. newlines and tabs -> spaces; strip.
3. punctuation `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`: each one is deleted when the text
   (as it was before this step) has it next to a space ("p " or " p") or has a digit-comma-digit
   run, otherwise replaced by a space. Then every "." not followed by a digit is deleted; the
   original passes `re.UNICODE` (32) as the *count* argument of `sub`, so at most 32 periods go.
   (Its look-behind `(?!<=\\d)` is a typo that never fires: "3." loses its period too.)
4. split on whitespace; number words "none".."ten" -> "0".."10" ("none" -> "0"); drop the
   articles a/an/the; map contractions written without the apostrophe ("dont" -> "don't") with
   the table below; join with single spaces.

VQA accuracy of a prediction against answers a_1..a_m (m = 10 in VQA/TextVQA/OK-VQA): the mean
over the m leave-one-out subsets of min(1, #{matches in the subset} / 3).
"""
from __future__ import annotations

import re

# m4c CONTRACTIONS as data: written form -> canonical form (quirks kept, e.g. "somebody'd").
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # re.UNICODE passed as `count` in the original


def _punctuation(text: str) -> str:
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        near_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if (near_space or strip_all) else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """EvalAI/m4c normal form of one answer string."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(s))


def vqa_accuracy(prediction: str, answers) -> float:
    """Soft VQA accuracy of one prediction (both sides normalised); 0.0 without answers."""
    answers = [normalize_answer(str(a)) for a in (answers or [])]
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    hits = sum(a == pred for a in answers)
    # leaving out answer i removes one match when a_i itself matches
    total = sum(min(1.0, (hits - (a == pred)) / 3) for a in answers)
    return total / len(answers)
