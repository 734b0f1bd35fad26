"""The synthetic high-resolution VQA dataset (infllava_jax/study/scenes.py): files, determinism,
re-runs, balance, and the design claim that the detail questions cannot be read at 84 px.

The claim is measured with simple oracles that are told where the detail is (the scene layout)
and read it from the darkness map: glyph / mark template correlation, connected components, ink
mass. Each oracle runs on the full 252 px image and on the same image downsampled to 84 px (PIL
bicubic, the single view of a LLaVA-1.5-style model) and upsampled back to 252 px.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infllava_jax.study import scenes as S


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "data"
    meta = S.generate(root, n_train=24, n_val=8, n_test=40, seed=3)
    return root, meta


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- files

def test_files_and_records(built):
    root, meta = built
    assert not meta["reused"]
    assert len(list((root / "images" / "train").glob("*.png"))) == 24
    assert len(list((root / "images" / "test").glob("*.png"))) == 40
    with Image.open(root / "images/val/000007.png") as im:
        assert im.size == (252, 252) and im.mode == "RGB"

    cap = json.loads((root / "train_caption.json").read_text())
    assert len(cap) == 24
    c = cap[5]
    assert c["image"] == "images/train/000005.png"
    assert c["conversations"][0] == {"from": "human", "value": "<image>\nDescribe the image."}
    assert "digit" in c["conversations"][1]["value"] and "dots" in c["conversations"][1]["value"]

    vqa = json.loads((root / "train_vqa.json").read_text())
    with_image = [r for r in vqa if "image" in r]
    text_only = [r for r in vqa if "image" not in r]
    assert len(with_image) == 24 and len(text_only) == meta["counts"]["train_vqa_text_only"] >= 1
    for i, r in enumerate(with_image):   # S.TURNS questions of different types, the first balanced
        qs = [t["value"].removeprefix("<image>\n").split("\n")[0] for t in r["conversations"][::2]]
        types = [next(k for k, v in S.QUESTIONS.items() if q in v) for q in qs]
        assert len(set(types)) == len(types) == S.TURNS and types[0] == S.TYPES[i % len(S.TYPES)]
    for r in vqa:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        text = "".join(t["value"] for t in conv)
        assert text.count("<image>") == ("image" in r)
        if "image" in r:
            assert conv[0]["value"].startswith("<image>\n") and (root / r["image"]).is_file()
        for k, (h, a) in enumerate(zip(conv[::2], conv[1::2])):
            assert h["value"].endswith("\n" + S.SHORT) == (k == 0)     # the instruction once, first
            if "image" in r:
                q = h["value"].removeprefix("<image>\n").removesuffix("\n" + S.SHORT)
                t = next(t for t in S.TYPES if q in S.QUESTIONS[t])
                assert a["value"] in S.ANSWERS[t]

    for split, n in (("val", 8), ("test", 40)):
        rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n and len({r["question_id"] for r in rows}) == n
        for r in rows:
            assert set(r) == {"question_id", "image", "question", "answer", "type"}
            assert r["question"] in S.QUESTIONS[r["type"]] and r["answer"] in S.ANSWERS[r["type"]]
            assert (root / r["image"]).is_file()

    m = json.loads((root / "meta.json").read_text())
    assert m["version"] == S.VERSION and m["seed"] == 3 and m["image_size"] == 252
    assert set(m["question_types"]) == set(S.TYPES)
    assert m["question_types"]["digit"]["answers"] == list(S.ANSWERS["digit"])


def test_answers_match_captions(built):
    """The caption, the train questions and the image all describe the same scene."""
    root, _ = built
    cap = json.loads((root / "train_caption.json").read_text())
    sched = S._schedule(3, "train", 24)
    for i, c in enumerate(cap):
        s = S.scene(3, "train", i, 24, schedule=sched)
        assert c["conversations"][1]["value"] == S.caption(s)
        with Image.open(root / c["image"]) as im:
            assert np.array_equal(np.asarray(im), s.image)


# ----------------------------------------------------------------------------- determinism, re-runs

def test_same_seed_same_bytes(built, tmp_path):
    root, _ = built
    again = tmp_path / "again"
    S.generate(again, n_train=24, n_val=8, n_test=40, seed=3)
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = tmp_path / "other"
    S.generate(other, n_train=24, n_val=8, n_test=40, seed=4)
    c = _files(other)
    assert c["images/train/000000.png"] != a["images/train/000000.png"]
    assert c["test.jsonl"] != a["test.jsonl"]


def test_rerun_is_a_noop_and_incomplete_dirs_are_rebuilt(tmp_path):
    root = tmp_path / "d"
    S.generate(root, n_train=8, n_val=4, n_test=4, seed=1)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    snapshot = _files(root)
    meta = S.generate(root, n_train=8, n_val=4, n_test=4, seed=1)
    assert meta["reused"] and meta["counts"]["images"] == {"train": 8, "val": 4, "test": 4}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before

    (root / "images/train/000003.png").unlink()              # incomplete: rebuilt, same bytes
    assert not S.generate(root, n_train=8, n_val=4, n_test=4, seed=1)["reused"]
    assert _files(root) == snapshot

    meta = S.generate(root, n_train=5, n_val=4, n_test=4, seed=1)   # new arguments: rebuilt
    assert not meta["reused"]
    assert sorted(p.name for p in (root / "images/train").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert S.generate(root, n_train=5, n_val=4, n_test=4, seed=1)["reused"]


def test_cli(tmp_path, capsys):
    assert S.main([str(tmp_path / "c"), "--n-train", "4", "--n-val", "4", "--n-test", "8"]) == 0
    out = capsys.readouterr().out
    assert "written" in out and "majority" in out and "digit" in out
    assert S.main([str(tmp_path / "c"), "--n-train", "4", "--n-val", "4", "--n-test", "8"]) == 0
    assert "reused" in capsys.readouterr().out


def test_image_sizes():
    for size in (216, 504):
        s = S.scene(0, "val", 0, 4, image_size=size)
        assert s.image.shape == (size, size, 3)
    for bad in (250, 198):
        with pytest.raises(ValueError):
            S.generate("/nonexistent-never-written", image_size=bad)


def test_layout():
    """The facts are where the questions say: glyph in the box, dots inside the ring, one mark per
    quadrant away from the middle, the x in the answer's corner, box left/right as answered."""
    n = 200
    sched = S._schedule(2, "val", n)
    for i in range(n):
        s = S.scene(2, "val", i, n, schedule=sched)
        (by, bx, bs, _), (cy, cx, cs, _) = s.layout["side"]
        gy, gx, gh, gw = s.layout["digit"]
        assert by + 14 < gy and gy + gh < by + bs - 14 and bx + 14 < gx and gx + gw < bx + bs - 14
        ry, rx, rh, rw = s.layout["count"]
        centre = np.array([cy + cs / 2, cx + cs / 2])
        assert np.abs(np.array([ry, rx, ry + rh, rx + rw]) - np.tile(centre, 2)).max() < 0.5 * cs - 14
        box_x, circle_x = bx + bs / 2, cx + cs / 2
        assert (box_x < circle_x) == (s.answers["side"] == "left") and abs(box_x - circle_x) >= 6 * 14
        for q, (y, x, h, w) in enumerate(s.layout["corner"]):
            assert (y + 1) // 14 not in (8, 9) and (x + 1) // 14 not in (8, 9)
            assert (y < 126) == (q < 2) and (x < 126) == (q % 2 == 0)
            is_x = S.CORNERS[q] == s.answers["corner"]
            assert np.array_equal(s.image[y:y + h, x:x + w, 0] == s.ink, S.MARKS["x" if is_x else "+"])


# ----------------------------------------------------------------------------- balance

def test_answers_are_balanced(built):
    n = 403
    sched = S._schedule(0, "test", n)
    for t in S.TYPES:
        k = len(S.ANSWERS[t])
        for r in range(len(S.TYPES)):                       # the eval rows of type t are i % 4 == r
            counts = np.bincount(sched[t][r::len(S.TYPES)], minlength=k)
            assert counts.max() - counts.min() <= 1, (t, r, counts)
    root, meta = built
    rows = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    for t in S.TYPES:
        ans = [r["answer"] for r in rows if r["type"] == t]
        counts = [ans.count(a) for a in S.ANSWERS[t]]
        assert len(ans) == 10 and max(counts) - min(counts) <= 1
        assert meta["majority_baseline"]["test"][t] == pytest.approx(max(counts) / len(ans), abs=1e-4)


# ----------------------------------------------------------------------------- information loss

def _lowres(img: np.ndarray, s: int = 84) -> np.ndarray:
    im = Image.fromarray(img)
    return np.asarray(im.resize((s, s), Image.BICUBIC).resize(im.size, Image.BICUBIC))


def _dark_window(img, box, margin) -> np.ndarray:
    """Darkness above the local background (the window's median: white, or the tint inside the
    box and the circle) of the box (y, x, h, w) grown by margin, edge-padded; 0 .. 1."""
    y, x, h, w = box
    y0, x0, y1, x1 = y - margin, x - margin, y + h + margin, x + w + margin
    crop = img[max(y0, 0):y1, max(x0, 0):x1].astype(np.float32).mean(-1)
    crop = np.pad(crop, ((max(-y0, 0), max(y1 - img.shape[0], 0)), (max(-x0, 0), max(x1 - img.shape[1], 0))),
                  mode="edge")                               # marks may touch the image border
    dark = 1 - crop / 255
    return np.clip(dark - np.median(dark), 0, None)


def _best_correlation(win, template) -> float:
    """Max over placements of the normalised correlation of `template` with `win`."""
    t = template.astype(np.float32)
    t = (t - t.mean()) / np.linalg.norm(t - t.mean())
    p = np.lib.stride_tricks.sliding_window_view(win, t.shape)
    p = p - p.mean((-1, -2), keepdims=True)
    norm = np.linalg.norm(p, axis=(-1, -2))
    return float(((p * t).sum((-1, -2)) / np.maximum(norm, 1e-6)).max())


def _components(mask) -> int:
    mask, n = mask.copy(), 0
    for y, x in zip(*np.nonzero(mask)):
        if not mask[y, x]:
            continue
        n, stack = n + 1, [(y, x)]
        mask[y, x] = False
        while stack:
            cy, cx = stack.pop()
            for yy in range(max(cy - 1, 0), min(cy + 2, mask.shape[0])):
                for xx in range(max(cx - 1, 0), min(cx + 2, mask.shape[1])):
                    if mask[yy, xx]:
                        mask[yy, xx] = False
                        stack.append((yy, xx))
    return n


def read_digit(img, s):
    win = _dark_window(img, s.layout["digit"], 2)
    return max(S.ANSWERS["digit"], key=lambda d: _best_correlation(win, S.FONT[d]))


def count_components(img, s):
    """Connected components above a third of the window's darkest value (so faint blobs count)."""
    win = _dark_window(img, s.layout["count"], 1)
    return str(_components(win > win.max() / 3))


def count_ink(img, s):
    """Ink mass / mean dot area (2.25 px), with the image's true ink and tint levels given for free."""
    y, x, h, w = s.layout["count"]
    ink_dark = (img[y + h // 2, x - 1].mean() - s.ink) / 255     # the circle's tint next to the dots
    mass = _dark_window(img, s.layout["count"], 3).sum() / ink_dark
    return str(int(np.clip(round(mass / 2.25), 2, 6)))


def find_x(img, s):
    score = [_best_correlation(w, S.MARKS["x"]) - _best_correlation(w, S.MARKS["+"])
             for w in (_dark_window(img, b, 1) for b in s.layout["corner"])]
    return S.CORNERS[int(np.argmax(score))]


def box_side(img, s):
    """Colour centroids: pixels of clear chroma, assigned to the box or the circle colour
    (every other pixel of every other row: the shapes are 70 px)."""
    f = img[::2, ::2].astype(np.float32)
    chroma = f - f.mean(-1, keepdims=True)
    sat = f.max(-1) - f.min(-1) > 40
    ref = [np.array(S.COLORS[s.colors[k]], np.float32) for k in ("box", "circle")]
    sim = [chroma @ ((c - c.mean()) / np.linalg.norm(c - c.mean())) for c in ref]
    xb = np.nonzero(sat & (sim[0] > sim[1]))[1].mean()
    xc = np.nonzero(sat & (sim[1] >= sim[0]))[1].mean()
    return "left" if xb < xc else "right"


ORACLES = {"digit": read_digit, "count": count_components, "count (ink mass)": count_ink,
           "corner": find_x, "side": box_side}


@pytest.fixture(scope="module")
def oracle_accuracy():
    n = 160
    sched = S._schedule(11, "test", n)
    hits = {k: {"full": [], "low": []} for k in ORACLES}
    for i in range(n):
        s = S.scene(11, "test", i, n, schedule=sched)
        lo = _lowres(s.image)
        for k, f in ORACLES.items():
            truth = s.answers[k.split()[0]]
            hits[k]["full"].append(f(s.image, s) == truth)
            hits[k]["low"].append(f(lo, s) == truth)
    acc = {k: {r: float(np.mean(v)) for r, v in h.items()} for k, h in hits.items()}
    print("oracle accuracy (full 252 px / 84 px upsampled back):", acc)
    return acc


def test_detail_is_readable_at_full_resolution(oracle_accuracy):
    for k in ("digit", "count", "corner", "side"):
        assert oracle_accuracy[k]["full"] == 1.0, k


def test_detail_is_lost_at_84px(oracle_accuracy):
    chance = {"digit": 1 / 6, "count": 1 / 5, "count (ink mass)": 1 / 5, "corner": 1 / 4}
    limit = {"digit": 0.3, "count": 0.2, "count (ink mass)": 0.45, "corner": 0.7}
    for k, c in chance.items():
        assert oracle_accuracy[k]["low"] <= limit[k], (k, oracle_accuracy[k], c)


def test_global_question_survives_84px(oracle_accuracy):
    """The control: "side" needs no detail, the 84 px view answers it."""
    assert oracle_accuracy["side"]["low"] >= 0.95


def test_the_oracles_can_read_84px_when_the_detail_is_4x_larger():
    """Positive control: the same readers, given 4x larger glyphs and marks (and templates), read
    them through the 84 px round trip, so their failure above is the detail's size, not theirs.
    (At 3x the "x" is already misread at some sub-pixel phases, at 2x every glyph is.)"""
    big = {k: np.kron(v, np.ones((4, 4), bool)) for k, v in {**S.FONT, **S.MARKS}.items()}
    hits = []
    for k, glyph in big.items():
        candidates = S.ANSWERS["digit"] if k in S.FONT else tuple(S.MARKS)
        if k not in candidates:
            continue
        for off in range(3):                               # three sub-pixel phases
            img = np.full((252, 252, 3), 255, np.uint8)
            y, x = 100 + off, 120 + 2 * off
            img[y:y + glyph.shape[0], x:x + glyph.shape[1]][glyph] = 40
            win = _dark_window(_lowres(img), (y, x, *glyph.shape), 3)
            hits.append(max(candidates, key=lambda c: _best_correlation(win, big[c])) == k)
    assert np.mean(hits) == 1.0
