"""Shared fixtures for the data tests: a small real LLaVA-style dataset from skimage images.

`clean.json` has 12 valid records (single/multi-turn, image anywhere in the question, text-only,
greyscale and RGBA files, a leading assistant turn, a trailing question, one record truncated).
`bad.json` is clean.json with one or more bad records of every kind interleaved.
"""
import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from infllava_jax.data.tokenizer import build_tiny_tokenizer

IMAGE_SIZE = 252   # presets.tiny(): 3 x 84 px
T = 36             # tokens per image of presets.tiny()
MAX_LEN = 256


def _conv(*turns):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(turns)]


LONG_ANSWER = " ".join(["The cat is lying on a rug and looking at the camera."] * 30)

CLEAN = [
    {"id": "astro", "image": "img/astronaut.jpg",
     "conversations": _conv("<image>\nWhat is in the image?", "A woman in a space suit.")},
    {"id": "coffee", "image": "img/coffee.png",
     "conversations": _conv("What is this?\n<image>", "A cup of coffee.", "What color is it?", "Brown.")},
    {"id": "text1", "conversations": _conv("Say yes.", "Yes.", "Say no.", "No.")},
    {"id": "cat-lead", "image": "img/chelsea.jpg",
     "conversations": [{"from": "gpt", "value": "Hello!"}] + _conv("<image>\nWhich animal?", "A cat.")},
    {"id": "rocket", "image": "img/rocket.jpg", "conversations": _conv("<image>\nWhere is it?", "On the launch pad.")},
    {"id": "camera", "image": "img/camera.png",
     "conversations": _conv("<image>\nDescribe the picture.", "A man with a camera on a tripod.")},
    {"id": "rgba", "image": ["sub/astronaut_rgba.png"],
     "conversations": _conv("<image>\nWhat color is the flag?", "Red, white and blue.")},
    {"id": "text2", "conversations": _conv("Please explain step by step.", "First, second, third, finally.")},
    {"id": "long", "image": "img/chelsea.jpg", "conversations": _conv("<image>\nDescribe the image in detail.", LONG_ANSWER)},
    {"id": "trailing", "image": "img/coffee.png",
     "conversations": _conv("<image>\nHow many cups?", "One.", "And saucers?")},
    {"id": "rocket3", "image": "img/rocket.jpg",
     "conversations": _conv("<image>\nWhat is it?", "A rocket.", "Is it day?", "Yes.", "Sky color?", "Blue.")},
    {"id": "text3", "conversations": _conv("Thank you!", "You're welcome.")},
]

# (record, reason) - every way a record can be bad
BAD = [
    ({"id": "missing", "image": "img/nope.jpg", "conversations": _conv("<image>\nWhat?", "Nothing.")}, "missing_image"),
    ({"id": "truncated", "image": "img/truncated.jpg", "conversations": _conv("<image>\nWhat?", "A woman.")}, "bad_image"),
    ({"id": "garbage", "image": "img/garbage.png", "conversations": _conv("<image>\nWhat?", "Noise.")}, "bad_image"),
    ({"id": "bomb", "image": "img/bomb.png", "conversations": _conv("<image>\nWhat?", "Nothing.")}, "too_many_pixels"),
    ({"id": "escape", "image": "../escape.png", "conversations": _conv("<image>\nWhat?", "x")}, "outside_folder"),
    ({"id": "noconv", "image": "img/astronaut.jpg"}, "bad_fields"),
    ({"id": "novalue", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "bad_fields"),
    ({"id": "robot", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "bad_fields"),
    ({"id": "imgint", "image": 5, "conversations": _conv("<image>\nWhat?", "x")}, "bad_fields"),
    (["not", "a", "dict"], "bad_fields"),
    ({"id": "roles", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                       {"from": "gpt", "value": "c"}, {"from": "gpt", "value": "d"}]}, "bad_roles"),
    ({"id": "noanswer", "image": "img/coffee.png", "conversations": _conv("<image>\nWhat?")}, "no_answer"),
    ({"id": "two-images", "image": "img/coffee.png", "conversations": _conv("<image>\n<image>\nWhat?", "x")},
     "image_token_mismatch"),
    ({"id": "no-token", "image": "img/coffee.png", "conversations": _conv("What?", "x")}, "image_token_mismatch"),
    ({"id": "token-no-file", "conversations": _conv("<image>\nWhat?", "x")}, "image_token_mismatch"),
    ({"id": "too-long", "image": "img/rocket.jpg", "conversations": _conv("<image>\n" + LONG_ANSWER, "Yes.")}, "too_long"),
]


def _write_images(root):
    os.makedirs(os.path.join(root, "img"))
    os.makedirs(os.path.join(root, "sub"))
    d = skimage.data
    Image.fromarray(d.astronaut()).save(os.path.join(root, "img/astronaut.jpg"), quality=90)
    Image.fromarray(d.coffee()).save(os.path.join(root, "img/coffee.png"))
    Image.fromarray(d.chelsea()).save(os.path.join(root, "img/chelsea.jpg"))
    Image.fromarray(d.rocket()).save(os.path.join(root, "img/rocket.jpg"))
    Image.fromarray(d.camera()).save(os.path.join(root, "img/camera.png"))  # greyscale "L"
    rgba = np.concatenate([d.astronaut()[::2, ::3], np.full((256, 171, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(root, "sub/astronaut_rgba.png"))
    jpg = open(os.path.join(root, "img/astronaut.jpg"), "rb").read()
    open(os.path.join(root, "img/truncated.jpg"), "wb").write(jpg[: len(jpg) // 2])
    open(os.path.join(root, "img/garbage.png"), "wb").write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    from tests.test_bad_inputs import png_header_only
    open(os.path.join(root, "img/bomb.png"), "wb").write(png_header_only(40_000, 40_000))


def bad_json_records():
    """clean records with the bad ones interleaved: (records, {index: reason}, clean index map)."""
    recs, reasons, clean_at = [], {}, {}
    bad = list(BAD)
    for k, r in enumerate(CLEAN):
        clean_at[len(recs)] = k
        recs.append(r)
        for _ in range(2 if k < 4 else 1):
            if bad:
                rec, why = bad.pop(0)
                reasons[len(recs)] = why
                recs.append(rec)
    assert not bad
    return recs, reasons, clean_at


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("llava"))
    _write_images(root)
    json.dump(CLEAN, open(os.path.join(root, "clean.json"), "w"))
    json.dump(bad_json_records()[0], open(os.path.join(root, "bad.json"), "w"))
    return root


@pytest.fixture(scope="session")
def tok():
    return build_tiny_tokenizer()


def config(root, name="clean.json", **kw):
    from infllava_jax.data.pipeline import DataConfig
    base = dict(data_path=os.path.join(root, name), image_folder=root, image_size=IMAGE_SIZE,
                tokens_per_image=T, max_len=MAX_LEN, batch_size=3, num_threads=2, prefetch_buffer=4)
    return DataConfig(**{**base, **kw})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
