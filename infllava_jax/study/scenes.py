"""A deterministic synthetic high-resolution VQA dataset: the data of the miniature study.

    python -m infllava_jax.study.scenes OUT_DIR [--n-train 2000] [--n-val 200] [--n-test 300]

Every image (252 px by default) is one scene on an 18 x 18 grid of cells (14 px at 252 px: one
ViT patch of an 84 px local crop) holding four facts, each asked by one question type:

    type    question (2 fixed phrasings)            answers               needs
    digit   What digit is written in the box?       0 2 3 5 6 9           detail: 3x5 px glyph, 1 px strokes
    count   How many dots are inside the circle?    2 .. 6                detail: 1-2 px dots, 4 px apart
    corner  Which corner holds the tiny x?          top left, top right,  detail (a 3x3 px "x" among "+")
                                                    bottom left, ...      + where it is
    side    Is the box left or right of the circle? left, right           global only (a control)

The box and the circle are large (3 x 3 cells, 42 px at 252, a coloured outline filled with a 60% tint of the colour,
often straddling local-crop borders); the glyph, the dot cluster and the four 3x3 marks sit at a
fixed place in the middle of one 14 px cell each (grey level 0..60 per image). Grey strokes and
dots are clutter. A 2 px dark frame marks the image border, so that a local crop shows where in
the scene it lies (as a photo's edges do). The cells are the patches of a 252 px scene's local
crops, so there a detail always looks the same (what lets the tiny tower learn to read it in a
minute, study/stage0.py); a 3x downsampled view (252 -> 84 px, the single view of a
LLaVA-1.5-style model) sees it at one of 9 sub-pixel phases (14 = 2 mod 3): the glyph becomes a
1x2 px smudge, the dots merge into one blob (their sizes vary, so the ink mass does not give the
count), "x" and "+" (same ink and size) become near-identical blobs, and the digits are those of
equal ink; "side" stays readable. tests/test_study_scenes.py measures this with simple oracles. The
detail is illegible at 84 px, not erased: a noise-free reader that knows the font, the position
and the ink level can still invert the ~10 grey levels of difference that remain.

Answers are balanced per split and per question type by construction; meta.json reports the
majority-class accuracy of every type. Output (`generate`):

    images/{train,val,test}/{i:06d}.png   RGB PNG, written byte-identically for a given seed
    train_caption.json    stage 1: "<image>\\nDescribe the image." -> a caption naming every fact
    train_vqa.json        stage 2: one record per image, TURNS (4) questions of different types
                          (the first cycles through the types), a few text-only records
    val.jsonl, test.jsonl one question per image: {question_id, image, question, answer, type}
    scenes_{train,val,test}.jsonl  per image: {image, answers, colors, layout, ink, caption},
                          the ground truth of stage 0 (study/stage0.py) and the probes
    meta.json             written last; a complete directory with the same arguments is reused
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = 5   # 5: the answer instruction on the first question of a record only
GRID = 18                        # cells per side
SPLITS = ("train", "val", "test")
SHORT = "Answer the question using a single word or phrase."   # as the eval task's post-prompt
CAPTION_PROMPT = "Describe the image."
TURNS = 4                        # questions (of different types) per train VQA record
TEXT_ONLY_FRACTION = 0.01        # extra text-only train VQA records (>= 1)
PNG_OPTIONS = {"format": "PNG", "compress_level": 1, "optimize": False}  # no metadata chunks

TYPES = ("digit", "count", "corner", "side")
QUESTIONS = {
    "digit": ("What digit is written in the box?", "Which digit is inside the box?"),
    "count": ("How many dots are inside the circle?", "How many small dots are in the circle?"),
    "corner": ("Which corner holds the tiny x?", "In which corner is the small x mark?"),
    "side": ("Is the box left or right of the circle?", "Is the box on the left or the right of the circle?"),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
ANSWERS = {
    "digit": ("0", "2", "3", "5", "6", "9"),
    "count": tuple(str(n) for n in range(2, 7)),
    "corner": CORNERS,
    "side": ("left", "right"),
}
KIND = {"digit": "detail", "count": "detail", "corner": "detail+global", "side": "global"}

# 3x5 pixel font (rows top to bottom). The answers use only the digits of (nearly) equal ink,
# 2/3/5: 11 px and 0/6/9: 12 px (2/5 and 6/9 are mirror images), so that the amount of ink, which
# survives downsampling, does not give the digit away (1: 8 px, 4: 9, 7: 7, 8: 13 would).
_FONT_ROWS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}
FONT = {k: np.array([[c == "1" for c in r] for r in v]) for k, v in _FONT_ROWS.items()}
# The corner marks: 3x3, same ink (5 px), bounding box and centroid; 3x downsampled, both are
# one small grey blob (the "x" only slightly wider).
MARKS = {"x": np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], bool),
         "+": np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)}
DOT_SIZES = ((1, 1), (2, 2), (1, 2), (2, 1))   # (h, w): ink 1, 4, 2, 2 px
LATTICE, PITCH = 3, 4                           # dot sites: 3x3, 4 px apart (>= 2 px gaps)

COLORS = {"red": (220, 30, 30), "blue": (30, 70, 220), "green": (20, 150, 40),
          "orange": (240, 140, 0), "purple": (140, 40, 190)}
BACKGROUNDS = ((255, 255, 255), (250, 246, 236), (240, 246, 252), (246, 250, 240))
CLUTTER = ((150, 150, 150), (175, 175, 175), (120, 160, 200), (200, 150, 120), (150, 190, 150))
INK_LEVELS = 61                 # the fine details of one image are drawn in grey 0 .. 60
TINT = 0.6                      # the box and the circle are filled with 60% of their colour
FRAME, FRAME_COLOR = 2, (70, 70, 70)   # the image border (px at 252, grey)
OBJECT = 3                      # the box and the circle span OBJECT x OBJECT cells


@dataclasses.dataclass
class Scene:
    image: np.ndarray        # uint8 (S, S, 3)
    answers: dict            # type -> answer string
    colors: dict             # "box" / "circle" -> colour name
    layout: dict             # pixel boxes (y, x, h, w) of the fine details, for oracles and tests
    ink: int                 # grey level of the fine details


def _check_size(image_size: int) -> int:
    if image_size % GRID or image_size < 12 * GRID:
        raise ValueError(f"image_size must be a multiple of {GRID} and >= {12 * GRID}, got {image_size}")
    return image_size // GRID


# ----------------------------------------------------------------------------- answers

def _schedule(seed: int, split: str, n: int) -> dict:
    """type -> int array (n,) of answer indices. Image i is asked type TYPES[i % 4] in val/test
    (and first in train), so every residue class gets an exactly balanced cycle of answers."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1 << 20])
    out = {}
    for t in TYPES:
        a = np.empty(n, np.int64)
        for r in range(len(TYPES)):
            idx = np.arange(r, n, len(TYPES))
            a[idx] = rng.permutation(np.arange(len(idx)) % len(ANSWERS[t]))
        out[t] = a
    return out


# ----------------------------------------------------------------------------- drawing

def _paint(img, y, x, mask, color):
    h, w = mask.shape
    img[y:y + h, x:x + w][mask] = color


@functools.lru_cache(maxsize=16)
def _background(size: int, k: int) -> np.ndarray:
    img = np.tile(np.array(BACKGROUNDS[k], np.uint8), (size, size, 1))
    img.flags.writeable = False
    return img


@functools.lru_cache(maxsize=4)
def _ring(cell: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(OBJECT cells)^2 masks of a circle outline of t + 1 px and of its inside, centred on the
    middle cell's centre."""
    n = OBJECT
    r_out = n / 2 * cell - 2
    yy, xx = np.ogrid[:n * cell, :n * cell]
    d2 = (yy - n // 2 * cell - (cell - 1) / 2) ** 2 + (xx - n // 2 * cell - (cell - 1) / 2) ** 2
    ring, inside = (d2 <= r_out ** 2) & (d2 > (r_out - t - 1) ** 2), d2 <= (r_out - t - 1) ** 2
    ring.flags.writeable = inside.flags.writeable = False
    return ring, inside


def _tint(color) -> tuple[int, ...]:
    return tuple(int(round(255 + TINT * (c - 255))) for c in color)


def _free_cell(rng, occ, rows, cols, core=None):
    """A random free cell in rows x cols (ranges), marked occupied with its 8 neighbours (in occ;
    itself in core). With core: a cell free in core is the fallback when occ leaves none."""
    for grid in (occ, core) if core is not None else (occ,):
        cand = np.argwhere(~grid[rows.start:rows.stop, cols.start:cols.stop])
        if len(cand):
            r, c = cand[rng.integers(len(cand))] + (rows.start, cols.start)
            occ[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = True
            if core is not None:
                core[r, c] = True
            return int(r), int(c)
    return None


def _clutter(img: np.ndarray, rng: np.random.Generator, occ: np.ndarray, cell: int) -> None:
    """Short light strokes and a few grey dots, in free cells only."""
    for _ in range(int(rng.integers(4, 8))):
        rcq = _free_cell(rng, occ, range(GRID), range(GRID))
        if rcq is None:
            break
        y, x = rcq[0] * cell + int(rng.integers(2, cell - 8)), rcq[1] * cell + int(rng.integers(2, cell - 8))
        length = int(rng.integers(3, 8))
        colr = CLUTTER[rng.integers(len(CLUTTER))]
        k = np.arange(length)
        kind = rng.integers(3)
        ys, xs = (y + 0 * k, x + k) if kind == 0 else (y + k, x + 0 * k) if kind == 1 else (y + k, x + k)
        img[ys, xs] = colr
    for _ in range(int(rng.integers(0, 4))):
        rcq = _free_cell(rng, occ, range(GRID), range(GRID))
        if rcq is None:
            break
        y, x = rcq[0] * cell + int(rng.integers(3, cell - 4)), rcq[1] * cell + int(rng.integers(3, cell - 4))
        img[y:y + 2, x:x + 2] = CLUTTER[0]


def render(answers: dict, rng: np.random.Generator, image_size: int = 252) -> Scene:
    """Draw one scene with the given answers ({type: answer string}); the rest comes from rng."""
    cell = _check_size(image_size)
    S = image_size
    img = _background(S, int(rng.integers(len(BACKGROUNDS)))).copy()
    names = list(COLORS)
    box_c, circ_c = (names[i] for i in rng.choice(len(names), 2, replace=False))
    occ = np.zeros((GRID, GRID), bool)      # big objects + 1 cell margin, small items + neighbours
    core = np.zeros((GRID, GRID), bool)     # the objects' cells and the marks only

    # the objects: OBJECT x OBJECT cells, centres 6..13 cells apart horizontally (the "side" fact)
    dx = int(rng.integers(6, 14))
    left = int(rng.integers(2, 16 - dx))
    cb, cc = (left, left + dx) if answers["side"] == "left" else (left + dx, left)
    rb, rc = (int(v) for v in rng.integers(2, 16, size=2))
    h = OBJECT // 2
    for r, c in ((rb, cb), (rc, cc)):
        occ[max(r - h - 1, 0):r + h + 2, max(c - h - 1, 0):c + h + 2] = True
        core[r - h:r + h + 1, c - h:c + h + 1] = True

    t = max(2, cell // 5)                                    # stroke width: 2 px at 252
    y0, x0, side = (rb - h) * cell + 2, (cb - h) * cell + 2, OBJECT * cell - 4
    col = COLORS[box_c]
    img[y0:y0 + side, x0:x0 + side] = _tint(col)
    img[y0:y0 + t, x0:x0 + side] = col
    img[y0 + side - t:y0 + side, x0:x0 + side] = col
    img[y0:y0 + side, x0:x0 + t] = col
    img[y0:y0 + side, x0 + side - t:x0 + side] = col

    ring, inside = _ring(cell, t)
    _paint(img, (rc - h) * cell, (cc - h) * cell, inside, _tint(COLORS[circ_c]))
    _paint(img, (rc - h) * cell, (cc - h) * cell, ring, COLORS[circ_c])

    ink_level = int(rng.integers(INK_LEVELS))
    ink = (ink_level,) * 3

    layout = {}
    # the digit in the box's centre cell
    g = FONT[answers["digit"]]
    gy, gx = rb * cell + (cell - 5) // 2, cb * cell + (cell - 3) // 2
    _paint(img, gy, gx, g, ink)
    layout["digit"] = (gy, gx, 5, 3)

    # the dots in the circle's centre cell: n of 9 lattice sites, sizes 1x1 .. 2x2
    n = int(answers["count"])
    span = PITCH * (LATTICE - 1) + 2
    oy, ox = rc * cell + (cell - span) // 2, cc * cell + (cell - span) // 2
    for s in rng.choice(LATTICE * LATTICE, n, replace=False):
        dh, dw = DOT_SIZES[rng.integers(len(DOT_SIZES))]
        y, x = oy + PITCH * (s // LATTICE), ox + PITCH * (s % LATTICE)
        img[y:y + dh, x:x + dw] = ink
    layout["count"] = (oy, ox, span, span)

    # one 3x3 mark per quadrant, away from the two middle rows and columns: "x" in the
    # answer's corner, "+" elsewhere
    half = GRID // 2
    marks = []
    for q, name in enumerate(CORNERS):
        rows = range(0, half - 1) if q < 2 else range(half + 1, GRID)
        cols = range(0, half - 1) if q % 2 == 0 else range(half + 1, GRID)
        rcq = _free_cell(rng, occ, rows, cols, core)
        if rcq is None:  # cannot happen: two objects never cover an 8x8 quadrant
            raise RuntimeError("no free cell for a corner mark")
        my, mx = rcq[0] * cell + (cell - 3) // 2, rcq[1] * cell + (cell - 3) // 2
        _paint(img, my, mx, MARKS["x" if name == answers["corner"] else "+"], ink)
        marks.append((my, mx, 3, 3))
    layout["corner"] = tuple(marks)
    layout["side"] = ((y0, x0, side, side), ((rc - h) * cell, (cc - h) * cell, OBJECT * cell, OBJECT * cell))

    _clutter(img, rng, occ, cell)
    f = max(1, round(FRAME * S / 252))
    img[:f], img[-f:], img[:, :f], img[:, -f:] = FRAME_COLOR, FRAME_COLOR, FRAME_COLOR, FRAME_COLOR
    return Scene(img, dict(answers), {"box": box_c, "circle": circ_c}, layout, ink_level)


def scene(seed: int, split: str, index: int, n: int, image_size: int = 252,
          schedule: dict | None = None) -> Scene:
    """Image `index` of a split of n images (the answers depend on the whole split's schedule)."""
    schedule = schedule or _schedule(seed, split, n)
    answers = {t: ANSWERS[t][schedule[t][index]] for t in TYPES}
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    return render(answers, rng, image_size)


# ----------------------------------------------------------------------------- text

def caption(s: Scene) -> str:
    a, c = s.answers, s.colors
    return (f"A {c['box']} box with the digit {a['digit']} and a {c['circle']} circle with "
            f"{a['count']} dots. The box is {a['side']} of the circle. "
            f"The tiny x is in the {a['corner']} corner.")


def scene_record(s: Scene, image: str) -> dict:
    """One line of scenes_<split>.jsonl: the scene's ground truth (JSON types only)."""
    return {"image": image, "answers": s.answers, "colors": s.colors, "ink": s.ink, "caption": caption(s),
            "layout": json.loads(json.dumps(s.layout))}


def read_scenes(data_dir, split: str) -> list[dict]:
    """The ground truth of every image of a split, in image order (scenes_<split>.jsonl)."""
    path = Path(data_dir) / f"scenes_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def question(qtype: str, variant: int) -> str:
    q = QUESTIONS[qtype]
    return q[variant % len(q)]


def _turns(items, image: bool):
    """The answer instruction once, on the first question (as the eval prompt): the later turns
    follow the first one's format, and the 11 tokens each are a sixth of a record's length."""
    conv = []
    for k, (q, a) in enumerate(items):
        prefix = "<image>\n" if image and k == 0 else ""
        suffix = f"\n{SHORT}" if k == 0 else ""
        conv += [{"from": "human", "value": f"{prefix}{q}{suffix}"}, {"from": "gpt", "value": a}]
    return conv


def _text_only(rng, k: int) -> dict:
    kind = k % 3
    if kind == 0:
        d = int(rng.integers(0, 9))
        qa = (f"What digit comes after {d}?", str(d + 1))
    elif kind == 1:
        w = ("left", "right")[int(rng.integers(2))]
        qa = (f"What is the opposite of {w}?", "right" if w == "left" else "left")
    else:
        qa = ("How many corners does a square have?", "4")
    return {"id": f"text_{k:06d}", "conversations": _turns([qa], image=False)}


# ----------------------------------------------------------------------------- files

def _image_rel(split: str, i: int) -> str:
    return f"images/{split}/{i:06d}.png"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


def _jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, **PNG_OPTIONS)
    return buf.getvalue()


def _majority(rows) -> dict:
    out = {}
    for t in TYPES:
        ans = [r["answer"] for r in rows if r["type"] == t]
        out[t] = round(max(ans.count(a) for a in set(ans)) / len(ans), 4) if ans else None
    return out


def _is_complete(root: Path, args: dict) -> dict | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("args") != args or meta.get("version") != VERSION:
        return None
    files = list(meta.get("files", {}).values()) + [f"scenes_{s}.jsonl" for s in SPLITS]
    files += [_image_rel(s, i) for s in SPLITS for i in range(args[f"n_{s}"])]
    return meta if all((root / f).is_file() for f in files) else None


def _write_images(root: Path, split: str, n: int, seed: int, image_size: int) -> list:
    """Render and write a split's images and scenes_<split>.jsonl -> [(answers, colours, caption)]."""
    d = root / "images" / split
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob("*.png"):                       # left by a larger earlier run
        if stale.stem.isdigit() and len(stale.stem) == 6 and int(stale.stem) >= n:
            stale.unlink()
    sched = _schedule(seed, split, n)
    rows, records = [], []
    for i in range(n):
        s = scene(seed, split, i, n, image_size, sched)
        _write(root / _image_rel(split, i), _png(s.image))
        rows.append((s.answers, s.colors, caption(s)))
        records.append(scene_record(s, _image_rel(split, i)))
    _write(root / f"scenes_{split}.jsonl", _jsonl_bytes(records))
    return rows


def generate(out_dir, *, n_train: int = 2000, n_val: int = 200, n_test: int = 300,
             image_size: int = 252, seed: int = 0) -> dict:
    """Write the dataset to out_dir (see the module docstring) and return its meta.json content
    (plus "reused": True when a complete directory with the same arguments was found)."""
    _check_size(image_size)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if min(counts.values()) < 0 or n_train < 1:
        raise ValueError(f"need n_train >= 1 and n_val, n_test >= 0, got {counts}")
    args = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size, "seed": seed}
    root = Path(out_dir)
    meta = _is_complete(root, args)
    if meta is not None:
        return {**meta, "reused": True}

    t0 = time.perf_counter()
    (root / "meta.json").unlink(missing_ok=True)         # incomplete until rewritten at the end
    scenes = {split: _write_images(root, split, n, seed, image_size) for split, n in counts.items()}

    rng = np.random.default_rng([seed, 99])
    cap, vqa, first_turns = [], [], []
    for i, (answers, _, text) in enumerate(scenes["train"]):
        rel = _image_rel("train", i)
        cap.append({"id": f"cap_{i:06d}", "image": rel,
                    "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                                      {"from": "gpt", "value": text}]})
        first = i % len(TYPES)                   # first turns balanced; then TURNS - 1 other types
        others = [TYPES[(first + 1 + int(k)) % len(TYPES)] for k in rng.permutation(len(TYPES) - 1)]
        types = [TYPES[first]] + others[:TURNS - 1]
        items = [(question(t, int(rng.integers(2))), answers[t]) for t in types]
        first_turns.append({"type": types[0], "answer": answers[types[0]]})
        vqa.append({"id": f"vqa_{i:06d}", "image": rel, "conversations": _turns(items, image=True)})
    n_text = max(1, round(TEXT_ONLY_FRACTION * n_train))
    for k in range(n_text):                                 # spread through the file
        vqa.insert(k * n_train // n_text + k, _text_only(rng, k))

    evals = {}
    for split in ("val", "test"):
        evals[split] = []
        for i, (answers, _, _) in enumerate(scenes[split]):
            t = TYPES[i % len(TYPES)]
            evals[split].append({"question_id": f"{split}_{i:06d}", "image": _image_rel(split, i),
                                 "question": question(t, i // len(TYPES)), "answer": answers[t],
                                 "type": t})

    files = {"train_caption": "train_caption.json", "train_vqa": "train_vqa.json",
             "val": "val.jsonl", "test": "test.jsonl"}
    _write(root / files["train_caption"], _json_bytes(cap))
    _write(root / files["train_vqa"], _json_bytes(vqa))
    _write(root / files["val"], _jsonl_bytes(evals["val"]))
    _write(root / files["test"], _jsonl_bytes(evals["test"]))

    meta = {
        "generator": "infllava_jax.study.scenes", "version": VERSION, "args": args,
        "seed": seed, "image_size": image_size, "cell_px": image_size // GRID,
        "counts": {"images": counts, "train_caption": len(cap), "train_vqa": len(vqa),
                   "train_vqa_text_only": n_text,
                   "train_vqa_turns": TURNS,
                   "val": len(evals["val"]), "test": len(evals["test"])},
        "files": files,
        "caption_prompt": CAPTION_PROMPT, "answer_instruction": SHORT,
        "question_types": {t: {"kind": KIND[t], "questions": list(QUESTIONS[t]),
                               "answers": list(ANSWERS[t])} for t in TYPES},
        "majority_baseline": {"train": _majority(first_turns),
                              **{s: _majority(evals[s]) for s in ("val", "test")}},
        "eval_counts": {s: {t: sum(r["type"] == t for r in evals[s]) for t in TYPES}
                        for s in ("val", "test")},
    }
    _write(root / "meta.json", _json_bytes(meta))
    return {**meta, "reused": False, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=252)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    meta = generate(a.out_dir, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test,
                    image_size=a.image_size, seed=a.seed)
    c = meta["counts"]
    how = "reused (complete, same arguments)" if meta["reused"] else f"written in {meta['seconds']} s"
    print(f"{a.out_dir}: {how}")
    print(f"  images {c['images']} at {meta['image_size']} px; train: {c['train_caption']} captions, "
          f"{c['train_vqa']} VQA records ({c['train_vqa_turns']} turns per image, "
          f"{c['train_vqa_text_only']} text-only)")
    for t, q in meta["question_types"].items():
        n, maj = meta["eval_counts"]["test"][t], meta["majority_baseline"]["test"][t]
        print(f"  {t:<7s} {q['kind']:<14s} {len(q['answers']):2d} answers  test n={n:<4d} "
              f"majority {maj}   e.g. {q['questions'][0]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
